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

Two private paths compute the same matrix: the **survivor path** (:mod:`._rerank_fast`: numpy,
float32/float64, ``K`` below the gallery size; one scan, no full sorts) and the **sort path**
(:mod:`._rerank_sort`: CuPy, other dtypes, tiny galleries, and the survivor path's fall-back; row
and column argsorts in blocks). Both reproduce the original's tie order.

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
from typing import Any, Literal

import numpy as np

from galr.config import RerankConfig
from galr.errors import InputError
from galr.retrieval import _rerank_fast as _fast
from galr.retrieval import _rerank_sort as _sort

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
    survivor_path = xp is np and getattr(sim, "dtype", None) in _sort.EXACT_SUM_DTYPES
    # The survivor path reads finiteness off the column sums it computes anyway: no separate pass.
    _check_similarity(xp, sim, "sim", check_finite=not survivor_path)
    n_query, n_gallery = sim.shape
    k = candidate_count(config.k, n_gallery)
    rows = _rows_per_block(query_chunk, n_gallery)
    block_elements = rows * n_gallery

    statistics = None
    if survivor_path and k < n_gallery:
        statistics = _fast.survivor_statistics(sim, k, block_elements=block_elements)
    if statistics is None:
        if survivor_path:
            _sort.check_finite(xp, sim, "sim")
        statistics = (*_sort.sorted_statistics(xp, sim, k, rows=rows), _sort.column_sums(xp, sim))
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
    raise InputError(f"direction must be 'i2t' or 't2i', got {direction!r}")


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
        raise InputError("query_sims and bank_sims must both be numpy or both be CuPy arrays")
    _check_similarity(xp, query_sims, "query_sims")
    # The bank is fixed across calls: only the columns a batch uses are checked for NaN (per block).
    _check_similarity(xp, bank_sims, "bank_sims", allow_empty_rows=True, check_finite=False)
    if bank_sims.shape[1] != query_sims.shape[1]:
        raise InputError(
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
        cand = _sort.forward_candidates(xp, block, k)
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
        raise InputError(f"bank_values must be [nb, nq, K] for values [nq, K]; got {tuple(bank_values.shape)} "
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
        raise InputError(f"{name} must be a 2-D [queries, gallery] matrix, got shape {getattr(sim, 'shape', None)}")
    if not np.issubdtype(sim.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point matrix, got dtype {sim.dtype}; cast it to float32/float64")
    if sim.shape[1] == 0 or (sim.shape[0] == 0 and not allow_empty_rows):
        raise InputError(f"{name} is empty (shape {sim.shape}); MR needs at least one query and one gallery item")
    if check_finite:
        _sort.check_finite(xp, sim, name)


def _rows_per_block(query_chunk: int | None, n_gallery: int) -> int:
    if query_chunk is None:
        return max(1, DEFAULT_BLOCK_ELEMENTS // n_gallery)
    if query_chunk < 1:
        raise InputError(f"query_chunk must be >= 1, got {query_chunk}")
    return int(query_chunk)


def _bank_statistics(xp: ModuleType, bank_values: Any, values: Any) -> tuple[Any, Any]:
    """Column sums and reverse ranks of the online form: each query appended alone to the bank.

    ``bank_values`` [nb, n, K] are the bank's similarities to each query's K candidates.
    """
    _sort.check_finite(xp, bank_values, "bank_sims")
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
    order = _sort.argsort_rows(host)
    order += (np.arange(n_rows) * k)[:, None]  # flat positions: one scatter instead of a 2-D one
    out = np.empty((n_rows, k), dtype=np.float64)
    out.reshape(-1)[order] = curve
    return out


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
