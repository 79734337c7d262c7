"""The survivor path of MR: the same statistics as the sort path from one scan, without full sorts.

A floor ``F`` is set from a sample of 32 queries (a low quantile of their ``(K+1)``-th largest values,
lowered by twice its distance to their median). One scan, fused with the column sums, keeps the
entries ``>= F``. For a query with more than ``K`` survivors its top ``K`` are the largest survivors,
and every value above a candidate in its column is a survivor too, so the candidate's count of
larger survivors in its column *is* its reverse rank when its value is not repeated there. Both come
from two sorts of the survivor lists (packed 64-bit keys). Where numpy's tie order could matter, the
original's argsorts run for those rows or columns only (:mod:`._rerank_sort`): a query with
(possibly) equal values among its ``K + 1`` largest, or with ``K`` or fewer survivors (it is
"redone"), and a candidate whose value repeats in its column. float64 values are compared through
their float32 rounding there, so values that round together are treated as ties and resolved
exactly. The scan gives up (the caller then takes the sort path) when more than
``8 * Nq * (K + 1)`` entries reach the floor or more than a quarter of the queries would be redone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from galr.retrieval._rerank_sort import (
    check_finite,
    forward_candidates,
    pairwise_column_sums,
    reverse_positions,
)

#: The survivor path gives up (and the sort path runs) when the scan keeps more than this many
#: entries per candidate slot (``Nq * (K + 1)``).
SURVIVOR_FACTOR = 8

#: Queries sampled (evenly spaced) to set the survivor floor.
FLOOR_SAMPLE = 32

#: The survivor path hands over to the sort path when more than this share of the queries would have
#: to be redone with full-row argsorts and full-column counts (tie-heavy matrices).
MAX_REDO_FRACTION = 0.25

#: Elements per block of the survivor scan: small enough for its boolean mask to stay in cache.
SCAN_BLOCK_ELEMENTS = 1 << 18


def survivor_statistics(sim: np.ndarray, k: int, *, block_elements: int) -> tuple[Any, Any, Any, Any] | None:
    """What :func:`sorted_statistics` returns, plus the column sums, from one scan of ``sim`` (numpy).

    Needs ``k`` below the gallery size. Raises ``ValueError`` for non-finite entries. Returns ``None``
    (the caller then takes the sort path) when more than ``SURVIVOR_FACTOR * Nq * (K + 1)`` entries
    reach the floor or more than ``MAX_REDO_FRACTION`` of the queries would have to be redone.
    """
    n_query, n_gallery = sim.shape
    # Scan the matrix in memory order: t2i passes a transposed view of images x captions.
    queries_are_rows = sim.flags.c_contiguous or not sim.T.flags.c_contiguous
    base = np.ascontiguousarray(sim) if queries_are_rows else sim.T
    sim = base if queries_are_rows else base.T
    floor = _survivor_floor(sim, k)
    limit = SURVIVOR_FACTOR * n_query * (k + 1)
    step = max(1, min(block_elements, SCAN_BLOCK_ELEMENTS) // base.shape[1])
    scan = _scan_query_rows if queries_are_rows else _scan_query_columns
    scanned = scan(base, floor, limit=limit, step=step)
    if scanned is None:
        return None
    flat_index, values, column_sums = scanned
    if flat_index.size == 0:
        return None
    keys = _order_preserving_bits(values)
    if queries_are_rows:
        query = flat_index // n_gallery  # division by a scalar: libdivide, no per-element divide
        gallery = flat_index - query * n_gallery
    else:
        gallery = flat_index // n_query
        query = flat_index - gallery * n_query

    counts = np.bincount(query, minlength=n_query)
    if np.count_nonzero(counts <= k) > n_query * MAX_REDO_FRACTION:  # known before sorting anything
        return None
    entry, redo = _top_entries(query, counts, ~keys, k)
    redo_queries = np.flatnonzero(redo)
    if redo_queries.size > n_query * MAX_REDO_FRACTION:  # tie-heavy: sorting is cheaper
        return None
    cand, cand_values = gallery[entry], values[entry]
    _exact_forward(sim, redo_queries, cand, cand_values, rows=max(1, block_elements // n_gallery))

    # For the queries not redone every candidate is >= the floor, so every larger value in its column
    # is a survivor too: its count of larger survivors is its count of larger values.
    position, heads, column_ends = _column_order(gallery, keys, n_gallery)
    at = position[entry]  # rows of redone queries hold stale entries: overwritten below
    reverse_ranks = (column_ends[cand] - at - 1).astype(np.float64)
    head = heads[at]  # equal neighbours in (column, key) order: the value is (possibly) repeated
    ambiguous = (at > 0) & (heads[at - 1] == head)  # at - 1 == -1 wraps around, but is masked
    ambiguous |= (at < heads.size - 1) & (heads[np.minimum(at + 1, heads.size - 1)] == head)
    if redo_queries.size:
        reverse_ranks[redo_queries], ambiguous[redo_queries] = _redone_reverse_ranks(
            sim, cand[redo_queries], cand_values[redo_queries], floor, heads, column_ends, block_elements
        )
    if ambiguous.any():  # a value repeated in its column: the position depends on argsort's tie order
        pair_query, pair_rank = np.nonzero(ambiguous)
        reverse_ranks[pair_query, pair_rank] = reverse_positions(
            np, sim, pair_query, cand[pair_query, pair_rank], element_budget=block_elements
        )
    return cand, cand_values, reverse_ranks, column_sums


def _survivor_floor(sim: np.ndarray, k: int) -> Any:
    """A value that nearly every query's ``k + 1`` largest entries reach, from a sample of queries.

    A low quantile (about the 10th percentile, robust to a few outlying queries in the sample) of the
    sampled ``(k+1)``-th largest values, lowered by twice its distance to their median. Queries whose
    top ``k + 1`` still fall below it are redone exactly, so the floor only trades survivors (a lower
    floor) against redone queries (a higher one), never correctness.
    """
    n_query, n_gallery = sim.shape
    sample = np.unique(np.linspace(0, n_query - 1, min(n_query, FLOOR_SAMPLE)).astype(np.intp))
    kth = np.sort(np.partition(sim[sample], n_gallery - k - 1, axis=1)[:, n_gallery - k - 1])
    low, middle = kth[kth.size // 10], kth[kth.size // 2]
    with np.errstate(over="ignore"):  # a floor of -inf lets everything survive: the sort path runs
        return low - 2 * (middle - low)


def _scan_query_rows(
    base: np.ndarray, floor: Any, *, limit: int, step: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Flat indices and values of the entries ``>= floor``, and the pairwise column sums, in one pass
    over ``base`` (queries are its rows); ``None`` once more than ``limit`` entries are found."""
    survivors = _SurvivorCollector(floor, base.shape[1], limit)
    column_sums = pairwise_column_sums(base, survivors.add, step=step)
    _check_finite_sums(base, column_sums)
    return None if survivors.overflowed else (*survivors.result(), column_sums)


def _scan_query_columns(
    base: np.ndarray, floor: Any, *, limit: int, step: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`_scan_query_rows` when the queries are the columns of ``base`` (sums are row sums)."""
    survivors = _SurvivorCollector(floor, base.shape[1], limit)
    row_sums = np.empty(base.shape[0], dtype=base.dtype)
    for start in range(0, base.shape[0], step):
        rows = base[start : start + step]
        row_sums[start : start + step] = rows.sum(axis=1)  # contiguous rows: numpy's pairwise sum
        survivors.add(start, rows)
        if survivors.overflowed:  # the sort path then checks finiteness itself
            return None
    _check_finite_sums(base, row_sums)
    return (*survivors.result(), row_sums)


class _SurvivorCollector:
    """The entries ``>= floor`` of consecutive row blocks of a C-contiguous matrix ``width`` wide.

    Keeps their flat indices and values (read while the block is in cache) until more than ``limit``
    are found.
    """

    def __init__(self, floor: Any, width: int, limit: int) -> None:
        self.floor, self.width, self.limit = floor, width, limit
        self.count = 0
        self.sparse: bool | None = None  # decided on the first block, for the whole scan
        self._indices: list[np.ndarray] = []
        self._values: list[np.ndarray] = []

    @property
    def overflowed(self) -> bool:
        return self.count > self.limit

    def add(self, first_row: int, rows: np.ndarray) -> None:
        if self.overflowed:
            return
        mask = rows >= self.floor
        if self.sparse is None:
            self.sparse = np.count_nonzero(mask) * 9 < mask.size
        local = _true_positions(mask, sparse=self.sparse)
        self._values.append(rows.reshape(-1)[local])
        local += first_row * self.width
        self._indices.append(local)
        self.count += local.size

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self._indices), np.concatenate(self._values)


def _true_positions(mask: np.ndarray, *, sparse: bool) -> np.ndarray:
    """``np.flatnonzero(mask)`` for a C-contiguous boolean array, shaped for survivor densities.

    numpy's nonzero loop branches on every element, which mispredicts most when a few percent of the
    mask is True; for such ``sparse`` masks, finding the nonzero 8-byte words first and then the True
    bytes inside them avoids most branches. Dense masks take numpy's branch-free loop.
    """
    flat = mask.reshape(-1)
    whole = flat.size - flat.size % 8
    if not (sparse and whole):
        return np.flatnonzero(flat)
    words = flat[:whole].view(np.uint64)
    hit_words = np.flatnonzero(words != 0)
    inside = np.flatnonzero(words[hit_words].view(np.bool_))
    positions = hit_words[inside >> 3] * 8 + (inside & 7)
    if whole < flat.size:
        positions = np.concatenate([positions, np.flatnonzero(flat[whole:]) + whole])
    return positions


def _check_finite_sums(matrix: np.ndarray, sums: np.ndarray) -> None:
    """Raise for NaN/inf in ``matrix``, reading it only when its sums are not all finite."""
    if not bool(np.isfinite(sums).all()):  # a NaN/inf entry, or finite values overflowing the sum
        check_finite(np, matrix, "sim")


def _top_entries(
    query: np.ndarray, counts: np.ndarray, descending_keys: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` largest survivors, largest first.

    Args: the survivors' queries, the survivor count of every query (more than ``k`` for most), and
    keys that order the survivors' values from largest to smallest.

    Returns ``(entry [Nq, k]`` indices into the survivor lists, ``redo [Nq]``): ``redo`` marks the
    queries whose result the lists cannot give: ``k`` or fewer survivors, or (possibly) equal values
    among their ``k + 1`` largest, whose order or top set then depends on argsort's tie rule. Their
    rows hold placeholders.
    """
    order, heads = _grouped_order(query, descending_keys, counts.shape[0])
    redo = counts <= k
    positions = (np.cumsum(counts) - counts)[:, None] + np.arange(k + 1)
    positions[redo] = 0  # short lists would run into the next query's entries
    top_heads = heads[positions]
    redo |= (top_heads[:, 1:] == top_heads[:, :-1]).any(axis=1)
    return order[positions[:, :k]], redo


def _exact_forward(
    sim: np.ndarray, queries: np.ndarray, cand: np.ndarray, cand_values: np.ndarray, *, rows: int
) -> None:
    """Set, in place, the candidates of ``queries`` (and their values) from the real row argsort."""
    for start in range(0, queries.size, rows):
        chunk = queries[start : start + rows]
        block = sim[chunk]
        cand[chunk] = forward_candidates(np, block, cand.shape[1])
        cand_values[chunk] = np.take_along_axis(block, cand[chunk], axis=1)


def _redone_reverse_ranks(
    sim: np.ndarray,
    cand: np.ndarray,
    cand_values: np.ndarray,
    floor: Any,
    heads: np.ndarray,
    column_ends: np.ndarray,
    block_elements: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Reverse ranks (count of larger values in the column) of the redone queries' candidates, and
    whether their value (possibly) repeats in the column.

    Candidates at or above the floor are survivors themselves: binary search among the sorted
    survivors (see :func:`_column_order`). The others are counted on their full columns.
    """
    greater = np.empty(cand.shape, dtype=np.float64)
    repeated = np.empty(cand.shape, dtype=bool)
    above = cand_values >= floor
    gallery = cand[above]
    key = (gallery.astype(np.uint64) << np.uint64(32)) | _order_preserving_bits(cand_values[above])
    first, after = np.searchsorted(heads, key, side="left"), np.searchsorted(heads, key, side="right")
    greater[above] = column_ends[gallery] - after
    repeated[above] = after - first > 1  # itself and another
    below = ~above
    if below.any():
        greater[below], repeated[below] = _count_greater_on_columns(
            sim, cand[below], cand_values[below], block_elements=block_elements
        )
    return greater, repeated


def _count_greater_on_columns(
    sim: np.ndarray, pair_gallery: np.ndarray, pair_values: np.ndarray, *, block_elements: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each (gallery column, value): the count of larger values in the full column, and whether
    the value repeats there; one block of gathered columns at a time."""
    greater = np.empty(pair_gallery.size, dtype=np.int64)
    repeated = np.empty(pair_gallery.size, dtype=bool)
    width = max(1, block_elements // sim.shape[0])
    for start in range(0, pair_gallery.size, width):
        columns = sim.T[pair_gallery[start : start + width]]  # [w, Nq]: one column per row
        value = pair_values[start : start + width, None]
        greater[start : start + width] = np.count_nonzero(columns > value, axis=1)
        repeated[start : start + width] = np.count_nonzero(columns == value, axis=1) > 1  # itself + another
    return greater, repeated


def _column_order(
    gallery: np.ndarray, keys: np.ndarray, n_gallery: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The survivors sorted by gallery column, then value: each survivor's position in that order,
    the sorted ``column << 32 | key`` (equal neighbours: possibly equal values), and the end
    position of every column.

    ``keys`` order the survivors' values (see :func:`_order_preserving_bits`).
    """
    order, heads = _grouped_order(gallery, keys, n_gallery)
    position = np.empty(order.size, dtype=np.int64)
    position[order] = np.arange(order.size)
    return position, heads, np.cumsum(np.bincount(gallery, minlength=n_gallery))


def _grouped_order(groups: np.ndarray, keys: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Permutation sorting entries by group, then by their uint32 key; and the sorted
    ``group << 32 | key`` (equal neighbours: same group, equal keys).

    One ``np.sort`` of packed 64-bit words (group, key, entry index) where they fit (a SIMD sort,
    cheaper per element than an argsort), else a lexsort.
    """
    n_entries = keys.shape[0]
    index_bits = max(1, (n_entries - 1).bit_length())
    if max(1, (n_groups - 1).bit_length()) + 32 + index_bits > 64:
        order = np.lexsort((keys, groups))
        return order, (groups[order].astype(np.uint64) << np.uint64(32)) | keys[order]
    packed = groups.astype(np.uint64)
    packed <<= np.uint64(32 + index_bits)
    shifted_keys = keys.astype(np.uint64)
    shifted_keys <<= np.uint64(index_bits)
    packed |= shifted_keys
    packed |= np.arange(n_entries, dtype=np.uint64)
    packed.sort()
    order = np.bitwise_and(packed, np.uint64((1 << index_bits) - 1), out=shifted_keys).view(np.int64)
    packed >>= np.uint64(index_bits)
    return order, packed


def _order_preserving_bits(values: np.ndarray) -> np.ndarray:
    """uint32 keys whose order is the order of ``values`` rounded to float32 (``~keys``: reversed).

    Rounding is monotone, so different keys mean different values in the same order; float64 values
    that round to the same float32 get equal keys and are treated as possibly tied.
    """
    with np.errstate(over="ignore"):  # float64 beyond float32's range rounds to inf: equal keys
        single = values.astype(np.float32)
    single += np.float32(0.0)  # -0.0 == 0.0 must give one key
    bits = single.view(np.uint32)
    # Flip negatives entirely and positives' sign bit: the unsigned order is then the float order.
    keys = bits >> np.uint32(31)
    keys *= np.uint32(0x7FFFFFFF)
    keys |= np.uint32(0x80000000)
    keys ^= bits
    return keys
