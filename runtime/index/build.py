"""Building an index from image files: find them, encode them in batches, skip the unreadable.

>>> encoders = load_engine("galr.plan")                                                 # doctest: +SKIP
>>> index, skipped = build_index(encoders, iter_image_files("scenes/"), root="scenes/")
>>> index.save("gallery.gidx")
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from galr.errors import InputError
from galr.preprocess.local_inputs import check_local_source
from galr.runtime.index.gallery import GalleryIndex
from galr.runtime.index.records import ImageRecord
from galr.runtime.index.searchers import resolve_searcher_kind
from galr.runtime.index.vectors import (
    checked_storage,
    checked_vectors,
    duplicates,
    preview,
)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})


@dataclass(frozen=True)
class SkippedImage:
    """An image that could not be indexed, and why."""

    path: str
    reason: str


def scan_image_files(folder: str | os.PathLike) -> tuple[list[Path], list[SkippedImage]]:
    """Image files under ``folder``, recursively, sorted by path, and the image names that cannot be read.

    A name with an image suffix that is not a readable file (a broken link, a symbolic-link loop, a
    special file) is listed as skipped with the reason instead of vanishing.

    Args:
        folder: the folder to scan; files with suffixes in :data:`IMAGE_SUFFIXES` (any case) count.

    Returns:
        ``(image paths, skipped)``; paths are ``folder`` joined with their relative paths.

    Raises:
        InputError: ``folder`` is not a folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder of images")
    found, skipped = [], []
    for path in root.rglob("*"):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            if path.stat().st_mode and path.is_file():
                found.append(path)
            elif not path.is_dir():
                skipped.append(SkippedImage(str(path), "not a regular file"))
        except OSError as exc:  # a loop of links (ELOOP), a dangling link, no permission
            skipped.append(SkippedImage(str(path), f"cannot be read ({exc.strerror or exc})"))
    key = lambda p: Path(p).relative_to(root).as_posix()  # noqa: E731
    return sorted(found, key=key), sorted(skipped, key=lambda s: key(s.path))


def iter_image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of :func:`scan_image_files` (what cannot be read is left out)."""
    return scan_image_files(folder)[0]


def image_id(path: str | os.PathLike, root: str | os.PathLike | None) -> str:
    """The default id of an image: its path relative to ``root`` (POSIX separators), or as given.

    Raises:
        InputError: ``path`` is not inside ``root``.
    """
    if root is None:
        return Path(path).as_posix()
    absolute, base = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        raise InputError(f"{path} is not inside the image root {root}; give another root (CLI: --root)") from None


def _per_image_errors() -> tuple[type[BaseException], ...]:
    from galr.preprocess.detections import DetectionFormatError
    from galr.preprocess.image import ImageLoadError

    return (ImageLoadError, DetectionFormatError, OSError)


def _image_size(path: Path, config: Any) -> tuple[int, int]:
    from PIL import Image

    from galr.preprocess.image import load_image

    try:
        with Image.open(path) as picture:  # reads the header only
            return picture.size
    except (OSError, ValueError, Image.DecompressionBombError):
        # load_image also reads what Pillow cannot (tifffile) and words the error for the user.
        return load_image(path, config).size


def _encode_batch(encoders: Any, batch: list[Path], local: Any, errors: tuple[type[BaseException], ...]
                  ) -> tuple[list[int], np.ndarray, list[SkippedImage]]:
    """Encode a batch; when one file fails the call, encode its images one by one to find it."""
    try:
        return list(range(len(batch))), encoders.encode_images(batch, local=local), []
    except errors as exc:
        if len(batch) == 1:
            return [], np.zeros((0, encoders.embed_dim), np.float32), [SkippedImage(str(batch[0]), str(exc))]
    kept, rows, skipped = [], [], []
    for position, path in enumerate(batch):
        one_kept, one_row, one_skipped = _encode_batch(encoders, [path], local, errors)
        if one_kept:
            kept.append(position)
            rows.append(one_row)
        skipped.extend(one_skipped)
    return kept, np.concatenate(rows) if rows else np.zeros((0, encoders.embed_dim), np.float32), skipped


def encode_image_files(encoders: Any, image_paths: Sequence[str | os.PathLike], local: Any = None,
                       batch_size: int = 32, progress: bool = True, root: str | os.PathLike | None = None
                       ) -> tuple[list[ImageRecord], np.ndarray, list[SkippedImage]]:
    """Encode image files in batches into records and embeddings, skipping unreadable ones.

    Args:
        encoders: the :class:`~galr.runtime.encoders.Encoders` (or anything with ``encode_images``
            and ``embed_dim``).
        image_paths: the image files; each id (:func:`image_id`) must be unique.
        local: DREA input passed to every ``encoders.encode_images`` call: a detections folder, an
            original local-feature table (``load_local_file``) or ``None`` (no-detection fallback).
        batch_size: images per encoder call.
        progress: show a tqdm bar (images/s) on stderr.
        root: ids are paths relative to this folder; ``None`` keeps the paths as given.

    Returns:
        ``(records, embeddings [len(records), D] float32, skipped)``; ``skipped`` lists unreadable or
        corrupt images (and images absent from a local-feature table) with the reason.

    Raises:
        InputError: repeated ids, a path outside ``root``, ``batch_size < 1``, or encoder outputs of
            the wrong shape.
        NotFoundError: ``local`` names a folder that does not exist.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    check_local_source(local)
    paths = [Path(p) for p in image_paths]
    ids = [image_id(p, root) for p in paths]
    repeated = duplicates(ids)
    if repeated:
        raise InputError(f"these image ids occur twice: {preview(repeated)}; each image may be indexed once")
    errors = _per_image_errors()
    spec = getattr(encoders, "spec", None)
    config = spec.image if spec is not None else None
    records: list[ImageRecord] = []
    parts: list[np.ndarray] = []
    skipped: list[SkippedImage] = []
    with tqdm(total=len(paths), unit="img", desc="indexing", disable=not progress, smoothing=0.1) as bar:
        for start in range(0, len(paths), batch_size):
            batch, sizes = [], []
            for path, name in zip(paths[start : start + batch_size], ids[start : start + batch_size]):
                if hasattr(local, "lookup") and path not in local:
                    skipped.append(SkippedImage(str(path), f"not in local-feature file {getattr(local, 'source', '')}"))
                    continue
                try:
                    sizes.append((name, _image_size(path, config)))
                    batch.append(path)
                except errors as exc:
                    skipped.append(SkippedImage(str(path), str(exc)))
            kept, embeddings, failed = _encode_batch(encoders, batch, local, errors) if batch else ([], None, [])
            skipped.extend(failed)
            if kept:
                parts.append(checked_vectors(embeddings, len(kept), encoders.embed_dim,
                                                 "encoders.encode_images output", unit_norm=True))
                for position in kept:
                    name, (width, height) = sizes[position]
                    records.append(ImageRecord(name, os.path.abspath(batch[position]), width, height))
            bar.update(min(batch_size, len(paths) - start))
            bar.set_postfix(skipped=len(skipped), refresh=False)
    embeddings = np.concatenate(parts) if parts else np.zeros((0, encoders.embed_dim), np.float32)
    return records, embeddings, skipped


def build_index(encoders: Any, image_paths: Sequence[str | os.PathLike], local: Any = None, batch_size: int = 32,
                storage: str = "fp32", progress: bool = True, root: str | os.PathLike | None = None,
                searcher: str = "auto", searcher_params: Mapping[str, Any] | None = None
                ) -> tuple[GalleryIndex, list[SkippedImage]]:
    """Encode image files into a new index.

    Args:
        encoders: the encoder (``encoders.model_hash`` is recorded; see :func:`encode_image_files`).
        image_paths: the image files (e.g. :func:`iter_image_files`).
        local: detections folder, local-feature table or ``None`` (see :func:`encode_image_files`).
        batch_size: images per encoder call.
        storage: ``"fp32"`` or ``"fp16"``.
        progress: show a progress bar.
        root: ids are paths relative to this folder (recorded as ``index.image_root``).
        searcher: the image searcher's kind, or ``"auto"`` (exact up to
            :data:`~galr.runtime.index.searchers.AUTO_EXACT_LIMIT` images, approximate beyond).
        searcher_params: the kind's build settings.

    Returns:
        ``(index, skipped)``: the index of every readable image, and the images left out with why.

    Raises:
        InputError: see :func:`encode_image_files`; an unknown ``storage``.
    """
    index = new_index(encoders, len(image_paths), storage, root, searcher, searcher_params)  # checks settings first
    records, embeddings, skipped = encode_image_files(encoders, image_paths, local, batch_size, progress, root)
    if records:
        index.add(records, embeddings)
    return index, skipped


def new_index(encoders: Any, count: int, storage: str = "fp32", root: str | os.PathLike | None = None,
              searcher: str = "auto", searcher_params: Mapping[str, Any] | None = None) -> GalleryIndex:
    """An empty index for ``encoders``' model, its searcher chosen for about ``count`` images.

    An IVF searcher without an ``nlist`` gets the one that suits ``count``, so it trains as soon as
    its sample has arrived and a large build never holds all its vectors in memory waiting.

    Raises:
        InputError: an unknown ``storage``, searcher kind or searcher setting.
    """
    from galr.runtime.index.searchers.approximate import default_nlist

    checked_storage(storage)
    kind = resolve_searcher_kind(searcher, count)
    searcher_params = dict(searcher_params or {})
    if kind in ("ivf", "ivfpq") and searcher_params.get("nlist") is None and count > 0:
        searcher_params["nlist"] = default_nlist(count)
    info = getattr(encoders, "info", None)
    return GalleryIndex(encoders.model_hash, encoders.embed_dim, storage, built_with=getattr(info, "bundle", None),
                        image_root=os.path.abspath(root) if root is not None else None,
                        searcher=kind, searcher_params=searcher_params)


__all__ = ["IMAGE_SUFFIXES", "SkippedImage", "build_index", "encode_image_files", "image_id", "iter_image_files",
           "new_index", "scan_image_files"]
