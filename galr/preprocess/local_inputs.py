"""The local branch's input for a batch of images, from whichever DREA source a caller has.

GaLR's local (GCN) graph takes ``local_rep [n, N, F]`` and ``local_adj [n, N, N]``. They come from
one of:

==========================================  =====================================================
source                                      meaning
==========================================  =====================================================
``None``                                    no detections: the documented all-zero fallback, with
                                            a :class:`~galr.preprocess.drea.NoDetectionsWarning`
                                            per image
``(rep, adj)`` arrays                       already built
a sequence of ``DetectionSet``              one per image, built here with the DREA settings
a folder of detection files                 ``<image stem>.json`` / ``.txt`` next to each name
a ``LocalFeatureTable``                     the authors' precomputed matrices, by image file name
==========================================  =====================================================

Folders and tables look images up by file name, so they need the images as paths.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from galr.errors import InputError, NotFoundError
from galr.preprocess.detections import (
    DetectionSet,
    find_detection_file,
    read_detections,
)
from galr.preprocess.drea import DREAConfig, build_local_batch


def local_features_for(image_paths: Sequence[str | os.PathLike], image_sizes: Sequence[tuple[int, int]],
                       drea_config: DREAConfig, detections_dir: str | os.PathLike | None = None,
                       local_table: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """DREA matrices for image files: from a precomputed table, or built from detection files.

    Images without a detection file get the all-zero fallback (with a warning each).
    """
    if local_table is not None:
        rep, adj = local_table.lookup_batch([Path(p).name for p in image_paths])
        return rep.astype(np.float32, copy=False), adj.astype(np.float32, copy=False)
    sets = []
    for path in image_paths:
        found = find_detection_file(detections_dir, path) if detections_dir is not None else None
        sets.append(read_detections(found) if found is not None else DetectionSet((), None, None, str(path)))
    return build_local_batch(sets, list(image_sizes), drea_config)


def check_local_source(source: Any) -> None:
    """Refuse a source of the wrong kind, or a folder that does not exist, before any work starts.

    Raises:
        NotFoundError: a detections folder that does not exist.
        InputError: anything that is not one of the sources in the module docstring.
    """
    if source is None or hasattr(source, "lookup") or hasattr(source, "detect_one"):
        return  # a detector is applied by the encoders, on the decoded images
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).is_dir():
            raise NotFoundError(f"detections folder not found: {source}")
        return
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], np.ndarray):
        return
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return
    raise InputError(f"local must be detections, a detections folder, a local-feature table, (rep, adj) or None; "
                     f"got {type(source).__name__}")


def local_inputs(source: Any, count: int, image_paths: Sequence[Path | None] | None,
                 image_sizes: Sequence[tuple[int, int]], drea_config: DREAConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(local_rep, local_adj)`` for ``count`` images from ``source`` (see the module docstring).

    Args:
        source: the DREA source.
        count: number of images.
        image_paths: the images' files (``None`` entries for in-memory images), or ``None``.
        image_sizes: ``(width, height)`` of each image, which detection boxes refer to.
        drea_config: the model's DREA settings.

    Raises:
        InputError: a folder or table with images not given as paths, or a count mismatch.
        NotFoundError: a detections folder that does not exist.
    """
    check_local_source(source)
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], np.ndarray):
        return source
    if source is None:
        return build_local_batch([DetectionSet((), None, None, f"image #{i}") for i in range(count)],
                                 list(image_sizes), drea_config)
    if isinstance(source, (str, os.PathLike)) or hasattr(source, "lookup"):
        if image_paths is None or any(path is None for path in image_paths):
            raise InputError("a detections folder or local-feature file needs the images given as file paths")
        if hasattr(source, "lookup"):
            return local_features_for(image_paths, image_sizes, drea_config, local_table=source)
        return local_features_for(image_paths, image_sizes, drea_config, detections_dir=source)
    sets = list(source)
    if len(sets) != count:
        raise InputError(f"{len(sets)} detection sets for {count} images; give one per image")
    return build_local_batch(sets, list(image_sizes), drea_config)


__all__ = ["check_local_source", "local_features_for", "local_inputs"]
