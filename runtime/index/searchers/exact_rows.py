"""The exact vectors an ``ivfpq`` searcher keeps beside its product codes, to re-rank with.

At 10^7 x 512 these rows are 10 GB in fp16: they must not all sit in memory. While an index is
built they wait in memory up to :data:`SPILL_BYTES`, then in an unnamed temporary file; a saved
``.gidx`` keeps them as a member that is memory-mapped when opened, so a query reads only its
candidates' rows.
"""

from __future__ import annotations

import tempfile
from typing import IO, Any

import numpy as np

#: Rows copied at a time when a store is copied or filtered (bounded memory).
COPY_BLOCK_ROWS = 65536
#: Exact re-rank rows (``ivfpq`` with ``rerank``) held in memory while building; beyond this they
#: move to a temporary file (``TMPDIR``), so a 10^7 build keeps only the PQ codes in memory.
SPILL_BYTES = 256 << 20


class ExactRows:
    """The exact vectors an ``ivfpq`` searcher keeps for re-ranking, one row per key, in key order.

    Rows are appended while building: in memory up to :data:`SPILL_BYTES`, then in an unnamed
    temporary file read through a memory map. An index read from a ``.gidx`` hands over a read-only
    memory map of its member (the rows stay on disk); editing such rows first copies them, block by
    block, into a store of their own. Reading ``rows`` touches only those rows' pages.
    """

    def __init__(self, dim: int, dtype: Any, rows: np.ndarray | None = None) -> None:
        self.dim, self.dtype = int(dim), np.dtype(dtype)
        self._memory = np.zeros((0, self.dim), self.dtype) if rows is None else rows
        self._appended: list[np.ndarray] = []  # in memory after _memory, joined when the rows are read
        self._file: IO[bytes] | None = None
        self._count = len(self._memory)
        self._mapped: np.ndarray | None = None  # memory map of _file, for _count rows

    def __len__(self) -> int:
        return self._count

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype).reshape(-1, self.dim)
        if self._file is None and not self._memory.flags.writeable:
            self._take_ownership()
        if self._file is None and (self._count + len(rows)) * self.dim * self.dtype.itemsize <= SPILL_BYTES:
            self._appended.append(rows.copy())  # joined once when read, not per batch (quadratic)
        else:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="galr-exact-rows-")
                self._file.write(np.ascontiguousarray(self._joined()).tobytes())
                self._memory = np.zeros((0, self.dim), self.dtype)
            self._file.seek(0, 2)
            self._file.write(rows.tobytes())
            self._file.flush()
            self._mapped = None
        self._count += len(rows)

    def array(self) -> np.ndarray:
        """All rows ``[len, dim]`` in the storage dtype (a memory map once spilled or read from a file)."""
        if self._file is None:
            return self._joined()
        if self._mapped is None:
            self._mapped = np.memmap(self._file, dtype=self.dtype, mode="r+", shape=(self._count, self.dim)) \
                if self._count else np.zeros((0, self.dim), self.dtype)
        return self._mapped

    def _joined(self) -> np.ndarray:
        """The in-memory rows as one array."""
        if self._appended:
            self._memory, self._appended = np.concatenate([self._memory, *self._appended]), []
        return self._memory

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """The rows at ``positions`` as float32."""
        return self.array()[positions].astype(np.float32)

    def _take_ownership(self) -> None:
        """Copy read-only rows (a memory-mapped ``.gidx`` member) into a store that may be edited."""
        source, self._memory, self._count = self._memory, np.zeros((0, self.dim), self.dtype), 0
        for start in range(0, len(source), COPY_BLOCK_ROWS):
            self.append(source[start:start + COPY_BLOCK_ROWS])

    def replace(self, positions: np.ndarray, values: np.ndarray) -> None:
        if self._file is None and not self._memory.flags.writeable:
            self._take_ownership()
        self.array()[positions] = np.asarray(values, dtype=self.dtype).reshape(-1, self.dim)

    def kept(self, keep: np.ndarray) -> "ExactRows":
        """A new store with the rows where ``keep`` is true (block by block: bounded memory)."""
        kept = ExactRows(self.dim, self.dtype)
        source = self.array()
        for start in range(0, len(source), COPY_BLOCK_ROWS):
            kept.append(source[start:start + COPY_BLOCK_ROWS][keep[start:start + COPY_BLOCK_ROWS]])
        return kept


__all__ = ["COPY_BLOCK_ROWS", "SPILL_BYTES", "ExactRows"]
