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

This module computes the same matrix without a loop over queries: forward candidates come from row
argsorts, reverse ranks from column argsorts turned into inverse permutations, and the three terms
are broadcast over ``[Nq, K]``. Parity with the original, on the same input:

* ``K = max(10, k)`` is kept (the authors' silent override); when the gallery has fewer than ``K``
  items every item is a candidate (the original raises ``IndexError`` there).
* Ties are broken exactly as numpy's default ``np.argsort`` breaks them in the original: the same
  calls are made on the same values and dtypes (the reverse ranks are sorted as float64, because the
  original accumulates them with ``np.append`` onto a float array). numpy's default sort is not
  stable, so this is the only way to get identical outputs on tie-heavy matrices.
* The float32 rounding steps of the original (``wp1 * p1`` stored, then ``+= p2``, then ``+= wp2 * p3``)
  are repeated, and the column sums are numpy's pairwise sums of each column, so float64 input
  normally gives bit-identical output; the contract is a max abs difference of 1e-6.

Memory: the output is a dense float32 ``[Nq, Ng]``; everything else is ``[Nq, K]`` plus one working
block at a time. Queries are processed ``query_chunk`` rows at a time (each block holds an int64
argsort of ``query_chunk x Ng``) and the reverse ranks are taken from blocks of gallery columns of
the same element count, so the full ``[Nq, Ng]`` reverse-rank matrix is never held.

CuPy: pass CuPy arrays and everything runs on the device (CuPy out). CuPy's sorts are stable, so on
matrices with *equal similarity values* candidates may be ordered differently from numpy; the
reverse-rank ordering (where ties are the rule, not the exception) is always done with numpy on the
host, so it matches exactly.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Literal

import numpy as np

from galr.config import RerankConfig

Direction = Literal["i2t", "t2i"]

#: Elements (``rows x columns``) in one working block when the caller does not choose a chunk size:
#: about 64 MB of int64 argsort output plus a float copy, small next to the dense output matrix.
DEFAULT_BLOCK_ELEMENTS = 1 << 22

#: The original raises any K below this to it (``K1 = max(10, K1)``).
MIN_CANDIDATES = 10


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
            Reverse ranks use blocks of gallery columns with the same element count.

    Returns:
        float32 ``[Nq, Ng]`` on the same device as ``sim``: MR scores for each query's top
        ``max(10, k)`` items, 0 elsewhere.

    Raises:
        ValueError: if ``sim`` is not a non-empty, finite 2-D matrix or ``query_chunk < 1``.
        TypeError: if ``sim`` is not a floating-point array.
    """
    xp, sim = _as_array(sim)
    _check_similarity(xp, sim, "sim")
    n_query, n_gallery = sim.shape
    k = candidate_count(config.k, n_gallery)
    rows = _rows_per_block(query_chunk, n_gallery)

    cand = xp.empty((n_query, k), dtype=xp.int64)
    for start in range(0, n_query, rows):
        cand[start : start + rows] = _forward_candidates(xp, sim[start : start + rows], k)
    values = xp.take_along_axis(sim, cand, axis=1)
    column_sums, reverse_ranks = _reverse_statistics(xp, sim, cand, element_budget=rows * n_gallery)
    scores = _mr_scores(xp, values, column_sums, reverse_ranks, config)
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


def _reverse_statistics(xp: ModuleType, sim: Any, cand: Any, *, element_budget: int) -> tuple[Any, Any]:
    """Column sums and reverse ranks for every (query, candidate) pair of the offline form.

    Returns ``(column_sums [Nq, K] in sim's dtype, reverse_ranks [Nq, K] float64)`` where the reverse
    rank is the position of the query in ``argsort(-sim[:, g], axis=0)``.
    """
    n_query, k = cand.shape
    pair_query = xp.repeat(xp.arange(n_query), k)
    pair_gallery = cand.ravel()
    # Group the pairs by gallery column so each column block reads one contiguous slice of them.
    by_column = xp.argsort(pair_gallery)
    sorted_gallery = pair_gallery[by_column]
    columns = xp.unique(sorted_gallery)  # only columns some query has as a candidate
    width = max(1, element_budget // n_query)
    starts = xp.concatenate([columns[::width], columns[-1:] + 1])
    edges = [int(e) for e in xp.searchsorted(sorted_gallery, starts)]

    column_sums = xp.empty(n_query * k, dtype=sim.dtype)
    reverse_ranks = xp.empty(n_query * k, dtype=xp.float64)
    query_positions = xp.arange(n_query, dtype=xp.int32)[None, :]
    for block_index in range(len(edges) - 1):
        lo, hi = edges[block_index], edges[block_index + 1]
        block_columns = columns[block_index * width : (block_index + 1) * width]
        # One contiguous row per gallery column: numpy's pairwise sum and argsort then see exactly the
        # values the original's np.sum(sim[:, g]) and np.argsort(-sim, 0) see.
        transposed = xp.ascontiguousarray(sim.T[block_columns])  # [w, Nq], one copy
        order = xp.argsort(-transposed, axis=1)
        positions = xp.empty(order.shape, dtype=xp.int32)
        positions[xp.arange(len(block_columns))[:, None], order] = query_positions
        pairs = by_column[lo:hi]
        local_column = xp.searchsorted(block_columns, sorted_gallery[lo:hi])
        reverse_ranks[pairs] = positions[local_column, pair_query[pairs]]
        column_sums[pairs] = transposed.sum(axis=1)[local_column]
    return column_sums.reshape(n_query, k), reverse_ranks.reshape(n_query, k)


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
    k = values.shape[1]
    prior = xp.exp(-config.decay * (xp.arange(k, dtype=xp.float64) + 1.0))  # p2 and p3 share this curve
    # Each term is added to a float32 store, as the original does element by element.
    scores = (config.wp1 * (values / column_sums)).astype(xp.float32)
    scores = (scores.astype(xp.float64) + prior[None, :]).astype(xp.float32)
    ordinal = xp.asarray(_reverse_ordinals(reverse_ranks))
    return (scores.astype(xp.float64) + config.wp2 * prior[ordinal]).astype(xp.float32)


def _reverse_ordinals(reverse_ranks: Any) -> np.ndarray:
    """Ordinal of each candidate when a query's candidates are sorted by reverse rank.

    Always numpy on the host: equal reverse ranks are common, and the original breaks those ties
    with numpy's default float64 argsort, which a stable GPU sort would not reproduce.
    """
    host = reverse_ranks.get() if hasattr(reverse_ranks, "get") else np.asarray(reverse_ranks)
    order = np.argsort(host, axis=1)
    ordinal = np.empty_like(order)
    ordinal[np.arange(host.shape[0])[:, None], order] = np.arange(host.shape[1])[None, :]
    return ordinal


def _scatter(xp: ModuleType, scores: Any, cand: Any, n_gallery: int) -> Any:
    out = xp.zeros((cand.shape[0], n_gallery), dtype=xp.float32)
    out[xp.arange(cand.shape[0])[:, None], cand] = scores
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
