"""The gallery index: image records and embeddings, and the MR text bank, behind two searchers.

>>> index = GalleryIndex(encoders.model_hash, encoders.embed_dim)          # doctest: +SKIP
>>> index.add(records, image_embeddings)
>>> index.add_text_bank(captions, encoders.encode_text(captions))
>>> result = index.search(encoders.encode_text(["a harbour"]), k=10)
>>> result.ids[0][:3], result.scores[0][:3]

Each image has a record (:class:`~galr.runtime.index.records.ImageRecord`, found by its string id)
and a stable integer key; the image embeddings live in a :class:`~galr.runtime.index.searchers.Searcher`
under those keys, the text bank's in another. **Editing** (:meth:`GalleryIndex.add`,
:meth:`~GalleryIndex.remove`, :meth:`~GalleryIndex.update`) happens in memory; :meth:`~GalleryIndex.save`
writes the ``.gidx`` file (:mod:`galr.runtime.index.store`). Searches may run from several threads at
once; edits need exclusive access.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from galr import __version__ as GALR_VERSION
from galr.clock import utc_now
from galr.errors import InputError, ModelMismatchError
from galr.runtime.index.records import ImageRecord, RecordStore, UnknownIdError
from galr.runtime.index.searchers import Searcher, create_searcher
from galr.runtime.index.vectors import (
    checked_storage,
    checked_vectors,
    duplicates,
    preview,
)

if TYPE_CHECKING:
    from galr.geo.filters import PlaceFilter

DEFAULT_SEARCHER = "exact"


class IndexModelMismatchError(ModelMismatchError):
    """An index was built with another model than the encoders that want to search it."""


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous
class SearchResult:
    """The ``k`` best gallery images of each query, best first.

    Attributes:
        scores: float32 ``[q, k]`` cosine similarities.
        keys: int64 ``[q, k]`` keys of the images (see :meth:`GalleryIndex.record`).
        ids: the image ids of ``keys``, one list per query.
    """

    scores: np.ndarray
    keys: np.ndarray
    ids: list[list[str]]


class GalleryIndex:
    """Image embeddings with their records and the MR text bank, searchable.

    Args:
        model_hash: identity of the model whose image encoder made the embeddings
            (``encoders.model_hash``); indexes refuse encoders of other models by it.
        embed_dim: embedding size ``D``.
        storage: ``"fp32"`` or ``"fp16"``: how embeddings are kept in memory and on disk
            (fp16 halves both; scores are always computed in float32).
        built_with: the bundle file that made the embeddings (shown when a model mismatch is refused).
        image_root: the folder image ids are relative to, if any (``galr-index --update`` reuses it).
        searcher: the image searcher's kind (:data:`~galr.runtime.index.searchers.SEARCHERS`); the
            text bank is always searched exactly.
        searcher_params: that kind's build settings (e.g. ``{"nlist": 4096}`` for ``ivf``).

    Raises:
        InputError: empty ``model_hash``, non-positive ``embed_dim``, unknown ``storage``, searcher or
            searcher settings.
        UnavailableError: an approximate searcher without FAISS installed.
    """

    def __init__(self, model_hash: str, embed_dim: int, storage: str = "fp32", *, built_with: str | None = None,
                 image_root: str | None = None, searcher: str = DEFAULT_SEARCHER,
                 searcher_params: Mapping[str, Any] | None = None) -> None:
        if not isinstance(model_hash, str) or not model_hash:
            raise InputError(f"model_hash must be a non-empty string, got {model_hash!r}")
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, (int, np.integer)) or embed_dim < 1:
            raise InputError(f"embed_dim must be a positive integer, got {embed_dim!r}")
        checked_storage(storage)
        self._model_hash = model_hash
        self._embed_dim = int(embed_dim)
        self.built_with = built_with
        self.image_root = image_root
        self.galr_version = GALR_VERSION
        self.created = self.updated = utc_now()
        self.images: Searcher = create_searcher(searcher, self._embed_dim, storage, **dict(searcher_params or {}))
        self.text_bank: Searcher = create_searcher(DEFAULT_SEARCHER, self._embed_dim, storage)
        self._records = RecordStore()
        self._bank_texts: list[str] = []
        self._next_key = 0

    # -- properties ---------------------------------------------------------------------------
    @property
    def model_hash(self) -> str:
        return self._model_hash

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def storage(self) -> str:
        return self.images.storage

    @property
    def next_key(self) -> int:
        """The key the next added image gets (keys are never reused)."""
        return self._next_key

    @property
    def ids(self) -> list[str]:
        """Image ids in gallery order."""
        return self._records.ids()

    @property
    def records(self) -> tuple[ImageRecord, ...]:
        """Image records in gallery order."""
        return tuple(self._records)

    @property
    def text_bank_texts(self) -> list[str]:
        return list(self._bank_texts)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._records

    def __repr__(self) -> str:
        return (f"GalleryIndex({len(self)} images, text bank {len(self._bank_texts)}, D={self._embed_dim}, "
                f"{self.storage}, {self.images.kind}, model {self._model_hash[:12]})")

    def get(self, image_id: str) -> ImageRecord:
        """The record of one image.

        Raises:
            UnknownIdError: no image with this id.
        """
        return self._records.get(self._records.key_of(image_id))

    def record(self, key: int) -> ImageRecord:
        """The record of the image with ``key`` (e.g. from :attr:`SearchResult.keys`)."""
        return self._records.get(key)

    def key_of(self, image_id: str) -> int:
        """The key of ``image_id``."""
        return self._records.key_of(image_id)

    def image_vectors(self) -> np.ndarray:
        """The gallery embeddings as float32 ``[n, D]`` in gallery order (a copy)."""
        return self.images.reconstruct(self.images.keys)

    def text_bank_vectors(self) -> np.ndarray:
        """The text bank embeddings as float32 ``[m, D]`` (a copy)."""
        return self.text_bank.reconstruct(self.text_bank.keys)

    # -- editing ------------------------------------------------------------------------------
    def _touch(self) -> None:
        self.updated = utc_now()

    def _checked_batch(self, records: Sequence[ImageRecord], embeddings: Any) -> tuple[list[ImageRecord], np.ndarray]:
        records = list(records)
        for record in records:
            if not isinstance(record, ImageRecord):
                raise TypeError(f"records must be ImageRecord objects, got {type(record).__name__}")
        repeated = duplicates(record.id for record in records)
        if repeated:
            raise InputError(f"the same id appears more than once in one call: {preview(repeated)}")
        return records, checked_vectors(embeddings, len(records), self._embed_dim, "embeddings", unit_norm=True)

    def add(self, records: Sequence[ImageRecord], embeddings: Any, *, replace: bool = False) -> None:
        """Add images (appended at the end of the gallery).

        Args:
            records: one :class:`ImageRecord` per image, ids unique.
            embeddings: ``[len(records), D]`` unit-norm float embeddings.
            replace: overwrite images whose id is already indexed (in place, keeping their key and
                position) instead of refusing them.

        Raises:
            InputError: ids already indexed (without ``replace``) or repeated in ``records``; bad
                embeddings (shape, NaN/inf, not unit-norm).
            TypeError: non-record items or non-float embeddings.
        """
        records, array = self._checked_batch(records, embeddings)
        existing = [i for i, record in enumerate(records) if record.id in self._records]
        if existing and not replace:
            raise InputError(f"ids already in the index: {preview([records[i].id for i in existing])}; "
                             "use update()/add(..., replace=True) (CLI: --update) to replace them")
        if existing:
            keys = np.array([self._records.key_of(records[i].id) for i in existing], dtype=np.int64)
            self.images.replace(keys, array[existing])
            for key, i in zip(keys.tolist(), existing):
                self._records.put(key, records[i])
        fresh = [i for i, record in enumerate(records) if record.id not in self._records]
        if fresh:
            keys = np.arange(self._next_key, self._next_key + len(fresh), dtype=np.int64)
            self.images.add(keys, array[fresh])
            for key, i in zip(keys.tolist(), fresh):
                self._records.put(key, records[i])
            self._next_key += len(fresh)
        self._touch()

    def update(self, records: Sequence[ImageRecord], embeddings: Any) -> None:
        """Replace indexed images (metadata and embedding) in place.

        Raises:
            UnknownIdError: ids that are not in the index (all named).
            InputError, TypeError: as :meth:`add`.
        """
        records = list(records)
        unknown = [r.id for r in records if isinstance(r, ImageRecord) and r.id not in self._records]
        if unknown:
            raise UnknownIdError(f"ids not in the index: {preview(unknown)}; add() them instead")
        self.add(records, embeddings, replace=True)

    def remove(self, ids: Iterable[str] | str) -> None:
        """Remove images by id; the others keep their keys and order.

        Raises:
            UnknownIdError: ids that are not in the index (all named); nothing is removed then.
        """
        ids = list(dict.fromkeys([ids] if isinstance(ids, str) else ids))
        unknown = [image_id for image_id in ids if image_id not in self._records]
        if unknown:
            raise UnknownIdError(f"ids not in the index ({len(self)} images): {preview(unknown)}")
        keys = np.array([self._records.key_of(image_id) for image_id in ids], dtype=np.int64)
        self.images.remove(keys)
        self._records.remove(keys.tolist())
        self._touch()

    def add_text_bank(self, texts: Sequence[str], embeddings: Any, *, replace: bool = False) -> None:
        """Add captions (or past queries) with their text embeddings to the MR text bank.

        MR's reverse search compares each gallery image's score for a new query with its scores for
        these texts; a bank of the dataset's captions is the usual choice.

        Args:
            texts: the texts, one per embedding row.
            embeddings: ``[len(texts), D]`` unit-norm text embeddings from the same model.
            replace: drop the current bank first.

        Raises:
            InputError: empty or non-string texts, or bad embeddings (as :meth:`add`).
        """
        texts = list(texts)
        for number, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"text bank entry #{number} ({text!r}) must be a non-empty string")
        array = checked_vectors(embeddings, len(texts), self._embed_dim, "text bank embeddings", unit_norm=True)
        if replace:
            self.text_bank = create_searcher(DEFAULT_SEARCHER, self._embed_dim, self.storage)
            self._bank_texts = []
        start = len(self._bank_texts)
        self.text_bank.add(np.arange(start, start + len(texts), dtype=np.int64), array)
        self._bank_texts = self._bank_texts + texts
        self._touch()

    def change_searcher(self, kind: str, **params: Any) -> None:
        """Move the gallery embeddings into a new image searcher of ``kind`` (keys and order kept).

        From an ``ivfpq`` searcher the moved vectors are its approximations; rebuild from the images
        for exact ones.

        Raises:
            InputError: an unknown kind or bad settings.
            UnavailableError: an approximate kind without FAISS.
        """
        searcher = create_searcher(kind, self._embed_dim, self.storage, **params)
        keys = self.images.keys
        step = 1 << 16
        for start in range(0, len(keys), step):
            part = np.asarray(keys[start:start + step])
            searcher.add(part, self.images.reconstruct(part))
        self.images = searcher
        self._touch()

    def bank_text(self, key: int) -> str:
        """The text bank entry with ``key`` (its position in :attr:`text_bank_texts`)."""
        return self._bank_texts[int(key)]

    # -- search -------------------------------------------------------------------------------
    def _checked_queries(self, query_embeddings: Any) -> np.ndarray:
        queries = checked_vectors(query_embeddings, None, self._embed_dim, "query_embeddings", unit_norm=False)
        return np.ascontiguousarray(queries)

    def search(self, query_embeddings: Any, k: int = 10, **params: Any) -> SearchResult:
        """Top-``k`` gallery images of each query by cosine similarity.

        Args:
            query_embeddings: float ``[q, D]`` query embeddings (unit-norm for cosine scores), e.g.
                ``encoders.encode_text([...])``.
            k: results per query; capped at the gallery size.
            **params: the searcher's own settings (exact: ``device``, ``block_rows``; ``ivf``/``ivfpq``:
                ``nprobe``; ``hnsw``: ``ef``).

        Returns:
            SearchResult with ``[q, min(k, n)]`` scores (float32, descending), keys and ids.

        Raises:
            InputError: bad query shape/values or ``k < 1``.
            TypeError: non-float queries.
            BackendUnavailableError: ``device="cuda"`` without CuPy or a GPU.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        scores, keys = self.images.search(self._checked_queries(query_embeddings), int(k), **params)
        records = self._records
        return SearchResult(scores, keys, [[records.get(key).id for key in row] for row in keys.tolist()])

    def keys_matching(self, where: "PlaceFilter") -> np.ndarray:
        """Keys of the images that pass a place/date filter (records without a place or date never pass it)."""
        keys, bounds, times = self._records.places()
        return keys[where.matches(bounds, times)]

    def similarity_matrix(self, query_embeddings: Any, **params: Any) -> np.ndarray:
        """All query x gallery cosine scores, float32 ``[q, n]`` in gallery order."""
        return self.images.scores(self._checked_queries(query_embeddings), **params)

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, records: str = "auto") -> Path:
        """Write the index to one ``.gidx`` file, atomically (see :mod:`galr.runtime.index.store`);
        ``records``: ``"json"``, ``"sqlite"`` (a checked file beside it) or ``"auto"``."""
        from galr.runtime.index.store import save_index

        return save_index(self, Path(path), records)

    @property
    def record_store(self) -> Any:
        """Where the records live: an in-memory :class:`RecordStore` or a SQLite-backed store."""
        return self._records

    @classmethod
    def from_parts(cls, header: dict[str, Any], records: RecordStore, images: Searcher, text_bank: Searcher,
                   texts: list[str]) -> "GalleryIndex":
        """An index from what a file holds (used by :func:`~galr.runtime.index.store.load_index`)."""
        index = cls(header["model_hash"], header["embed_dim"], images.storage, built_with=header.get("built_with"),
                    image_root=header.get("image_root"))
        index.images, index.text_bank, index._records, index._bank_texts = images, text_bank, records, texts
        index._next_key = int(header.get("next_key", len(records)))
        index.galr_version = str(header.get("galr_version", ""))
        index.created, index.updated = str(header.get("created", "")), str(header.get("updated", ""))
        return index


__all__ = ["DEFAULT_SEARCHER", "GalleryIndex", "IndexModelMismatchError", "SearchResult"]
