"""The sort path of MR: argsort kernels that reproduce numpy's tie order exactly.

MR's outputs depend on how ``np.argsort`` breaks ties in the original code (numpy's default sort is
not stable). These kernels make the same calls on the same values and dtypes wherever equal values
could matter, so the batched MR equals the original loop bit for bit. They serve both the sort path
(any array module, any float dtype) and the survivor path's exact fall-backs (:mod:`._rerank_fast`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable

import numpy as np

from galr.errors import InputError

#: numpy's pairwise summation sums runs of up to this many values with 8 accumulators, and splits
#: longer runs in two (numpy/_core/src/umath/loops_utils.h.src, ``PW_BLOCKSIZE``).
PAIRWISE_BLOCK = 128

#: dtypes whose pairwise column sums are reproduced exactly here (float16 sums in float32 inside numpy).
EXACT_SUM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_finite(xp: ModuleType, values: Any, name: str) -> None:
    if values.size and not bool(xp.isfinite(values).all()):
        raise InputError(f"{name} contains NaN or inf; MR ranks would be meaningless, check the encoder outputs")


def forward_candidates(xp: ModuleType, block: Any, k: int) -> Any:
    """The first ``k`` entries of ``argsort(-block, axis=1)``, exactly, for a block of query rows."""
    neg = -block
    n_gallery = block.shape[1]
    if xp is not np or k >= n_gallery:
        return xp.argsort(neg, axis=1)[:, :k]
    # Fast path, O(Ng) per row instead of a full sort: when the k+1 smallest values of -row are all
    # distinct, the full argsort must start with the k smallest in value order, whatever its tie
    # rules. Rows with any tie there fall back to the real argsort to keep numpy's tie order.
    part = np.argpartition(neg, k, axis=1)[:, : k + 1]
    part_values = np.take_along_axis(neg, part, axis=1)
    by_value = np.argsort(part_values, axis=1, kind="stable")
    cand = np.take_along_axis(part, by_value, axis=1)[:, :k]
    sorted_values = np.take_along_axis(part_values, by_value, axis=1)
    tied = (np.diff(sorted_values, axis=1) == 0).any(axis=1)
    if tied.any():
        cand[tied] = np.argsort(neg[tied], axis=1)[:, :k]
    return cand


def sorted_statistics(xp: ModuleType, sim: Any, k: int, *, rows: int) -> tuple[Any, Any, Any]:
    """Candidates, their values and reverse ranks from row and column argsorts (any array module).

    Returns ``(cand [Nq, K] int64, values [Nq, K] in sim's dtype, reverse_ranks [Nq, K] float64)``.
    """
    n_query, n_gallery = sim.shape
    cand = xp.empty((n_query, k), dtype=xp.int64)
    for start in range(0, n_query, rows):
        cand[start : start + rows] = forward_candidates(xp, sim[start : start + rows], k)
    values = xp.take_along_axis(sim, cand, axis=1)
    pair_query = xp.repeat(xp.arange(n_query), k)
    reverse_ranks = reverse_positions(xp, sim, pair_query, cand.ravel(), element_budget=rows * n_gallery)
    return cand, values, reverse_ranks.reshape(n_query, k)


def reverse_positions(
    xp: ModuleType, sim: Any, pair_query: Any, pair_gallery: Any, *, element_budget: int
) -> Any:
    """Position of each ``pair_query`` in ``argsort(-sim[:, pair_gallery], axis=0)``, as float64.

    Only the columns some pair names are sorted, a block of columns (about ``element_budget``
    elements) at a time.
    """
    n_query = sim.shape[0]
    # Group the pairs by gallery column so each column block reads one contiguous slice of them.
    by_column = xp.argsort(pair_gallery)
    sorted_gallery = pair_gallery[by_column]
    columns = xp.unique(sorted_gallery)
    width = max(1, element_budget // n_query)
    starts = xp.concatenate([columns[::width], columns[-1:] + 1])
    edges = [int(e) for e in xp.searchsorted(sorted_gallery, starts)]

    reverse_positions = xp.empty(pair_gallery.shape[0], dtype=xp.float64)
    query_positions = xp.arange(n_query, dtype=xp.int32)[None, :]
    for block_index in range(len(edges) - 1):
        lo, hi = edges[block_index], edges[block_index + 1]
        block_columns = columns[block_index * width : (block_index + 1) * width]
        # One contiguous row per gallery column: numpy's argsort then sees exactly the values the
        # original's np.argsort(-sim, 0) sees.
        transposed = xp.ascontiguousarray(sim.T[block_columns])  # [w, Nq], one copy
        order = xp.argsort(-transposed, axis=1)
        positions = xp.empty(order.shape, dtype=xp.int32)
        positions[xp.arange(len(block_columns))[:, None], order] = query_positions
        pairs = by_column[lo:hi]
        local_column = xp.searchsorted(block_columns, sorted_gallery[lo:hi])
        reverse_positions[pairs] = positions[local_column, pair_query[pairs]]
    return reverse_positions


def column_sums(xp: ModuleType, sim: Any) -> Any:
    """``np.sum(sim[:, g])`` for every column ``g``, with the original's rounding on numpy."""
    if xp is not np:
        return sim.sum(axis=0)
    if sim.T.flags.c_contiguous:  # columns are contiguous rows of sim.T: numpy sums each pairwise
        return sim.T.sum(axis=1)
    if sim.dtype in EXACT_SUM_DTYPES:
        return pairwise_column_sums(np.ascontiguousarray(sim))
    # float16 & co. are summed in a wider type inside numpy; let numpy do it on a transposed copy.
    return np.ascontiguousarray(sim.T).sum(axis=1)


def pairwise_column_sums(
    matrix: np.ndarray, on_rows: Callable[[int, np.ndarray], None] | None = None, *, step: int = 1 << 30
) -> np.ndarray:
    """Every column's ``np.sum``, bit for bit, from whole-row operations (no transposed copy).

    ``matrix.sum(axis=0)`` adds the rows one after another, which rounds differently from the
    pairwise summation numpy applies to a single column; this replays that pairwise scheme on all
    columns at once. ``on_rows(first_row, rows)`` is called on consecutive runs of at most ``step``
    rows (covering all rows, in order) just before they are summed, so both passes share the cache.
    """
    total = pairwise_rows(matrix, 0, matrix.shape[0], on_rows, step)
    total += 0.0  # numpy starts a sum from the identity 0.0, which turns a -0.0 total into 0.0
    return total


def pairwise_rows(
    matrix: np.ndarray, lo: int, hi: int, on_rows: Callable[[int, np.ndarray], None] | None, step: int
) -> np.ndarray:
    """numpy's ``pairwise_sum`` over rows ``lo:hi`` of ``matrix``, vectorised across the columns."""
    n_rows = hi - lo
    if n_rows > PAIRWISE_BLOCK:
        half = n_rows // 2
        half -= half % 8
        first = pairwise_rows(matrix, lo, lo + half, on_rows, step)
        return first + pairwise_rows(matrix, lo + half, hi, on_rows, step)
    rows = matrix[lo:hi]
    whole = n_rows - n_rows % 8 if n_rows >= 8 else 0  # rows summed in eight lanes; the rest one by one
    lanes = rows[:8].copy() if whole else None  # eight running sums, each over every 8th row
    next_group = 8
    for start in range(0, n_rows, step):
        if on_rows is not None:
            on_rows(lo + start, rows[start : start + step])
        for group in range(next_group, min(start + step, whole), 8):
            lanes += rows[group : group + 8]
            next_group = group + 8
    if lanes is None:
        total = np.zeros(matrix.shape[1], dtype=matrix.dtype)
    else:
        total = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
    for row in rows[whole:]:
        total += row
    return total


def argsort_rows(ranks: np.ndarray) -> np.ndarray:
    """``np.argsort(ranks, axis=1)`` for rows of whole-number ranks, without an argsort where it can.

    Each rank is packed with its column into one int64 key; keys are distinct, so ``np.sort`` (a
    SIMD sort, much cheaper per short row than ``argsort``) orders them, and the column comes back
    out of the low bits. A row with equal ranks keeps numpy's own argsort, whose tie order the
    original's output depends on.
    """
    n_rows, k = ranks.shape
    if ranks.size == 0 or float(ranks.max()) * k >= 2.0**62:  # keys would not fit: never for real ranks
        return np.argsort(ranks, axis=1)
    keys = ranks.astype(np.int64)
    keys *= k
    keys += np.arange(k)
    keys.sort(axis=1)
    order = keys % k
    keys //= k
    tied = (keys[:, 1:] == keys[:, :-1]).any(axis=1)
    if tied.any():
        order[tied] = np.argsort(ranks[tied], axis=1)
    return order
