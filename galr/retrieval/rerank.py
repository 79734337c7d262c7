"""Batched multivariate rerank (MR) of GaLR, torch-free, on numpy or CuPy arrays.

MR (galr-reference.md §8, the authors' ``i2t_rerank_optim``) turns a similarity matrix
``sim [Nq, Ng]`` (rows are queries, columns gallery items) into a new score matrix. For each query
``q`` its ``K = max(10, k)`` best gallery items ``g`` (by ``argsort(-sim[q])``, forward rank ``j``) get

    score[q, g] = wp1 * sim[q, g] / sum(sim[:, g])      # p1, salience over ALL queries
                + exp(-decay * (j + 1))                  # p2, forward-rank prior
                + wp2 * exp(-decay * (idx + 1))          # p3, reverse-rank prior

where ``idx`` is the *ordinal* position of ``g`` after the K candidates are sorted by their reverse
rank (the position of ``q`` in ``argsort(-sim[:, g])``). Every other entry of the row is 0. The
result is float32, as in the original.

Parity with the original, on the same input:

* ``K = max(10, k)`` is kept (the authors' silent override); when the gallery has fewer than ``K``
  items every item is a candidate (the original raises ``IndexError`` there).
* Ties are broken exactly as numpy's default ``np.argsort`` breaks them in the original: wherever
  equal values could matter, the same calls are made on the same values and dtypes (the reverse ranks
  are sorted as float64, because the original accumulates them with ``np.append`` onto a float array).
  numpy's default sort is not stable, so this is the only way to get identical outputs on tie-heavy
  matrices.
* The float32 rounding steps of the original (``wp1 * p1`` stored, then ``+= p2``, then ``+= wp2 * p3``)
  are repeated, and the column sums are numpy's pairwise sums of each column (reproduced bit for bit
  without a transposed copy), so the output is normally bit-identical; the contract is a max abs
  difference of 1e-6. All work is done in the input's dtype, as the original does (no float64 copy of
  a float32 matrix).

Two paths compute the same matrix:

* **Survivor path** (numpy, float32/float64, ``K`` below the gallery size): no full sort, one pass
  over the matrix. A floor ``F`` is set from a sample of 32 queries (a low quantile of their
  ``(K+1)``-th largest values, lowered by twice its distance to their median). One scan, fused with
  the column sums, keeps the entries ``>= F`` (typically 1.5-2.5 x ``Nq * (K + 1)``). For a query
  with more than ``K`` survivors its top ``K`` are the largest survivors, and every value above a
  candidate in its column is a survivor too, so the candidate's count of larger survivors in its
  column *is* its reverse rank when its value is not repeated there. Both come from two sorts of the
  survivor lists (packed 64-bit keys). Where numpy's tie order could matter, the original's
  argsorts run for those rows or columns only: a query with (possibly) equal values among its
  ``K + 1`` largest, or with ``K`` or fewer survivors (it is "redone": full-row argsort, counts on
  its candidates' full columns), and a candidate whose value repeats in its column. float64 values
  are compared through their float32 rounding there, so values that round together are treated as
  ties and resolved exactly. The scan stops and the sort path runs instead when more than
  ``8 * Nq * (K + 1)`` entries reach the floor or more than a quarter of the queries would be redone
  (tie-heavy matrices).
* **Sort path** (CuPy, other dtypes, tiny galleries, and the fallback above): forward candidates from
  row argsorts (an ``argpartition`` when the top is tie-free), reverse ranks from column argsorts
  turned into inverse permutations, in blocks.

Memory: the output is a dense float32 ``[Nq, Ng]``; everything else is ``[Nq, K]``-sized, the
survivor lists (at most ``8 * Nq * (K + 1)`` entries), or one working block at a time
(``query_chunk`` rows, or the same number of elements of gallery columns), so no ``[Nq, Ng]``
argsort, reverse-rank matrix or transposed copy is ever held.

CuPy: pass CuPy arrays and everything runs on the device (CuPy out), on the sort path: device sorts
are cheap, and the survivor path's data-dependent sizes would force host round trips. CuPy's sorts
are stable, so on matrices with *equal similarity values* candidates may be ordered differently from
numpy; the reverse-rank ordering (where ties are the rule, not the exception) is always done with
numpy on the host, so it matches exactly.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, Literal

import numpy as np

from galr.config import RerankConfig

Direction = Literal["i2t", "t2i"]

#: Elements (``rows x columns``) in one working block when the caller does not choose a chunk size:
#: about 64 MB of int64 argsort output plus a float copy, small next to the dense output matrix.
DEFAULT_BLOCK_ELEMENTS = 1 << 22

#: The original raises any K below this to it (``K1 = max(10, K1)``).
MIN_CANDIDATES = 10

#: The survivor path gives up (and the sort path runs) when the scan keeps more than this many
#: entries per candidate slot (``Nq * (K + 1)``); similarity matrices typically keep 1.5-2.5.
_SURVIVOR_FACTOR = 8

#: Queries sampled (evenly spaced) to set the survivor floor.
_FLOOR_SAMPLE = 32

#: The survivor path hands over to the sort path when more than this share of the queries would have
#: to be redone with full-row argsorts and full-column counts (tie-heavy matrices).
_MAX_REDO_FRACTION = 0.25

#: Elements per block of the survivor scan: small enough for its boolean mask to stay in cache.
_SCAN_BLOCK_ELEMENTS = 1 << 18

#: numpy's pairwise summation sums runs of up to this many values with 8 accumulators, and splits
#: longer runs in two (numpy/_core/src/umath/loops_utils.h.src, ``PW_BLOCKSIZE``).
_PAIRWISE_BLOCK = 128

#: dtypes whose pairwise column sums are reproduced exactly here (float16 sums in float32 inside numpy).
_SURVIVOR_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def get_array_module(array: Any) -> ModuleType:
    """The array module (numpy or cupy) that owns ``array``.

    CuPy is imported only when a CuPy array is passed, so numpy users never need it.

    Args:
        array: any array-like.

    Returns:
        ``cupy`` for a CuPy array, else ``numpy``.
    """
    if type(array).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def candidate_count(k: int, n_gallery: int) -> int:
    """Candidates per query: ``max(10, k)`` as in the original, capped at the gallery size.

    Args:
        k: the configured ``RerankConfig.k``.
        n_gallery: number of gallery items (columns).

    Returns:
        The number of top items each query reranks.
    """
    return min(max(MIN_CANDIDATES, int(k)), n_gallery)


def rerank_i2t(
    sim: Any, config: RerankConfig = RerankConfig(), *, query_chunk: int | None = None
) -> Any:
    """MR with rows as queries; equals the authors' ``i2t_rerank_optim(sim, k, wp1, wp2)``.

    Args:
        sim: float similarity matrix ``[Nq, Ng]`` (numpy or CuPy); for image->text, images x captions.
        config: ``k``, ``wp1``, ``wp2`` and ``decay`` of MR.
        query_chunk: queries per working block; ``None`` picks about ``DEFAULT_BLOCK_ELEMENTS / Ng``.
            Reverse ranks use blocks of gallery columns with the same element count, and the
            survivor scan blocks of at most that many elements (see the module docstring).

    Returns:
        float32 ``[Nq, Ng]`` on the same device as ``sim``: MR scores for each query's top
        ``max(10, k)`` items, 0 elsewhere. On numpy, bit-identical to the original on the same
        input whichever internal path runs (the contract is a max abs difference of 1e-6).

    Raises:
        ValueError: if ``sim`` is not a non-empty, finite 2-D matrix or ``query_chunk < 1``.
        TypeError: if ``sim`` is not a floating-point array.
    """
    xp, sim = _as_array(sim)
    survivor_path = xp is np and getattr(sim, "dtype", None) in _SURVIVOR_DTYPES
    # The survivor path reads finiteness off the column sums it computes anyway: no separate pass.
    _check_similarity(xp, sim, "sim", check_finite=not survivor_path)
    n_query, n_gallery = sim.shape
    k = candidate_count(config.k, n_gallery)
    rows = _rows_per_block(query_chunk, n_gallery)
    block_elements = rows * n_gallery

    statistics = None
    if survivor_path and k < n_gallery:
        statistics = _survivor_statistics(sim, k, block_elements=block_elements)
    if statistics is None:
        if survivor_path:
            _check_finite(xp, sim, "sim")
        statistics = (*_sorted_statistics(xp, sim, k, rows=rows), _column_sums(xp, sim))
    cand, values, reverse_ranks, column_sums = statistics
    scores = _mr_scores(xp, values, column_sums[cand], reverse_ranks, config)
    return _scatter(xp, scores, cand, n_gallery)


def rerank_t2i(
    sim: Any, config: RerankConfig = RerankConfig(), *, query_chunk: int | None = None
) -> Any:
    """MR with columns as queries; equals the authors' ``t2i_rerank_optim`` (= ``rerank_i2t(sim.T).T``).

    Args:
        sim: float similarity matrix ``[N_img, N_cap]`` (images x captions, as for i2t).
        config: MR parameters.
        query_chunk: captions per working block (see :func:`rerank_i2t`).

    Returns:
        float32 ``[N_img, N_cap]`` (a transposed view): for each caption (column), MR scores of its top
        ``max(10, k)`` images, 0 elsewhere.

    Raises:
        ValueError, TypeError: as :func:`rerank_i2t`.
    """
    return rerank_i2t(_as_array(sim)[1].T, config, query_chunk=query_chunk).T


def rerank(
    sim: Any,
    direction: Direction = "i2t",
    config: RerankConfig = RerankConfig(),
    *,
    query_chunk: int | None = None,
) -> Any:
    """MR over a full similarity matrix in either direction.

    Args:
        sim: float similarity matrix ``[N_img, N_cap]``.
        direction: ``"i2t"`` (rows are queries) or ``"t2i"`` (columns are queries).
        config: MR parameters.
        query_chunk: queries per working block (see :func:`rerank_i2t`).

    Returns:
        float32 reranked matrix with the shape of ``sim``.

    Raises:
        ValueError: for an unknown ``direction`` or a bad ``sim`` (see :func:`rerank_i2t`).
    """
    if direction == "i2t":
        return rerank_i2t(sim, config, query_chunk=query_chunk)
    if direction == "t2i":
        return rerank_t2i(sim, config, query_chunk=query_chunk)
    raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")


def rerank_online(
    query_sims: Any,
    bank_sims: Any,
    config: RerankConfig = RerankConfig(),
    *,
    query_chunk: int | None = None,
) -> Any:
    """MR for a batch of new queries against a gallery, using a fixed reference bank of queries.

    MR needs the similarities of *other queries* to each gallery item (the salience denominator and
    the reverse rank). Online there is no full query set, so a fixed bank stands in for it: rows of
    the same modality as the queries scored against the same gallery (e.g. the test captions, or
    past queries, for text->image search). Each query is reranked as if it alone were appended to the
    bank as its last row:

    * p1's denominator is the bank's column sum plus the query's own similarity;
    * the reverse rank is the query's position in ``argsort(-[bank[:, g]; query[g]])``;
    * queries of the same batch never see each other, so results do not depend on batching.

    Row ``i`` of the result equals ``rerank_i2t(vstack([bank_sims, query_sims[i:i+1]]))[-1]`` (to
    1e-6; ties with bank values are resolved by the same numpy argsort the offline form uses).

    Args:
        query_sims: float ``[nq, ng]`` similarities of the new queries to the gallery.
        bank_sims: float ``[nb, ng]`` similarities of the bank rows to the same gallery (``nb`` may be 0).
        config: MR parameters.
        query_chunk: queries per working block; each block gathers ``nb x query_chunk x K`` bank values.
            ``None`` picks a block of about ``DEFAULT_BLOCK_ELEMENTS`` elements.

    Returns:
        float32 ``[nq, ng]``: MR scores of each query's top ``max(10, k)`` gallery items, 0 elsewhere.

    Raises:
        ValueError: if either matrix is malformed, their gallery sizes differ, or they live on
            different devices.
        TypeError: if either matrix is not floating point.
    """
    xp, query_sims = _as_array(query_sims)
    bank_xp, bank_sims = _as_array(bank_sims)
    if bank_xp is not xp:
        raise ValueError("query_sims and bank_sims must both be numpy or both be CuPy arrays")
    _check_similarity(xp, query_sims, "query_sims")
    # The bank is fixed across calls: only the columns a batch uses are checked for NaN (per block).
    _check_similarity(xp, bank_sims, "bank_sims", allow_empty_rows=True, check_finite=False)
    if bank_sims.shape[1] != query_sims.shape[1]:
        raise ValueError(
            f"bank_sims has {bank_sims.shape[1]} gallery columns but query_sims has "
            f"{query_sims.shape[1]}; both must be scored against the same gallery"
        )
    # vstack would promote both to one dtype; do the same so ties and sums behave identically.
    dtype = np.result_type(query_sims.dtype, bank_sims.dtype)
    query_sims, bank_sims = query_sims.astype(dtype, copy=False), bank_sims.astype(dtype, copy=False)
    n_query, n_gallery = query_sims.shape
    n_bank = bank_sims.shape[0]
    k = candidate_count(config.k, n_gallery)
    if query_chunk is None:
        rows = max(1, DEFAULT_BLOCK_ELEMENTS // (n_bank * k + n_gallery))
    else:
        rows = _rows_per_block(query_chunk, n_gallery)

    out = xp.zeros((n_query, n_gallery), dtype=xp.float32)
    for start in range(0, n_query, rows):
        block = query_sims[start : start + rows]
        cand = _forward_candidates(xp, block, k)
        values = xp.take_along_axis(block, cand, axis=1)
        column_sums, reverse_ranks = _bank_statistics(xp, bank_sims[:, cand], values)
        scores = _mr_scores(xp, values, column_sums, reverse_ranks, config)
        out[start : start + rows] = _scatter(xp, scores, cand, n_gallery)
    return out


def rerank_candidates(values: Any, bank_values: Any, config: RerankConfig = RerankConfig()) -> Any:
    """MR scores of candidates that a search already found: the online form without a dense gallery.

    For a large gallery the serving path finds each query's top ``K`` with the index, then needs the
    bank's similarities to those ``K`` items only. Same scores as :func:`rerank_online` restricted to
    the candidates (the candidate order, i.e. the forward rank, is taken as given).

    Args:
        values: float ``[nq, K]`` similarities of each query to its candidates, best first.
        bank_values: float ``[nb, nq, K]`` similarities of every bank row to those candidates.
        config: MR parameters (``config.k`` is not applied here: ``K`` is the candidates given).

    Returns:
        float32 ``[nq, K]`` MR scores in the candidates' order.
    """
    xp, values = _as_array(values)
    if values.ndim != 2 or bank_values.ndim != 3 or bank_values.shape[1:] != values.shape:
        raise ValueError(f"bank_values must be [nb, nq, K] for values [nq, K]; got {tuple(bank_values.shape)} "
                         f"and {tuple(values.shape)}")
    dtype = np.result_type(values.dtype, bank_values.dtype)
    values, bank_values = values.astype(dtype, copy=False), bank_values.astype(dtype, copy=False)
    column_sums, reverse_ranks = _bank_statistics(xp, bank_values, values)
    return _mr_scores(xp, values, column_sums, reverse_ranks, config)


def _as_array(sim: Any) -> tuple[ModuleType, Any]:
    """The array module and ``sim`` as one of its arrays (nested lists become numpy arrays)."""
    xp = get_array_module(sim)
    return xp, (np.asarray(sim) if xp is np else sim)


def _check_similarity(
    xp: ModuleType, sim: Any, name: str, *, allow_empty_rows: bool = False, check_finite: bool = True
) -> None:
    if getattr(sim, "ndim", None) != 2:
        raise ValueError(f"{name} must be a 2-D [queries, gallery] matrix, got shape {getattr(sim, 'shape', None)}")
    if not np.issubdtype(sim.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point matrix, got dtype {sim.dtype}; cast it to float32/float64")
    if sim.shape[1] == 0 or (sim.shape[0] == 0 and not allow_empty_rows):
        raise ValueError(f"{name} is empty (shape {sim.shape}); MR needs at least one query and one gallery item")
    if check_finite:
        _check_finite(xp, sim, name)


def _check_finite(xp: ModuleType, values: Any, name: str) -> None:
    if values.size and not bool(xp.isfinite(values).all()):
        raise ValueError(f"{name} contains NaN or inf; MR ranks would be meaningless, check the encoder outputs")


def _rows_per_block(query_chunk: int | None, n_gallery: int) -> int:
    if query_chunk is None:
        return max(1, DEFAULT_BLOCK_ELEMENTS // n_gallery)
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
    return int(query_chunk)


def _forward_candidates(xp: ModuleType, block: Any, k: int) -> Any:
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


def _sorted_statistics(xp: ModuleType, sim: Any, k: int, *, rows: int) -> tuple[Any, Any, Any]:
    """Candidates, their values and reverse ranks from row and column argsorts (any array module).

    Returns ``(cand [Nq, K] int64, values [Nq, K] in sim's dtype, reverse_ranks [Nq, K] float64)``.
    """
    n_query, n_gallery = sim.shape
    cand = xp.empty((n_query, k), dtype=xp.int64)
    for start in range(0, n_query, rows):
        cand[start : start + rows] = _forward_candidates(xp, sim[start : start + rows], k)
    values = xp.take_along_axis(sim, cand, axis=1)
    pair_query = xp.repeat(xp.arange(n_query), k)
    reverse_ranks = _reverse_positions(xp, sim, pair_query, cand.ravel(), element_budget=rows * n_gallery)
    return cand, values, reverse_ranks.reshape(n_query, k)


def _reverse_positions(
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


def _column_sums(xp: ModuleType, sim: Any) -> Any:
    """``np.sum(sim[:, g])`` for every column ``g``, with the original's rounding on numpy."""
    if xp is not np:
        return sim.sum(axis=0)
    if sim.T.flags.c_contiguous:  # columns are contiguous rows of sim.T: numpy sums each pairwise
        return sim.T.sum(axis=1)
    if sim.dtype in _SURVIVOR_DTYPES:
        return _pairwise_column_sums(np.ascontiguousarray(sim))
    # float16 & co. are summed in a wider type inside numpy; let numpy do it on a transposed copy.
    return np.ascontiguousarray(sim.T).sum(axis=1)


def _pairwise_column_sums(
    matrix: np.ndarray, on_rows: Callable[[int, np.ndarray], None] | None = None, *, step: int = 1 << 30
) -> np.ndarray:
    """Every column's ``np.sum``, bit for bit, from whole-row operations (no transposed copy).

    ``matrix.sum(axis=0)`` adds the rows one after another, which rounds differently from the
    pairwise summation numpy applies to a single column; this replays that pairwise scheme on all
    columns at once. ``on_rows(first_row, rows)`` is called on consecutive runs of at most ``step``
    rows (covering all rows, in order) just before they are summed, so both passes share the cache.
    """
    total = _pairwise_rows(matrix, 0, matrix.shape[0], on_rows, step)
    total += 0.0  # numpy starts a sum from the identity 0.0, which turns a -0.0 total into 0.0
    return total


def _pairwise_rows(
    matrix: np.ndarray, lo: int, hi: int, on_rows: Callable[[int, np.ndarray], None] | None, step: int
) -> np.ndarray:
    """numpy's ``pairwise_sum`` over rows ``lo:hi`` of ``matrix``, vectorised across the columns."""
    n_rows = hi - lo
    if n_rows > _PAIRWISE_BLOCK:
        half = n_rows // 2
        half -= half % 8
        first = _pairwise_rows(matrix, lo, lo + half, on_rows, step)
        return first + _pairwise_rows(matrix, lo + half, hi, on_rows, step)
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


def _survivor_statistics(sim: np.ndarray, k: int, *, block_elements: int) -> tuple[Any, Any, Any, Any] | None:
    """What :func:`_sorted_statistics` returns, plus the column sums, from one scan of ``sim`` (numpy).

    Needs ``k`` below the gallery size. Raises ``ValueError`` for non-finite entries. Returns ``None``
    (the caller then takes the sort path) when more than ``_SURVIVOR_FACTOR * Nq * (K + 1)`` entries
    reach the floor or more than ``_MAX_REDO_FRACTION`` of the queries would have to be redone.
    """
    n_query, n_gallery = sim.shape
    # Scan the matrix in memory order: t2i passes a transposed view of images x captions.
    queries_are_rows = sim.flags.c_contiguous or not sim.T.flags.c_contiguous
    base = np.ascontiguousarray(sim) if queries_are_rows else sim.T
    sim = base if queries_are_rows else base.T
    floor = _survivor_floor(sim, k)
    limit = _SURVIVOR_FACTOR * n_query * (k + 1)
    step = max(1, min(block_elements, _SCAN_BLOCK_ELEMENTS) // base.shape[1])
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
    if np.count_nonzero(counts <= k) > n_query * _MAX_REDO_FRACTION:  # known before sorting anything
        return None
    entry, redo = _top_entries(query, counts, ~keys, k)
    redo_queries = np.flatnonzero(redo)
    if redo_queries.size > n_query * _MAX_REDO_FRACTION:  # tie-heavy: sorting is cheaper
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
        reverse_ranks[pair_query, pair_rank] = _reverse_positions(
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
    sample = np.unique(np.linspace(0, n_query - 1, min(n_query, _FLOOR_SAMPLE)).astype(np.intp))
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
    column_sums = _pairwise_column_sums(base, survivors.add, step=step)
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
    """``np.flatnonzero(mask)`` for a C-contiguous boolean array, faster at survivor densities.

    numpy's nonzero loop branches on every element, which mispredicts most between ~1% and ~10%
    True; for such ``sparse`` masks, finding the nonzero 8-byte words first and then the True bytes
    inside them is about twice as fast. Dense masks take numpy's branch-free loop.
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
        _check_finite(np, matrix, "sim")


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
        cand[chunk] = _forward_candidates(np, block, cand.shape[1])
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
    several times faster than an argsort), else a lexsort.
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


def _bank_statistics(xp: ModuleType, bank_values: Any, values: Any) -> tuple[Any, Any]:
    """Column sums and reverse ranks of the online form: each query appended alone to the bank.

    ``bank_values`` [nb, n, K] are the bank's similarities to each query's K candidates.
    """
    _check_finite(xp, bank_values, "bank_sims")
    column_sums = bank_values.sum(axis=0, dtype=xp.float64) + values
    # With no equal bank value, the query's position in argsort(-column) is the count of larger values.
    reverse_ranks = (bank_values > values[None]).sum(axis=0).astype(xp.float64)
    tied = (bank_values == values[None]).any(axis=0)
    if bool(tied.any()):
        rows, slots = xp.nonzero(tied)
        reverse_ranks[rows, slots] = _appended_positions(xp, bank_values[:, rows, slots], values[rows, slots])
    return column_sums, reverse_ranks


def _appended_positions(xp: ModuleType, bank_columns: Any, query_values: Any) -> Any:
    """Position of an appended value in ``argsort(-[bank_column; value])``, by running that argsort."""
    appended = xp.concatenate([bank_columns.T, query_values[:, None]], axis=1)
    order = xp.argsort(-appended, axis=1)
    return xp.argmax(order == bank_columns.shape[0], axis=1).astype(xp.float64)


def _mr_scores(xp: ModuleType, values: Any, column_sums: Any, reverse_ranks: Any, config: RerankConfig) -> Any:
    """MR scores ``[n, K]`` (float32) for candidates in forward-rank order."""
    # p2 and p3 share this curve; numpy's exp on the host, like the original's np.exp calls.
    prior = np.exp(-config.decay * (np.arange(values.shape[1], dtype=np.float64) + 1.0))
    # Each term is added to a float32 store, as the original does element by element.
    scores = (config.wp1 * (values / column_sums)).astype(xp.float32)
    scores = (scores.astype(xp.float64) + xp.asarray(prior)[None, :]).astype(xp.float32)
    reverse_prior = xp.asarray(_by_reverse_ordinal(reverse_ranks, config.wp2 * prior))
    return (scores.astype(xp.float64) + reverse_prior).astype(xp.float32)


def _by_reverse_ordinal(reverse_ranks: Any, curve: np.ndarray) -> np.ndarray:
    """``curve[o]`` for each candidate, ``o`` being its ordinal when the query's candidates are
    sorted by reverse rank.

    Always numpy on the host: equal reverse ranks are common, and the original breaks those ties
    with numpy's default float64 argsort, which a stable GPU sort would not reproduce.
    """
    host = reverse_ranks.get() if hasattr(reverse_ranks, "get") else np.asarray(reverse_ranks)
    n_rows, k = host.shape
    order = _argsort_rows(host)
    order += (np.arange(n_rows) * k)[:, None]  # flat positions: one scatter instead of a 2-D one
    out = np.empty((n_rows, k), dtype=np.float64)
    out.reshape(-1)[order] = curve
    return out


def _argsort_rows(ranks: np.ndarray) -> np.ndarray:
    """``np.argsort(ranks, axis=1)`` for rows of whole-number ranks, 2-3x faster on short rows.

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


def _scatter(xp: ModuleType, scores: Any, cand: Any, n_gallery: int) -> Any:
    out = xp.zeros((cand.shape[0], n_gallery), dtype=xp.float32)
    out.reshape(-1)[cand + (xp.arange(cand.shape[0]) * n_gallery)[:, None]] = scores
    return out


__all__ = [
    "DEFAULT_BLOCK_ELEMENTS",
    "MIN_CANDIDATES",
    "Direction",
    "candidate_count",
    "get_array_module",
    "rerank",
    "rerank_i2t",
    "rerank_online",
    "rerank_t2i",
]
