"""The gallery index: image embeddings, their metadata and the MR text bank, in one ``.gidx`` file.

>>> engine = load_engine("galr.plan")                                    # doctest: +SKIP
>>> index, skipped = build_index(engine, iter_image_files("scenes/"), root="scenes/")
>>> index.save("gallery.gidx")
>>> result = load_index("gallery.gidx", engine.model_hash).search(engine.encode_text(["a harbour"]), k=10)
>>> result.ids[0][:3], result.scores[0][:3]

**Search** is exact: cosine scores are dot products of unit vectors, computed in float32 one block
of gallery rows at a time (so a float16 gallery is never converted as a whole), with the top ``k`` of
each block merged into a running top ``k``. Ties are broken by gallery position (the lower index
first), so results never depend on the block size or the device. With ``device="cuda"`` (or
``"auto"`` on a machine with CuPy and a GPU) the products and the per-block selection run on the GPU;
only the ``[q, k]`` block winners come back to the host.

**The file** (``.gidx``) is an uncompressed zip, so a reader can list and stream its members::

    embeddings.npy   [n, D] float32 or float16 (the index's storage), row i is records[i]
    text_bank.npy    [m, D] same dtype, the MR text bank (captions or past queries)
    records.json     [{"id", "path", "width", "height", "lat", "lon", "footprint", "extra"}, ...]
    text_bank.json   ["caption", ...]
    header.json      format + version, model_hash, embed_dim, storage, counts, timestamps,
                     galr version, the bundle that built it, and the SHA-256 and size of every member

It is written to a temporary file in the destination folder, fsynced and renamed over the old file,
so a crash or an error while saving leaves the previous index intact (a hard crash may leave a
``<name>.<random>.tmp`` file behind, which is safe to delete). :func:`load_index` refuses unknown
format versions, damaged or truncated files, members that fail their SHA-256, and (given the
engine's ``model_hash``) an index built by another model, since its embeddings would be
meaningless to that model's text encoder. ``.npy`` members are read with ``allow_pickle=False``.

**Editing** (:meth:`GalleryIndex.add`, :meth:`~GalleryIndex.remove`, :meth:`~GalleryIndex.update`)
happens in memory; call :meth:`~GalleryIndex.save` to persist. Searches may run from several
threads at once; edits need exclusive access.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, Sequence

import numpy as np
from numpy.lib import format as npy_format

from galr import __version__ as GALR_VERSION
from galr.atomic import atomic_output

FORMAT_NAME = "galr-index"
FORMAT_VERSION = 1
HEADER = "header.json"
EMBEDDINGS = "embeddings.npy"
RECORDS = "records.json"
TEXT_BANK_TEXTS = "text_bank.json"
TEXT_BANK_EMBEDDINGS = "text_bank.npy"
DATA_MEMBERS = (EMBEDDINGS, TEXT_BANK_EMBEDDINGS, RECORDS, TEXT_BANK_TEXTS)

STORAGE_DTYPES: dict[str, type[np.floating]] = {"fp32": np.float32, "fp16": np.float16}
SEARCH_DEVICES = ("auto", "cpu", "cuda")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})

#: Rows must have an L2 norm within this of 1 (engine outputs are normalised in float32).
UNIT_NORM_TOLERANCE = 1e-3

#: Elements in one working block of a search: the ``[q, block]`` scores and the float32 copy of the
#: ``[block, D]`` gallery rows each stay below this (64 MB of float32).
DEFAULT_BLOCK_ELEMENTS = 1 << 24

_MAX_HEADER_BYTES = 1 << 24
_RECORD_FIELDS = frozenset({"id", "path", "width", "height", "lat", "lon", "footprint", "extra"})
_REQUIRED_RECORD_FIELDS = frozenset({"id", "path", "width", "height"})
_REBUILD_HINT = "galr-index IMAGES --engine <bundle> -o {path}"


class IndexFormatError(ValueError):
    """An index file is missing, damaged, truncated, of an unknown version or lacks a member."""


class IndexModelMismatchError(ValueError):
    """An index was built with another model than the engine that wants to search it."""


# ---------------------------------------------------------------------------------------------
# Records and results


@dataclass(frozen=True)
class ImageRecord:
    """Metadata of one indexed image.

    Attributes:
        id: unique name of the image in the index (by default its path relative to the indexed folder).
        path: where the image file was when it was indexed.
        width: image width in pixels (0 when unknown).
        height: image height in pixels (0 when unknown).
        lat: latitude of the scene centre in degrees, if known.
        lon: longitude of the scene centre in degrees, if known.
        footprint: the scene outline as ``(lon, lat)`` pairs, if known.
        extra: anything else, as long as it is JSON (str keys; no NaN).
    """

    id: str
    path: str
    width: int
    height: int
    lat: float | None = None
    lon: float | None = None
    footprint: tuple[tuple[float, float], ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # Runs once per image (10^6 in a big gallery): the common case takes the fewest checks.
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"ImageRecord.id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.path, str):
            raise TypeError(f"ImageRecord {self.id!r}: path must be a string, got {type(self.path).__name__}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if type(value) is not int:
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    raise ValueError(f"ImageRecord {self.id!r}: {name} must be a non-negative integer, got {value!r}")
                object.__setattr__(self, name, int(value))
            if value < 0:
                raise ValueError(f"ImageRecord {self.id!r}: {name} must be a non-negative integer, got {value!r}")
        for name, limit in (("lat", 90.0), ("lon", 180.0)):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _coordinate(value, limit, f"ImageRecord {self.id!r}: {name}"))
        if self.footprint is not None:
            object.__setattr__(self, "footprint", _footprint(self.footprint, self.id))
        if not isinstance(self.extra, dict):
            raise TypeError(f"ImageRecord {self.id!r}: extra must be a dict with string keys")
        if self.extra:
            if not all(isinstance(key, str) for key in self.extra):
                raise TypeError(f"ImageRecord {self.id!r}: extra must be a dict with string keys")
            try:
                json.dumps(self.extra, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"ImageRecord {self.id!r}: extra is not JSON (str keys, no NaN): {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``footprint`` as a list of ``[lon, lat]`` lists)."""
        return {
            "id": self.id,
            "path": self.path,
            "width": self.width,
            "height": self.height,
            "lat": self.lat,
            "lon": self.lon,
            "footprint": [list(pair) for pair in self.footprint] if self.footprint is not None else None,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ImageRecord":
        """Inverse of :meth:`to_dict`; unknown keys are an error so a newer file is never half-read.

        Raises:
            ValueError: unknown or missing keys, or invalid values.
        """
        keys = values.keys()
        if not keys <= _RECORD_FIELDS:
            raise ValueError(f"unknown ImageRecord fields {sorted(keys - _RECORD_FIELDS)}; is this index from a newer galr?")
        if not _REQUIRED_RECORD_FIELDS <= keys:
            raise ValueError(f"ImageRecord lacks {sorted(_REQUIRED_RECORD_FIELDS - keys)}")
        if values.get("extra") is None:
            values = {**values, "extra": {}}
        return cls(**values)


def _coordinate(value: Any, limit: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or abs(number) > limit:
        raise ValueError(f"{name} must be a finite number in [-{limit:g}, {limit:g}] degrees, got {value!r}")
    return number


def _footprint(points: Any, record_id: str) -> tuple[tuple[float, float], ...]:
    try:
        pairs = [tuple(point) for point in points]
    except TypeError:
        raise TypeError(f"ImageRecord {record_id!r}: footprint must be a list of (lon, lat) pairs") from None
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"ImageRecord {record_id!r}: footprint must be a list of (lon, lat) pairs, got {points!r}")
    where = f"ImageRecord {record_id!r}: footprint"
    return tuple((_coordinate(lon, 180.0, f"{where} lon"), _coordinate(lat, 90.0, f"{where} lat")) for lon, lat in pairs)


@dataclass(frozen=True)
class SkippedImage:
    """An image that could not be indexed, and why."""

    path: str
    reason: str


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous
class SearchResult:
    """The ``k`` best gallery images of each query, best first.

    Attributes:
        scores: float32 ``[q, k]`` cosine similarities.
        indices: int64 ``[q, k]`` gallery positions (rows of :attr:`GalleryIndex.embeddings`).
        ids: the image ids of ``indices``, one list per query.
    """

    scores: np.ndarray
    indices: np.ndarray
    ids: list[list[str]]


# ---------------------------------------------------------------------------------------------
# Validation helpers


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _checked_embeddings(values: Any, rows: int | None, dim: int, name: str, *, unit_norm: bool) -> np.ndarray:
    """``values`` as float32 ``[rows, dim]``, refusing wrong shapes/dtypes, NaN/inf and non-unit rows."""
    array = np.asarray(values)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {array.dtype}")
    expected = f"[{rows if rows is not None else 'n'}, {dim}]"
    if array.ndim != 2 or array.shape[1] != dim or (rows is not None and array.shape[0] != rows):
        raise ValueError(f"{name} must have shape {expected}, got {array.shape}")
    array = array.astype(np.float32, copy=False)
    bad_rows = np.nonzero(~np.isfinite(array).all(axis=1))[0]
    if len(bad_rows):
        raise ValueError(f"{name} has NaN or inf in rows {bad_rows[:10].tolist()}; check the encoder outputs")
    if unit_norm:
        norms = np.linalg.norm(array, axis=1)
        off = np.nonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)[0]
        if len(off):
            raise ValueError(
                f"{name} rows {off[:10].tolist()} are not unit-norm (norms {np.round(norms[off[:3]], 4).tolist()}); "
                "L2-normalise them first (engine outputs already are)"
            )
    return array


def _checked_storage(storage: str) -> np.dtype:
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"storage must be one of {sorted(STORAGE_DTYPES)}, got {storage!r}")
    return np.dtype(STORAGE_DTYPES[storage])


def _duplicates(values: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    repeated: list[str] = []
    for value in values:
        if value in seen and value not in repeated:
            repeated.append(value)
        seen.add(value)
    return repeated


def _preview(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------
# Search helpers


def _array_module(device: str) -> ModuleType:
    """numpy or cupy for a search device; ``auto`` takes CuPy only when it sees a GPU."""
    if device not in SEARCH_DEVICES:
        raise ValueError(f"device must be one of {SEARCH_DEVICES}, got {device!r}")
    if device == "cpu":
        return np
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
        reason = "CuPy sees no GPU"
    except ImportError:
        reason = "CuPy is not installed (pip install 'galr[gpu]')"
    except Exception as exc:  # CUDA driver errors come in many types
        reason = f"CuPy cannot reach a GPU ({exc})"
    if device == "cuda":
        from galr.runtime.backends.device import BackendUnavailableError

        raise BackendUnavailableError(f"search on device='cuda' is not possible: {reason}; use device='cpu'")
    return np


def _top_k_block(xp: ModuleType, sims: Any, k: int) -> tuple[Any, Any]:
    """The ``k`` best columns of each row by (score desc, column asc), listed in column order.

    Returns:
        ``(scores [rows, k], columns [rows, k])`` in ``sims``' array module.
    """
    n_rows, n_cols = sims.shape
    if k >= n_cols:
        return sims, xp.broadcast_to(xp.arange(n_cols, dtype=xp.int64), (n_rows, n_cols))
    # Only the k-th best *value* of each row is taken from the partition: every larger value is in,
    # and values equal to it are taken lowest column first, so the choice among ties never depends
    # on the partition's internal order (numpy and CuPy order them differently).
    threshold = -xp.partition(-sims, k - 1, axis=1)[:, k - 1 : k]
    greater = sims > threshold
    equal = sims == threshold
    missing = k - greater.sum(axis=1)
    surplus = xp.nonzero(equal.sum(axis=1) > missing)[0]
    if len(surplus):
        tied = equal[surplus]
        equal[surplus] = tied & (xp.cumsum(tied, axis=1) <= missing[surplus][:, None])
    columns = xp.nonzero(greater | equal)[1].reshape(n_rows, k).astype(xp.int64)
    return xp.take_along_axis(sims, columns, axis=1), columns


def _merge_top_k(scores: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort candidates by (score desc, index asc) and keep the first ``k`` of each row."""
    order = np.lexsort((indices, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)


def _to_host(array: Any) -> np.ndarray:
    return array.get() if hasattr(array, "get") else np.asarray(array)


# ---------------------------------------------------------------------------------------------
# The index


class GalleryIndex:
    """Image embeddings with their records and the MR text bank, searchable exactly.

    Args:
        model_hash: identity of the model whose image encoder made the embeddings
            (``engine.model_hash``); indexes refuse engines of other models by it.
        embed_dim: embedding size ``D``.
        storage: ``"fp32"`` or ``"fp16"``: how embeddings are kept in memory and on disk
            (fp16 halves both; scores are always computed in float32).
        built_with: the bundle file that made the embeddings (shown when a model mismatch is refused).
        image_root: the folder image ids are relative to, if any (``galr-index --update`` reuses it).

    Raises:
        ValueError: empty ``model_hash``, non-positive ``embed_dim`` or unknown ``storage``.
    """

    def __init__(self, model_hash: str, embed_dim: int, storage: str = "fp32", *,
                 built_with: str | None = None, image_root: str | None = None) -> None:
        if not isinstance(model_hash, str) or not model_hash:
            raise ValueError(f"model_hash must be a non-empty string, got {model_hash!r}")
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, (int, np.integer)) or embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive integer, got {embed_dim!r}")
        self._dtype = _checked_storage(storage)
        self._storage = storage
        self._model_hash = model_hash
        self._embed_dim = int(embed_dim)
        self.built_with = built_with
        self.image_root = image_root
        self.galr_version = GALR_VERSION
        self.created = self.updated = _now()
        # Rows live in a buffer with spare capacity so that many small adds stay linear overall.
        self._buffer = np.zeros((0, self._embed_dim), dtype=self._dtype)
        self._size = 0
        self._records: list[ImageRecord] = []
        self._positions: dict[str, int] = {}
        self._bank_texts: list[str] = []
        self._bank_embeddings = np.zeros((0, self._embed_dim), dtype=self._dtype)
        self._version = 0  # bumped on every edit; keys the GPU copy of the gallery
        self._device_gallery: tuple[int, Any] | None = None

    # -- properties ---------------------------------------------------------------------------
    @property
    def model_hash(self) -> str:
        return self._model_hash

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def storage(self) -> str:
        return self._storage

    @property
    def ids(self) -> list[str]:
        """Image ids in gallery order (row ``i`` of :attr:`embeddings`)."""
        return [record.id for record in self._records]

    @property
    def records(self) -> tuple[ImageRecord, ...]:
        return tuple(self._records)

    @property
    def embeddings(self) -> np.ndarray:
        """Read-only ``[n, D]`` view of the stored embeddings, in the storage dtype."""
        view = self._buffer[: self._size]
        view.flags.writeable = False
        return view

    def image_embeddings(self) -> np.ndarray:
        """The gallery embeddings as float32 ``[n, D]`` (a copy when stored as fp16)."""
        return self.embeddings.astype(np.float32, copy=False)

    @property
    def text_bank_texts(self) -> list[str]:
        return list(self._bank_texts)

    @property
    def text_bank_embeddings(self) -> np.ndarray:
        """``[m, D]`` float32 embeddings of the text bank (MR's reverse-search rows); read-only, and
        a copy only when stored as fp16."""
        bank = self._bank_embeddings.astype(np.float32, copy=False)
        if bank is self._bank_embeddings:
            bank = bank.view()
            bank.flags.writeable = False
        return bank

    def __len__(self) -> int:
        return self._size

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._positions

    def __repr__(self) -> str:
        return (f"GalleryIndex({self._size} images, text bank {len(self._bank_texts)}, D={self._embed_dim}, "
                f"{self._storage}, model {self._model_hash[:12]})")

    def get(self, image_id: str) -> ImageRecord:
        """The record of one image.

        Raises:
            KeyError: no image with this id.
        """
        position = self._positions.get(image_id)
        if position is None:
            raise KeyError(f"no image with id {image_id!r} in the index ({self._size} images)")
        return self._records[position]

    def record_at(self, position: int) -> ImageRecord:
        """The record of row ``position`` of :attr:`embeddings` (e.g. a search result's index).

        Raises:
            IndexError: ``position`` is not a row of the index.
        """
        if not 0 <= position < self._size:
            raise IndexError(f"position {position} is outside the index's {self._size} rows")
        return self._records[position]

    def position(self, image_id: str) -> int:
        """Row of ``image_id`` in :attr:`embeddings` (positions change when images are removed)."""
        self.get(image_id)
        return self._positions[image_id]

    # -- editing ------------------------------------------------------------------------------
    def _touch(self) -> None:
        self._version += 1
        self._device_gallery = None
        self.updated = _now()

    def _checked_batch(self, records: Sequence[ImageRecord], embeddings: Any) -> tuple[list[ImageRecord], np.ndarray]:
        records = list(records)
        for record in records:
            if not isinstance(record, ImageRecord):
                raise TypeError(f"records must be ImageRecord objects, got {type(record).__name__}")
        repeated = _duplicates(record.id for record in records)
        if repeated:
            raise ValueError(f"the same id appears more than once in one call: {_preview(repeated)}")
        array = _checked_embeddings(embeddings, len(records), self._embed_dim, "embeddings", unit_norm=True)
        return records, array

    def _reserve(self, rows: int) -> None:
        if rows <= len(self._buffer):
            return
        grown = np.zeros((max(rows, len(self._buffer) * 3 // 2 + 16), self._embed_dim), dtype=self._dtype)
        grown[: self._size] = self._buffer[: self._size]
        self._buffer = grown

    def add(self, records: Sequence[ImageRecord], embeddings: Any, *, replace: bool = False) -> None:
        """Add images (appended at the end of the gallery).

        Args:
            records: one :class:`ImageRecord` per image, ids unique.
            embeddings: ``[len(records), D]`` unit-norm float embeddings.
            replace: overwrite images whose id is already indexed (in place, keeping their position)
                instead of refusing them.

        Raises:
            ValueError: ids already indexed (without ``replace``) or repeated in ``records``; bad
                embeddings (shape, NaN/inf, not unit-norm).
            TypeError: non-record items or non-float embeddings.
        """
        records, array = self._checked_batch(records, embeddings)
        existing = [i for i, record in enumerate(records) if record.id in self._positions]
        if existing and not replace:
            ids = [records[i].id for i in existing]
            raise ValueError(f"ids already in the index: {_preview(ids)}; "
                             "use update()/add(..., replace=True) (CLI: --update) to replace them")
        fresh = [i for i, record in enumerate(records) if record.id not in self._positions]
        for i in existing:
            position = self._positions[records[i].id]
            self._records[position] = records[i]
            self._buffer[position] = array[i]
        self._reserve(self._size + len(fresh))
        self._buffer[self._size : self._size + len(fresh)] = array if len(fresh) == len(records) else array[fresh]
        for offset, i in enumerate(fresh):
            self._records.append(records[i])
            self._positions[records[i].id] = self._size + offset
        self._size += len(fresh)
        self._touch()

    def update(self, records: Sequence[ImageRecord], embeddings: Any) -> None:
        """Replace indexed images (metadata and embedding) in place.

        Raises:
            KeyError: ids that are not in the index (all named).
            ValueError, TypeError: as :meth:`add`.
        """
        records = list(records)
        unknown = [r.id for r in records if isinstance(r, ImageRecord) and r.id not in self._positions]
        if unknown:
            raise KeyError(f"ids not in the index: {_preview(unknown)}; add() them instead")
        self.add(records, embeddings, replace=True)

    def remove(self, ids: Iterable[str]) -> None:
        """Remove images by id; the images after them move up.

        Raises:
            KeyError: ids that are not in the index (all named); nothing is removed then.
        """
        ids = list(dict.fromkeys([ids] if isinstance(ids, str) else ids))
        unknown = [image_id for image_id in ids if image_id not in self._positions]
        if unknown:
            raise KeyError(f"ids not in the index ({self._size} images): {_preview(unknown)}")
        keep = np.ones(self._size, dtype=bool)
        keep[[self._positions[image_id] for image_id in ids]] = False
        kept = int(keep.sum())
        self._buffer[:kept] = self._buffer[: self._size][keep]
        self._size = kept
        self._records = [record for record, kept_row in zip(self._records, keep) if kept_row]
        self._positions = {record.id: position for position, record in enumerate(self._records)}
        self._touch()

    def add_text_bank(self, texts: Sequence[str], embeddings: Any, *, replace: bool = False) -> None:
        """Add captions (or past queries) with their text embeddings to the MR text bank.

        MR's reverse search (``rerank_online``) compares each gallery image's score for a new query
        with its scores for these texts; a bank of the dataset's captions is the usual choice.

        Args:
            texts: the texts, one per embedding row.
            embeddings: ``[len(texts), D]`` unit-norm text embeddings from the same model.
            replace: drop the current bank first.

        Raises:
            ValueError: empty or non-string texts, or bad embeddings (as :meth:`add`).
        """
        texts = list(texts)
        for number, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text bank entry #{number} ({text!r}) must be a non-empty string")
        array = _checked_embeddings(embeddings, len(texts), self._embed_dim, "text bank embeddings", unit_norm=True)
        array = array.astype(self._dtype)
        if replace:
            self._bank_texts, self._bank_embeddings = texts, array
        else:
            self._bank_texts = self._bank_texts + texts
            self._bank_embeddings = np.concatenate([self._bank_embeddings, array])
        self._touch()

    # -- search -------------------------------------------------------------------------------
    def _checked_queries(self, query_embeddings: Any) -> np.ndarray:
        queries = _checked_embeddings(query_embeddings, None, self._embed_dim, "query_embeddings", unit_norm=False)
        return np.ascontiguousarray(queries)

    def _block_rows(self, n_queries: int, block_rows: int | None) -> int:
        if block_rows is None:
            return max(1, DEFAULT_BLOCK_ELEMENTS // max(n_queries, self._embed_dim))
        if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows < 1:
            raise ValueError(f"block_rows must be a positive integer, got {block_rows!r}")
        return int(block_rows)

    def _gallery_on(self, xp: ModuleType) -> Any:
        if xp is np:
            return self.embeddings
        # One device copy per index version, in the storage dtype (cast to float32 per block).
        if self._device_gallery is None or self._device_gallery[0] != self._version:
            self._device_gallery = (self._version, xp.asarray(self.embeddings))
        return self._device_gallery[1]

    def _score_blocks(self, queries: np.ndarray, device: str,
                      block_rows: int | None) -> Iterator[tuple[ModuleType, int, Any]]:
        """Yield ``(xp, first_row, scores [q, block] float32)`` over the gallery."""
        xp = _array_module(device)
        gallery = self._gallery_on(xp)
        device_queries = xp.asarray(queries)
        step = self._block_rows(len(queries), block_rows)
        for start in range(0, self._size, step):
            block = gallery[start : start + step].astype(xp.float32, copy=False)
            yield xp, start, device_queries @ block.T

    def search(self, query_embeddings: Any, k: int = 10, *, device: str = "auto",
               block_rows: int | None = None) -> SearchResult:
        """Exact top-``k`` gallery images of each query by cosine similarity.

        Args:
            query_embeddings: float ``[q, D]`` query embeddings (unit-norm for cosine scores), e.g.
                ``engine.encode_text([...])``.
            k: results per query; capped at the gallery size.
            device: ``"cpu"``, ``"cuda"`` (CuPy) or ``"auto"`` (CuPy when it sees a GPU).
            block_rows: gallery rows scored at a time (default: about ``DEFAULT_BLOCK_ELEMENTS`` scores).

        Returns:
            SearchResult with ``[q, min(k, n)]`` scores (float32, descending, ties by gallery position),
            indices (int64) and ids.

        Raises:
            ValueError: bad query shape/values, ``k < 1`` or an unknown device.
            TypeError: non-float queries.
            BackendUnavailableError: ``device="cuda"`` without CuPy or a GPU.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        queries = self._checked_queries(query_embeddings)
        k = min(int(k), self._size)
        best_scores = np.zeros((len(queries), 0), dtype=np.float32)
        best_indices = np.zeros((len(queries), 0), dtype=np.int64)
        for xp, start, scores in self._score_blocks(queries, device, block_rows):
            block_scores, columns = _top_k_block(xp, scores, k)
            candidates = np.concatenate([best_scores, _to_host(block_scores)], axis=1)
            positions = np.concatenate([best_indices, _to_host(columns) + start], axis=1)
            best_scores, best_indices = _merge_top_k(candidates, positions, k)
        records = self._records  # not self.ids: that list of every id cost ~40 ms per call at 1M images
        return SearchResult(best_scores.astype(np.float32), best_indices.astype(np.int64),
                            [[records[i].id for i in row] for row in best_indices.tolist()])

    def similarity_matrix(self, query_embeddings: Any, *, device: str = "auto",
                          block_rows: int | None = None) -> np.ndarray:
        """All query x gallery cosine scores (what MR's ``rerank_online`` takes).

        Args:
            query_embeddings: float ``[q, D]``.
            device: as :meth:`search`.
            block_rows: as :meth:`search`.

        Returns:
            float32 ``[q, n]`` on the host.

        Raises:
            ValueError, TypeError, BackendUnavailableError: as :meth:`search`.
        """
        queries = self._checked_queries(query_embeddings)
        out = np.empty((len(queries), self._size), dtype=np.float32)
        for _, start, scores in self._score_blocks(queries, device, block_rows):
            out[:, start : start + scores.shape[1]] = _to_host(scores)
        return out

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to one ``.gidx`` file, atomically (see the module docstring).

        Returns:
            The written path.
        """
        return _write_index(self, Path(path))

    @classmethod
    def _from_file(cls, header: Mapping[str, Any], records: list[ImageRecord], embeddings: np.ndarray,
                   texts: list[str], bank: np.ndarray) -> "GalleryIndex":
        index = cls(header["model_hash"], header["embed_dim"], header["storage"],
                    built_with=header.get("built_with"), image_root=header.get("image_root"))
        index._buffer, index._size = embeddings, len(embeddings)
        index._records = records
        index._positions = {record.id: position for position, record in enumerate(records)}
        index._bank_texts, index._bank_embeddings = texts, bank
        index.galr_version = str(header.get("galr_version", ""))
        index.created, index.updated = str(header.get("created", "")), str(header.get("updated", ""))
        return index


# ---------------------------------------------------------------------------------------------
# File format


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, target: BinaryIO) -> None:
        self._target, self.sha256, self.size = target, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._target.write(data)


class _HashingReader:
    """A read-only file object that hashes what is read from it."""

    def __init__(self, source: BinaryIO) -> None:
        self._source, self.sha256 = source, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _write_array_member(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> dict[str, Any]:
    # Streamed into the zip, so a large gallery is never held twice in memory.
    with archive.open(name, "w", force_zip64=True) as member:
        writer = _HashingWriter(member)
        npy_format.write_array(writer, np.ascontiguousarray(array), allow_pickle=False)
    return {"sha256": writer.sha256.hexdigest(), "size": writer.size}


def _write_json_member(archive: zipfile.ZipFile, name: str, payload: Any, indent: int | None = None) -> dict[str, Any]:
    # Compact by default: only then does json use its C encoder (10x faster on 10^6 records).
    data = json.dumps(payload, indent=indent, separators=None if indent else (",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")
    archive.writestr(name, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _write_index(index: GalleryIndex, path: Path) -> Path:
    with atomic_output(path) as handle:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
            members = {
                EMBEDDINGS: _write_array_member(archive, EMBEDDINGS, index.embeddings),
                TEXT_BANK_EMBEDDINGS: _write_array_member(archive, TEXT_BANK_EMBEDDINGS, index._bank_embeddings),
                RECORDS: _write_json_member(archive, RECORDS, [r.to_dict() for r in index.records]),
                TEXT_BANK_TEXTS: _write_json_member(archive, TEXT_BANK_TEXTS, index.text_bank_texts),
            }
            header = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "model_hash": index.model_hash,
                "embed_dim": index.embed_dim,
                "storage": index.storage,
                "count": len(index),
                "text_bank_count": len(index.text_bank_texts),
                "built_with": index.built_with,
                "image_root": index.image_root,
                "galr_version": index.galr_version,
                "created": index.created,
                "updated": index.updated,
                "members": members,
            }
            _write_json_member(archive, HEADER, header, indent=1)  # the one member people read
    return path


def _damaged(path: Path, what: str) -> IndexFormatError:
    return IndexFormatError(f"{path}: {what}; the file is damaged or was not copied completely. "
                            f"Copy it again or rebuild it with `{_REBUILD_HINT.format(path=path)}`")


def _read_header(path: Path, archive: zipfile.ZipFile) -> dict[str, Any]:
    try:
        info = archive.getinfo(HEADER)
    except KeyError:
        raise IndexFormatError(f"{path}: no {HEADER}; this is not a galr index (build one with "
                               f"`{_REBUILD_HINT.format(path=path)}`)") from None
    if info.file_size > _MAX_HEADER_BYTES:
        raise _damaged(path, f"{HEADER} is implausibly large ({info.file_size} bytes)")
    try:
        header = json.loads(archive.read(HEADER).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, f"{HEADER} is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        found = header.get("format") if isinstance(header, dict) else None
        raise IndexFormatError(f"{path}: not a galr index ({HEADER} says format {found!r})")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: index format version {version!r} is not supported by this galr {GALR_VERSION} "
            f"(it reads version {FORMAT_VERSION}); upgrade galr, or rebuild the index with this one: "
            f"`{_REBUILD_HINT.format(path=path)}`"
        )
    required = ("model_hash", "embed_dim", "storage", "count", "text_bank_count", "members")
    lacking = [key for key in required if key not in header]
    if lacking:
        raise _damaged(path, f"{HEADER} lacks {lacking}")
    counts = {key: header[key] for key in ("embed_dim", "count", "text_bank_count")}
    if any(isinstance(value, bool) or not isinstance(value, int) or value < 0 for value in counts.values()) or \
            counts["embed_dim"] < 1 or not isinstance(header["model_hash"], str) or not header["model_hash"] or \
            not isinstance(header["members"], dict) or not all(isinstance(v, dict) for v in header["members"].values()):
        raise _damaged(path, f"{HEADER} has invalid model_hash, sizes or member table")
    if header["storage"] not in STORAGE_DTYPES:
        raise IndexFormatError(f"{path}: unknown storage {header['storage']!r} (this galr knows {sorted(STORAGE_DTYPES)})")
    names = set(archive.namelist())
    missing = [name for name in DATA_MEMBERS if name not in names or name not in header["members"]]
    if missing:
        raise _damaged(path, f"members {missing} are missing")
    return header


def _read_verified(path: Path, archive: zipfile.ZipFile, header: Mapping[str, Any], name: str, parse) -> Any:
    """Parse one member from a hashing stream and check its SHA-256 against the header."""
    with archive.open(name) as member:
        reader = _HashingReader(member)
        try:
            value = parse(reader)
        except ValueError as exc:  # also json.JSONDecodeError; npy headers and pickled arrays
            raise _damaged(path, f"member {name} cannot be parsed ({exc})") from None
        reader.drain()
    if reader.sha256.hexdigest() != header["members"][name].get("sha256"):
        raise _damaged(path, f"member {name} fails its SHA-256 check")
    return value


def _read_array(stream: BinaryIO) -> np.ndarray:
    return npy_format.read_array(stream, allow_pickle=False)


def _read_json(stream: BinaryIO) -> Any:
    return json.loads(stream.read().decode("utf-8"))


def _check_array(path: Path, name: str, array: np.ndarray, rows: int, header: Mapping[str, Any]) -> np.ndarray:
    dtype = np.dtype(STORAGE_DTYPES[header["storage"]])
    shape = (rows, int(header["embed_dim"]))
    if array.dtype != dtype or array.shape != shape:
        raise _damaged(path, f"{name} is {array.dtype} {array.shape}, the header says {dtype} {shape}")
    return array


def _parse_records(path: Path, payload: Any, count: int) -> list[ImageRecord]:
    if not isinstance(payload, list) or len(payload) != count:
        raise _damaged(path, f"{RECORDS} should list {count} records")
    try:
        records = [ImageRecord.from_dict(item) for item in payload]
    except (TypeError, ValueError) as exc:
        raise IndexFormatError(f"{path}: {RECORDS} has an invalid record ({exc})") from None
    repeated = _duplicates(record.id for record in records)
    if repeated:
        raise _damaged(path, f"{RECORDS} repeats ids {_preview(repeated)}")
    return records


def load_index(path: str | os.PathLike, expected_model_hash: str | None = None) -> GalleryIndex:
    """Read a ``.gidx`` file, checking its format version and every member's SHA-256.

    Args:
        path: the index file.
        expected_model_hash: ``engine.model_hash`` of the engine that will search it; an index built
            by another model is refused. ``None`` skips the check (e.g. to only remove images).

    Returns:
        The index.

    Raises:
        FileNotFoundError: no such file.
        IndexFormatError: not an index, unknown format version, truncated or corrupt file, a missing
            member or one that fails its checksum (the message says what to do).
        IndexModelMismatchError: built by another model than ``expected_model_hash``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index not found: {path}; build it with `{_REBUILD_HINT.format(path=path)}`")
    try:
        with zipfile.ZipFile(path) as archive:
            header = _read_header(path, archive)
            if expected_model_hash is not None and header["model_hash"] != expected_model_hash:
                raise IndexModelMismatchError(
                    f"{path} was built with model {header['model_hash'][:16]} "
                    f"(bundle {header.get('built_with') or 'unknown'}), "
                    f"but this engine runs model {expected_model_hash[:16]}; its embeddings cannot be compared. "
                    f"Rebuild the index with this engine: `{_REBUILD_HINT.format(path=path)}`"
                )
            count, bank_count = int(header["count"]), int(header["text_bank_count"])
            embeddings = _check_array(path, EMBEDDINGS, _read_verified(path, archive, header, EMBEDDINGS, _read_array),
                                      count, header)
            bank = _check_array(path, TEXT_BANK_EMBEDDINGS,
                                _read_verified(path, archive, header, TEXT_BANK_EMBEDDINGS, _read_array), bank_count, header)
            records = _parse_records(path, _read_verified(path, archive, header, RECORDS, _read_json), count)
            texts = _read_verified(path, archive, header, TEXT_BANK_TEXTS, _read_json)
    except zipfile.BadZipFile as exc:
        raise _damaged(path, f"not a readable zip archive ({exc})") from None
    except (EOFError, OSError) as exc:
        raise _damaged(path, f"reading failed ({exc})") from None
    if not isinstance(texts, list) or len(texts) != bank_count or not all(isinstance(t, str) for t in texts):
        raise _damaged(path, f"{TEXT_BANK_TEXTS} should list {bank_count} strings")
    return GalleryIndex._from_file(header, records, embeddings, texts, bank)


# ---------------------------------------------------------------------------------------------
# Building from image files


def iter_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder``, recursively, sorted by path.

    Args:
        folder: the folder to scan; files with suffixes in :data:`IMAGE_SUFFIXES` (any case) count.

    Returns:
        The image paths (``folder`` joined with their relative paths).

    Raises:
        NotADirectoryError: ``folder`` is not a folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder of images")
    found = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_text_lines(path: str | os.PathLike) -> list[str]:
    """Captions from a text file: one per line, blank lines and ``#`` comments ignored.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not UTF-8 text.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such text file")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: drop a BOM left by editors
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc}); save it as UTF-8, one caption per line") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def image_id(path: str | os.PathLike, root: str | os.PathLike | None) -> str:
    """The default id of an image: its path relative to ``root`` (POSIX separators), or as given.

    Raises:
        ValueError: ``path`` is not inside ``root``.
    """
    if root is None:
        return Path(path).as_posix()
    absolute, base = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        raise ValueError(f"{path} is not inside the image root {root}; give another root (CLI: --root)") from None


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


def _encode_batch(engine: Any, batch: list[Path], local: Any, errors: tuple[type[BaseException], ...]
                  ) -> tuple[list[int], np.ndarray, list[SkippedImage]]:
    """Encode a batch; when one file fails the call, encode its images one by one to find it."""
    try:
        return list(range(len(batch))), engine.encode_images(batch, local=local), []
    except errors as exc:
        if len(batch) == 1:
            return [], np.zeros((0, engine.embed_dim), np.float32), [SkippedImage(str(batch[0]), str(exc))]
    kept, rows, skipped = [], [], []
    for position, path in enumerate(batch):
        one_kept, one_row, one_skipped = _encode_batch(engine, [path], local, errors)
        if one_kept:
            kept.append(position)
            rows.append(one_row)
        skipped.extend(one_skipped)
    return kept, np.concatenate(rows) if rows else np.zeros((0, engine.embed_dim), np.float32), skipped


def _check_local(local: Any) -> None:
    if local is None or hasattr(local, "lookup"):
        return
    if isinstance(local, (str, os.PathLike)):
        if not Path(local).is_dir():
            raise NotADirectoryError(f"{local}: detections folder not found")
        return
    raise TypeError(f"local must be a detections folder, a local-feature table or None, got {type(local).__name__}")


def encode_image_files(engine: Any, image_paths: Sequence[str | os.PathLike], local: Any = None,
                       batch_size: int = 32, progress: bool = True, root: str | os.PathLike | None = None
                       ) -> tuple[list[ImageRecord], np.ndarray, list[SkippedImage]]:
    """Encode image files in batches into records and embeddings, skipping unreadable ones.

    Args:
        engine: a :class:`~galr.runtime.encoders.GaLREngine` (or anything with ``encode_images``
            and ``embed_dim``).
        image_paths: the image files; each id (:func:`image_id`) must be unique.
        local: DREA input passed to every ``engine.encode_images`` call: a detections folder, an
            original local-feature table (``load_local_file``) or ``None`` (no-detection fallback).
        batch_size: images per engine call.
        progress: show a tqdm bar (images/s) on stderr.
        root: ids are paths relative to this folder; ``None`` keeps the paths as given.

    Returns:
        ``(records, embeddings [len(records), D] float32, skipped)``; ``skipped`` lists unreadable or
        corrupt images (and images absent from a local-feature table) with the reason.

    Raises:
        ValueError: repeated ids, a path outside ``root``, ``batch_size < 1``, or engine outputs of
            the wrong shape.
        NotADirectoryError: ``local`` names a folder that does not exist.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_local(local)
    paths = [Path(p) for p in image_paths]
    ids = [image_id(p, root) for p in paths]
    repeated = _duplicates(ids)
    if repeated:
        raise ValueError(f"these image ids occur twice: {_preview(repeated)}; each image may be indexed once")
    errors = _per_image_errors()
    config = getattr(engine, "image_config", None)
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
            kept, embeddings, failed = _encode_batch(engine, batch, local, errors) if batch else ([], None, [])
            skipped.extend(failed)
            if kept:
                parts.append(_checked_embeddings(embeddings, len(kept), engine.embed_dim,
                                                 "engine.encode_images output", unit_norm=True))
                for position in kept:
                    name, (width, height) = sizes[position]
                    records.append(ImageRecord(name, os.path.abspath(batch[position]), width, height))
            bar.update(min(batch_size, len(paths) - start))
            bar.set_postfix(skipped=len(skipped), refresh=False)
    embeddings = np.concatenate(parts) if parts else np.zeros((0, engine.embed_dim), np.float32)
    return records, embeddings, skipped


def build_index(engine: Any, image_paths: Sequence[str | os.PathLike], local: Any = None, batch_size: int = 32,
                storage: str = "fp32", progress: bool = True, root: str | os.PathLike | None = None
                ) -> tuple[GalleryIndex, list[SkippedImage]]:
    """Encode image files into a new index.

    Args:
        engine: the encoder (``engine.model_hash`` is recorded; see :func:`encode_image_files`).
        image_paths: the image files (e.g. :func:`iter_image_files`).
        local: detections folder, local-feature table or ``None`` (see :func:`encode_image_files`).
        batch_size: images per engine call.
        storage: ``"fp32"`` or ``"fp16"``.
        progress: show a progress bar.
        root: ids are paths relative to this folder (recorded as ``index.image_root``).

    Returns:
        ``(index, skipped)``: the index of every readable image, and the images left out with why.

    Raises:
        ValueError: see :func:`encode_image_files`; an unknown ``storage``.
    """
    _checked_storage(storage)
    records, embeddings, skipped = encode_image_files(engine, image_paths, local, batch_size, progress, root)
    info = getattr(engine, "info", None)
    index = GalleryIndex(engine.model_hash, engine.embed_dim, storage,
                         built_with=getattr(info, "bundle", None),
                         image_root=os.path.abspath(root) if root is not None else None)
    if records:
        index.add(records, embeddings)
    return index, skipped


__all__ = [
    "DEFAULT_BLOCK_ELEMENTS",
    "FORMAT_VERSION",
    "IMAGE_SUFFIXES",
    "GalleryIndex",
    "ImageRecord",
    "IndexFormatError",
    "IndexModelMismatchError",
    "SearchResult",
    "SkippedImage",
    "build_index",
    "encode_image_files",
    "image_id",
    "iter_image_files",
    "load_index",
    "read_text_lines",
]
