"""The gallery index, by job: records (:mod:`.records`), vector checks (:mod:`.vectors`), the search
seam and its searchers (:mod:`.searchers`), the container (:mod:`.gallery`), the ``.gidx`` file
(:mod:`.store`) and building from image files (:mod:`.build`).

>>> from galr.runtime.index import GalleryIndex, build_index, load_index      # doctest: +SKIP
"""

from galr.runtime.index.build import (
    IMAGE_SUFFIXES,
    SkippedImage,
    build_index,
    encode_image_files,
    image_id,
    iter_image_files,
    new_index,
    scan_image_files,
)
from galr.runtime.index.gallery import (
    GalleryIndex,
    IndexModelMismatchError,
    SearchResult,
)
from galr.runtime.index.records import ImageRecord, RecordStore, UnknownIdError
from galr.runtime.index.searchers import SEARCHERS, Searcher, create_searcher
from galr.runtime.index.store import (
    FORMAT_VERSION,
    IndexFormatError,
    load_index,
    save_index,
)

__all__ = [
    "FORMAT_VERSION",
    "IMAGE_SUFFIXES",
    "SEARCHERS",
    "GalleryIndex",
    "ImageRecord",
    "IndexFormatError",
    "IndexModelMismatchError",
    "RecordStore",
    "SearchResult",
    "Searcher",
    "SkippedImage",
    "UnknownIdError",
    "build_index",
    "new_index",
    "create_searcher",
    "encode_image_files",
    "image_id",
    "iter_image_files",
    "load_index",
    "save_index",
    "scan_image_files",
]
