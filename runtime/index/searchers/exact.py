"""Exact search: every stored row scored against every query, one block of rows at a time.

Scores are dot products computed in float32, one block of stored rows at a time (so a float16 store
is never converted as a whole), and the top ``k`` of each block are merged into a running top ``k``.
Ties are broken by gallery order (the earlier row first), so results never depend on the block size
or the device. With ``device="cuda"`` (or ``"auto"`` on a machine with CuPy and a GPU) the products
and the per-block selection run on the GPU; only the ``[q, k]`` block winners come back to the host.

float16 rows on the CPU: numpy has no fast float16 path (converting a block costs more than scoring
it), so where FAISS is installed the rows live in a FAISS fp16 scalar-quantiser index, whose SIMD
loop converts and scores in one pass: at 10^6 x 512 that is as fast as the float32 scan (see
BENCHMARKS.md section 2). The search asks FAISS for a few more rows than ``k`` and orders them by
(score, gallery order) itself; a query whose ties reach past that short list is answered by the
block scan, so the tie rule above holds on both paths. FAISS cannot scan a memory map, so an fp16
index opened with ``mapped=True`` is copied into memory by its first CPU search.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType
from typing import Any, Iterator, Mapping

import numpy as np

from galr.container import ContainerReader, ContainerWriter
from galr.errors import InputError
from galr.runtime.backends.base import BackendUnavailableError
from galr.runtime.index.vectors import checked_storage

SEARCH_DEVICES = ("auto", "cpu", "cuda")

#: Elements in one working block of a search: the ``[q, block]`` scores and the float32 copy of the
#: ``[block, D]`` stored rows each stay below this (64 MB of float32).
DEFAULT_BLOCK_ELEMENTS = 1 << 24

KEYS_MEMBER, VECTORS_MEMBER = "keys.npy", "vectors.npy"

#: Extra rows asked of FAISS beyond ``k`` (fp16 path), so ties at the k-th score can be ordered here.
TIE_MARGIN = 16


def _faiss_or_none() -> ModuleType | None:
    """FAISS if installed: it is optional (``galr[faiss]``), only a faster fp16 scan here."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


class _KeepAlive:
    """Hands numpy a raw buffer and keeps its owner (a FAISS index) alive while any view of it exists."""

    def __init__(self, raw: np.ndarray, owner: Any) -> None:
        self.__array_interface__ = raw.__array_interface__
        self.owner = owner


def _faiss_fp16_rows(faiss: ModuleType, capacity: int, dim: int) -> tuple[Any, np.ndarray]:
    """A FAISS fp16 flat index with room for ``capacity`` rows, and a float16 ``[capacity, dim]`` view of them.

    The index is never resized after this (a resize would move the rows under the view); growing
    makes a new one. numpy holds the index through the view's base, so old views stay valid.
    """
    index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    index.codes.resize(capacity * dim * 2)
    raw = faiss.rev_swig_ptr(index.codes.data(), capacity * dim * 2) if capacity else np.zeros(0, np.uint8)
    view = np.asarray(_KeepAlive(raw, index)).view(np.float16).reshape(capacity, dim)
    return index, view


@lru_cache(maxsize=1)
def _search_gpu() -> tuple[ModuleType | None, str]:
    """CuPy when it sees a GPU, else why not; probed once per process (a failed ``import cupy`` is
    not cached by Python and costs a path search on every query batch)."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy, ""
        return None, "CuPy sees no GPU"
    except ImportError:
        return None, "CuPy is not installed (pip install 'galr[gpu]')"
    except Exception as exc:  # CUDA driver errors come in many types
        return None, f"CuPy cannot reach a GPU ({exc})"


def array_module(device: str) -> ModuleType:
    """numpy or cupy for a search device; ``auto`` takes CuPy only when it sees a GPU.

    Raises:
        ValueError: an unknown device.
        BackendUnavailableError: ``device="cuda"`` without CuPy or a GPU.
    """
    if device not in SEARCH_DEVICES:
        raise InputError(f"device must be one of {SEARCH_DEVICES}, got {device!r}")
    if device == "cpu":
        return np
    cupy, reason = _search_gpu()
    if cupy is not None:
        return cupy
    if device == "cuda":
        raise BackendUnavailableError(f"search on device='cuda' is not possible: {reason}; use device='cpu'")
    return np


def aligned_rows(rows: np.ndarray) -> np.ndarray:
    """``rows`` as they are, or an aligned copy of a misaligned memory map (an index file written before
    galr aligned its arrays): numpy multiplies misaligned float32 without BLAS, about x5 slower."""
    return rows if rows.flags.aligned else np.array(rows, dtype=rows.dtype)


def top_k_block(xp: ModuleType, sims: Any, k: int) -> tuple[Any, Any]:
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


def merge_top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort candidates by (score desc, row asc) and keep the first ``k`` of each query."""
    order = np.lexsort((rows, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


def to_host(array: Any) -> np.ndarray:
    return array.get() if hasattr(array, "get") else np.asarray(array)


class ExactSearcher:
    """All vectors in memory (fp32 or fp16 storage), searched exactly on the CPU or a GPU.

    Args:
        dim: vector size.
        storage: ``"fp32"`` or ``"fp16"`` (halves memory; scores are computed in float32).
    """

    kind = "exact"

    def __init__(self, dim: int, storage: str = "fp32") -> None:
        self.dim = int(dim)
        self.storage = storage
        self._dtype = checked_storage(storage)
        # Rows live in buffers with spare capacity so that many small adds stay linear overall.
        self._vectors = np.zeros((0, self.dim), dtype=self._dtype)
        self._keys = np.zeros(0, dtype=np.int64)
        self._size = 0
        self._row_of: dict[int, int] = {}
        self._version = 0  # bumped on every edit; keys the device copy
        self._device_copy: tuple[int, Any] | None = None
        # fp16 with FAISS: the FAISS index whose codes are ``_vectors`` (None until rows move in).
        self._faiss = _faiss_or_none() if self._dtype == np.float16 else None
        self._scan_index: Any = None

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"ExactSearcher({self._size} x {self.dim}, {self.storage})"

    @property
    def keys(self) -> np.ndarray:
        view = self._keys[: self._size]
        view.flags.writeable = False
        return view

    @property
    def vectors(self) -> np.ndarray:
        """Read-only ``[len, dim]`` view of the stored rows, in the storage dtype."""
        view = self._vectors[: self._size]
        view.flags.writeable = False
        return view

    # -- editing ------------------------------------------------------------------------------
    def _touch(self) -> None:
        self._version += 1
        self._device_copy = None

    def _rows(self, keys: np.ndarray) -> np.ndarray:
        try:
            return np.fromiter((self._row_of[int(key)] for key in keys), dtype=np.int64, count=len(keys))
        except KeyError as exc:
            raise KeyError(f"key {exc.args[0]} is not in the searcher") from None

    def _reserve(self, rows: int) -> None:
        if rows <= len(self._vectors):
            return
        self._move_rows(max(rows, len(self._vectors) * 3 // 2 + 16))

    def _move_rows(self, capacity: int) -> None:
        """New buffers of ``capacity`` rows holding the current ones (in FAISS's memory for fp16 with FAISS)."""
        if self._faiss is not None:
            self._scan_index, vectors = _faiss_fp16_rows(self._faiss, capacity, self.dim)
        else:
            vectors = np.zeros((capacity, self.dim), dtype=self._dtype)
        vectors[: self._size] = self._vectors[: self._size]
        keys = np.zeros(capacity, dtype=np.int64)
        keys[: self._size] = self._keys[: self._size]
        self._vectors, self._keys = vectors, keys

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        taken = [int(key) for key in keys if int(key) in self._row_of]
        if taken or len(set(keys.tolist())) != len(keys):
            raise KeyError(f"keys already present or repeated: {taken[:5] or 'repeated in the call'}")
        count = len(keys)
        self._reserve(self._size + count)
        self._vectors[self._size : self._size + count] = vectors
        self._keys[self._size : self._size + count] = keys
        for offset, key in enumerate(keys.tolist()):
            self._row_of[key] = self._size + offset
        self._size += count
        self._touch()

    def _own_rows(self) -> None:
        """Copy memory-mapped rows (a file opened with ``mapped=True``) before editing them."""
        if not self._vectors.flags.writeable:
            self._move_rows(self._size)

    def replace(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self._own_rows()
        self._vectors[self._rows(np.asarray(keys, dtype=np.int64))] = vectors
        self._touch()

    def remove(self, keys: np.ndarray) -> None:
        self._own_rows()
        keep = np.ones(self._size, dtype=bool)
        keep[self._rows(np.asarray(keys, dtype=np.int64))] = False
        kept = int(keep.sum())
        self._vectors[:kept] = self._vectors[: self._size][keep]
        self._keys[:kept] = self._keys[: self._size][keep]
        self._size = kept
        self._row_of = {int(key): row for row, key in enumerate(self._keys[:kept].tolist())}
        self._touch()

    # -- search -------------------------------------------------------------------------------
    def _block_rows(self, n_queries: int, block_rows: int | None) -> int:
        if block_rows is None:
            return max(1, DEFAULT_BLOCK_ELEMENTS // max(n_queries, self.dim))
        if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows < 1:
            raise InputError(f"block_rows must be a positive integer, got {block_rows!r}")
        return int(block_rows)

    def _stored_on(self, xp: ModuleType) -> Any:
        if xp is np:
            return self.vectors
        # One device copy per version, in the storage dtype (cast to float32 per block).
        if self._device_copy is None or self._device_copy[0] != self._version:
            self._device_copy = (self._version, xp.asarray(self.vectors))
        return self._device_copy[1]

    def _score_blocks(self, queries: np.ndarray, device: str, block_rows: int | None) -> Iterator[tuple[ModuleType, int, Any]]:
        """Yield ``(xp, first_row, scores [q, block] float32)`` over the stored rows."""
        xp = array_module(device)
        stored = self._stored_on(xp)
        device_queries = xp.asarray(np.ascontiguousarray(queries, dtype=np.float32))
        step = self._block_rows(len(queries), block_rows)
        for start in range(0, self._size, step):
            block = stored[start : start + step].astype(xp.float32, copy=False)
            yield xp, start, device_queries @ (aligned_rows(block) if xp is np else block).T

    def search(self, queries: np.ndarray, k: int, *, device: str = "auto", block_rows: int | None = None,
               allowed: np.ndarray | None = None, **params: Any) -> tuple[np.ndarray, np.ndarray]:
        """Exact top ``k`` per query (ties by gallery order); ``block_rows`` stored rows are scored at a time.

        ``allowed`` (keys) restricts the search to those rows inside the scan: the result is the true
        top ``k`` among them (fewer when fewer are allowed), not a filtered top ``k`` of everything.

        Raises:
            InputError: approximate-search settings (``nprobe``, ``ef``, ``rerank``) given to exact search.
        """
        if params:
            raise InputError(f"this index is searched exactly: {sorted(params)} apply to ivf, ivfpq and hnsw "
                             "indexes only (build one with galr-index --search, or leave the setting out)")
        usable = None if allowed is None else np.isin(self._keys[: self._size], np.asarray(allowed, np.int64))
        k = min(int(k), self._size if usable is None else int(usable.sum()))
        if k == 0:
            return np.zeros((len(queries), 0), dtype=np.float32), np.zeros((len(queries), 0), dtype=np.int64)
        xp = array_module(device)
        if xp is np and self._faiss is not None:
            scores, rows = self._faiss_top_k(queries, k, usable)
            undecided = np.nonzero(rows[:, -1] < 0)[0]  # ties ran past FAISS's short list
            if len(undecided):
                scores[undecided], rows[undecided] = self._block_top_k(queries[undecided], k, usable, device,
                                                                       block_rows)
        else:
            scores, rows = self._block_top_k(queries, k, usable, device, block_rows)
        return scores.astype(np.float32), self._keys[rows]

    def _block_top_k(self, queries: np.ndarray, k: int, usable: np.ndarray | None, device: str,
                     block_rows: int | None) -> tuple[np.ndarray, np.ndarray]:
        best_scores = np.zeros((len(queries), 0), dtype=np.float32)
        best_rows = np.zeros((len(queries), 0), dtype=np.int64)
        for xp, start, scores in self._score_blocks(queries, device, block_rows):
            if usable is not None:
                blocked = ~usable[start : start + scores.shape[1]]
                if blocked.all():
                    continue
                scores[:, xp.asarray(blocked)] = -np.inf
            block_scores, columns = top_k_block(xp, scores, min(k, scores.shape[1]))
            candidates = np.concatenate([best_scores, to_host(block_scores)], axis=1)
            rows = np.concatenate([best_rows, to_host(columns) + start], axis=1)
            best_scores, best_rows = merge_top_k(candidates, rows, k)
        return best_scores, best_rows

    def _faiss_top_k(self, queries: np.ndarray, k: int, usable: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` rows by FAISS's fp16 scan, ordered by (score desc, row asc).

        Rows are ``-1`` for a query whose k-th score is shared beyond the short list FAISS returned
        (the caller answers those by the block scan).
        """
        faiss = self._faiss
        if self._scan_index is None or not self._vectors.flags.writeable:
            self._move_rows(self._size)  # rows move into FAISS's memory (a memory map is copied)
        index = self._scan_index
        index.ntotal = self._size  # the index has spare capacity; only the first _size rows are rows
        available = self._size if usable is None else int(usable.sum())
        wide = min(available, k + TIE_MARGIN)
        params = None
        if usable is not None:
            bits = np.packbits(usable, bitorder="little")
            params = faiss.SearchParameters()
            params.sel = faiss.IDSelectorBitmap(self._size, faiss.swig_ptr(bits))
        scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), wide, params=params)
        order = np.lexsort((rows, -scores), axis=-1)
        scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
        if wide < available:
            rows[scores[:, wide - 1] == scores[:, k - 1], k - 1] = -1
        return scores[:, :k].copy(), rows[:, :k].copy()

    def scores(self, queries: np.ndarray, *, device: str = "auto", block_rows: int | None = None) -> np.ndarray:
        out = np.empty((len(queries), self._size), dtype=np.float32)
        for _, start, scores in self._score_blocks(queries, device, block_rows):
            if scores.shape[1] == self._size:  # one block holds every row: it is the answer (no copy)
                return to_host(scores)
            out[:, start : start + scores.shape[1]] = to_host(scores)
        return out

    def reconstruct(self, keys: np.ndarray) -> np.ndarray:
        return self._vectors[self._rows(np.asarray(keys, dtype=np.int64).reshape(-1))].astype(np.float32)

    # -- persistence --------------------------------------------------------------------------
    def save(self, writer: ContainerWriter, prefix: str) -> dict[str, Any]:
        writer.write_array(prefix + KEYS_MEMBER, self.keys)
        writer.write_array(prefix + VECTORS_MEMBER, self.vectors)
        return {}

    @classmethod
    def load(cls, reader: ContainerReader, entries: Mapping[str, Any], prefix: str, *, dim: int, storage: str,
             count: int, params: Mapping[str, Any]) -> "ExactSearcher":
        searcher = cls(dim, storage)
        keys = reader.read_array(prefix + KEYS_MEMBER, entries[prefix + KEYS_MEMBER], np.int64, (count,))
        vectors = reader.read_array(prefix + VECTORS_MEMBER, entries[prefix + VECTORS_MEMBER], searcher._dtype,
                                    (count, dim))
        searcher.load_arrays(keys, vectors)
        return searcher

    def load_arrays(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Take over whole arrays as the stored rows (a file's contents; keys must be unique)."""
        if len(np.unique(keys)) != len(keys):
            raise InputError("repeated keys")
        self._keys, self._vectors, self._size = keys, vectors, len(keys)
        self._scan_index = None
        self._row_of = {int(key): row for row, key in enumerate(keys.tolist())}
        self._touch()


__all__ = ["DEFAULT_BLOCK_ELEMENTS", "SEARCH_DEVICES", "TIE_MARGIN", "ExactSearcher", "array_module", "merge_top_k", "top_k_block"]
