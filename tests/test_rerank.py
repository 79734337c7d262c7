"""Tests for galr.retrieval.rerank against a plain loop version of the authors' MR."""

from __future__ import annotations

import numpy as np
import pytest

import galr.retrieval._rerank_fast as fast_module
import galr.retrieval._rerank_sort as sort_module
from galr.bench.mr_reference import i2t_rerank_optim, t2i_rerank_optim
from galr.config import RerankConfig
from galr.retrieval.rerank import (
    candidate_count,
    get_array_module,
    rerank,
    rerank_i2t,
    rerank_online,
    rerank_t2i,
)

TOLERANCE = 1e-6
CONFIG = RerankConfig()


def _loop_mr(sim: np.ndarray, config: RerankConfig) -> np.ndarray:
    """The original ``i2t_rerank_optim`` one query and one candidate at a time.

    Differences from the original, both harmless: ``decay`` is a parameter (the original hard-codes
    0.05) and K is capped at the gallery size (the original raises IndexError there).
    """
    n_query, n_gallery = sim.shape
    k = min(max(10, config.k), n_gallery)
    best_items = np.argsort(-sim, axis=1)
    best_queries = np.argsort(-sim, axis=0)
    out = np.zeros(sim.shape, dtype=np.float32)
    for q in range(n_query):
        candidates = best_items[q, :k]
        reverse = []
        for j, g in enumerate(candidates):
            out[q, g] = config.wp1 * (sim[q, g] / np.sum(sim[:, g]))
            out[q, g] += np.exp(-config.decay * (j + 1))
            reverse.append(float(list(best_queries[:, g]).index(q)))
        for idx, g in enumerate(candidates[np.argsort(np.array(reverse))]):
            out[q, g] += config.wp2 * np.exp(-config.decay * (idx + 1))
    return out


def _matrix(shape: tuple[int, int], kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "continuous":
        return rng.random(shape)
    values = rng.integers(1, 5, size=shape) / 4.0  # four distinct values: ties everywhere
    return values.astype(np.float32) if kind == "ties32" else values


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


SHAPES = [
    (30, 150),  # more gallery than queries (i2t of the test sets)
    (150, 30),  # more queries than gallery (t2i)
    (7, 35),  # fewer queries than K
    (40, 8),  # fewer gallery items than K and than 10
    (25, 25),  # square
    (20, 11),  # K = 10 is one less than the gallery: the partition fast path's edge
]


@pytest.mark.parametrize("kind", ["continuous", "ties64", "ties32"])
@pytest.mark.parametrize("shape", SHAPES)
def test_both_directions_match_the_loop(shape, kind):
    sim = _matrix(shape, kind, seed=shape[0])
    assert _max_diff(rerank_i2t(sim, CONFIG), _loop_mr(sim, CONFIG)) <= TOLERANCE
    assert _max_diff(rerank_t2i(sim, CONFIG), _loop_mr(sim.T, CONFIG).T) <= TOLERANCE


@pytest.mark.parametrize(
    "config",
    [RerankConfig(k=3), RerankConfig(k=12, wp1=0.7, wp2=0.2, decay=0.1), RerankConfig(k=200, wp1=1.0, wp2=0.7)],
)
def test_other_parameters_match_the_loop(config):
    sim = _matrix((36, 90), "ties64", seed=5)
    assert _max_diff(rerank_i2t(sim, config), _loop_mr(sim, config)) <= TOLERANCE
    assert _max_diff(rerank(sim, "t2i", config), _loop_mr(sim.T, config).T) <= TOLERANCE


@pytest.mark.parametrize("kind", ["continuous", "ties64"])
def test_matches_the_benchmark_transcription(kind):
    sim = _matrix((32, 96), kind, seed=9)
    assert _max_diff(rerank_i2t(sim, CONFIG), i2t_rerank_optim(sim, CONFIG.k, CONFIG.wp1, CONFIG.wp2)) <= TOLERANCE
    assert _max_diff(rerank_t2i(sim, CONFIG), t2i_rerank_optim(sim, CONFIG.k, CONFIG.wp1, CONFIG.wp2)) <= TOLERANCE


@pytest.mark.parametrize(("k", "expected"), [(1, 10), (10, 10), (30, 30), (500, 64)])
def test_only_each_querys_top_k_is_nonzero(k, expected):
    assert candidate_count(k, 64) == expected
    sim = _matrix((20, 64), "continuous", seed=k)  # positive similarities, so every score is > 0
    out = rerank_i2t(sim, RerankConfig(k=k))
    assert out.dtype == np.float32
    top = np.argsort(-sim, axis=1)[:, :expected]
    expected_mask = np.zeros(sim.shape, dtype=bool)
    np.put_along_axis(expected_mask, top, True, axis=1)
    np.testing.assert_array_equal(out != 0, expected_mask)


def test_query_chunk_does_not_change_the_result():
    # query_chunk=1 also forces many small gallery-column blocks in the reverse-rank pass.
    sim = _matrix((45, 120), "ties64", seed=2)
    whole = rerank_i2t(sim, CONFIG)
    for chunk in (1, 4, 44, 1000):
        np.testing.assert_array_equal(rerank_i2t(sim, CONFIG, query_chunk=chunk), whole)


def test_non_contiguous_input():
    sim = _matrix((60, 100), "ties64", seed=4)
    view = sim[::2, 10:90]
    np.testing.assert_array_equal(rerank_i2t(view, CONFIG), rerank_i2t(np.ascontiguousarray(view), CONFIG))
    np.testing.assert_array_equal(rerank(sim, "i2t", CONFIG), rerank_i2t(sim, CONFIG))


def _online_bank_and_queries(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    bank = rng.integers(1, 9, size=(50, 40)) / 8.0
    queries = rng.random((12, 40))
    queries[:6] = rng.integers(1, 9, size=(6, 40)) / 8.0  # half the queries tie with bank values
    return bank, queries


@pytest.mark.parametrize("config", [CONFIG, RerankConfig(k=5, wp1=1.0, wp2=0.7)])
def test_online_equals_appending_each_query_to_the_bank(config):
    bank, queries = _online_bank_and_queries(seed=config.k)
    online = rerank_online(queries, bank, config)
    for i in range(len(queries)):
        appended = rerank_i2t(np.vstack([bank, queries[i : i + 1]]), config)[-1]
        assert _max_diff(online[i], appended) <= TOLERANCE, f"query {i}"


def test_online_queries_do_not_see_each_other():
    bank, queries = _online_bank_and_queries(seed=1)
    batch = rerank_online(queries, bank, CONFIG)
    singles = np.vstack([rerank_online(queries[i : i + 1], bank, CONFIG) for i in range(len(queries))])
    np.testing.assert_array_equal(batch, singles)
    np.testing.assert_array_equal(rerank_online(queries, bank, CONFIG, query_chunk=5), batch)


def test_online_with_an_empty_bank_and_mixed_dtypes():
    rng = np.random.default_rng(8)
    queries = rng.random((4, 25)).astype(np.float32)
    alone = rerank_online(queries, np.empty((0, 25), dtype=np.float32), CONFIG)
    for i in range(4):
        assert _max_diff(alone[i], rerank_i2t(queries[i : i + 1], CONFIG)[0]) <= TOLERANCE
    bank = rng.random((30, 25))  # float64 bank: the query is promoted, as vstack would do
    mixed = rerank_online(queries, bank, CONFIG)
    expected = rerank_i2t(np.vstack([bank, queries[:1]]), CONFIG)[-1]
    assert _max_diff(mixed[0], expected) <= TOLERANCE


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: rerank_i2t(np.zeros(5), CONFIG), ValueError, "2-D"),
        (lambda: rerank_i2t(np.zeros((3, 0)), CONFIG), ValueError, "empty"),
        (lambda: rerank_i2t(np.ones((3, 4), dtype=np.int64), CONFIG), TypeError, "floating"),
        (lambda: rerank_i2t(np.full((3, 4), np.inf), CONFIG), ValueError, "NaN or inf"),
        (lambda: rerank_i2t(np.ones((3, 4)), CONFIG, query_chunk=0), ValueError, "query_chunk"),
        (lambda: rerank(np.ones((3, 4)), "x2y", CONFIG), ValueError, "direction"),  # type: ignore[arg-type]
        (lambda: rerank_online(np.ones((2, 4)), np.ones((3, 5)), CONFIG), ValueError, "same gallery"),
        (lambda: rerank_online(np.ones((2, 4)), np.ones(4), CONFIG), ValueError, "bank_sims"),
        (lambda: rerank_online(np.ones((2, 4)), np.full((3, 4), np.nan), CONFIG), ValueError, "bank_sims contains NaN"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_array_module_is_numpy_for_numpy_input_and_lists():
    assert get_array_module(np.zeros(2)) is np
    assert get_array_module([1.0]) is np
    sim = _matrix((12, 15), "continuous", seed=6)
    np.testing.assert_array_equal(rerank_t2i(sim.tolist(), CONFIG), rerank_t2i(sim, CONFIG))


@pytest.mark.gpu
def test_cupy_arrays_stay_on_the_device_and_match_numpy():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install 'galr[gpu]')")
    sim = _matrix((70, 300), "continuous", seed=3)  # no equal values: CuPy's stable sort agrees
    device_sim = cupy.asarray(sim)
    assert get_array_module(device_sim) is cupy
    for direction in ("i2t", "t2i"):
        out = rerank(device_sim, direction, CONFIG, query_chunk=16)
        assert isinstance(out, cupy.ndarray)
        assert _max_diff(cupy.asnumpy(out), rerank(sim, direction, CONFIG)) <= TOLERANCE
    bank, queries = sim[:60], sim[60:]
    online = rerank_online(cupy.asarray(queries), cupy.asarray(bank), CONFIG)
    assert isinstance(online, cupy.ndarray)
    assert _max_diff(cupy.asnumpy(online), rerank_online(queries, bank, CONFIG)) <= TOLERANCE


def test_candidate_form_equals_online_form_on_its_candidates():
    from galr.retrieval.rerank import rerank_candidates, rerank_online

    rng = np.random.default_rng(7)
    bank, queries = rng.random((40, 60)), rng.random((5, 60))
    queries[0, :5] = bank[3, :5]  # ties with bank values go through the argsort path
    config = RerankConfig(k=12)
    dense = rerank_online(queries, bank, config)
    order = np.argsort(-queries, axis=1)[:, :12]
    values = np.take_along_axis(queries, order, axis=1)
    scores = rerank_candidates(values, bank[:, order], config)
    np.testing.assert_allclose(scores, np.take_along_axis(dense, order, axis=1), atol=1e-6)
    with pytest.raises(ValueError, match=r"\[nb, nq, K\]"):
        rerank_candidates(values, bank, config)


# --- survivor path (numpy float32/float64) against the sort path and the loop -----------------------


def _cosine(n_query: int, n_gallery: int, dtype: type, seed: int) -> np.ndarray:
    """Cosine similarities of L2-normalised random embeddings, computed in ``dtype`` (as an encoder would)."""
    rng = np.random.default_rng(seed)
    queries, gallery = rng.standard_normal((n_query, 48)), rng.standard_normal((n_gallery, 48))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    return queries.astype(dtype) @ gallery.astype(dtype).T


def _hard_matrix(kind: str, dtype: type, seed: int = 0) -> np.ndarray:
    """[40, 160] matrices that drive the survivor path into each of its exact fallbacks."""
    rng = np.random.default_rng(seed)
    sim = rng.random((40, 160))
    if kind == "outlier_rows":  # below the sampled floor: redone with full-row argsorts and column counts
        sim[[5, 22]] *= 0.2
    elif kind == "tied_tops":  # equal values inside a query's top K + 1, and repeated inside a column
        for query in (3, 17, 30):
            top = np.argsort(-sim[query])[:12]
            sim[query, top[4]] = sim[query, top[2]]
            sim[(query + 7) % 40, top[0]] = sim[query, top[0]]
    elif kind == "float32_collisions":  # distinct float64 values that round to one float32
        for query in (2, 9, 33):
            top = np.argsort(-sim[query])[:12]
            sim[query, top[6]] = np.nextafter(sim[query, top[5]], -1.0)
            sim[(query + 3) % 40, top[1]] = np.nextafter(sim[query, top[1]], 2.0)
    elif kind == "signed_zeros":  # -0.0 == 0.0 as the largest values of a few rows and columns
        sim = -sim
        sim[[4, 19, 28], [7, 60, 99]] = 0.0
        sim[[4, 19, 11], [8, 61, 99]] = -0.0
    return sim.astype(dtype)


def _both_orientations(sim: np.ndarray) -> list[np.ndarray]:
    return [sim, sim.T]  # C-contiguous (i2t) and a transposed view (t2i): the two scan layouts


def _assert_paths_agree(sim: np.ndarray, k: int, block_elements: int = 1 << 22) -> None:
    found = fast_module.survivor_statistics(sim, k, block_elements=block_elements)
    assert found is not None, "the survivor path gave up"
    cand, values, reverse_ranks, column_sums = found
    rows = max(1, block_elements // sim.shape[1])
    expected_cand, expected_values, expected_ranks = sort_module.sorted_statistics(np, sim, k, rows=rows)
    np.testing.assert_array_equal(cand, expected_cand)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(reverse_ranks, expected_ranks)
    np.testing.assert_array_equal(column_sums, [np.sum(sim[:, g]) for g in range(sim.shape[1])])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(45, 230), (230, 45), (24, 300), (64, 64)])
def test_survivor_path_equals_the_sort_path(shape, dtype):
    for sim in _both_orientations(_cosine(*shape, dtype, seed=shape[0])):
        # K + 1 == gallery size (300 x 24) is the smallest gallery the survivor path takes.
        _assert_paths_agree(sim, k=min(30, sim.shape[1] - 1))


@pytest.mark.parametrize("kind", ["outlier_rows", "tied_tops", "float32_collisions", "signed_zeros"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_survivor_path_resolves_ties_and_low_queries_exactly(kind, dtype, monkeypatch):
    calls = {"redone": 0, "argsorted_columns": 0}
    exact_forward, reverse_positions = fast_module._exact_forward, fast_module.reverse_positions

    def spy_forward(sim, queries, *args, **kwargs):
        calls["redone"] += queries.size
        return exact_forward(sim, queries, *args, **kwargs)

    def spy_reverse(*args, **kwargs):
        calls["argsorted_columns"] += 1
        return reverse_positions(*args, **kwargs)

    monkeypatch.setattr(fast_module, "_exact_forward", spy_forward)
    monkeypatch.setattr(fast_module, "reverse_positions", spy_reverse)
    sim = _hard_matrix(kind, dtype)
    for view in _both_orientations(sim):
        _assert_paths_agree(view, k=10)
    expected = "argsorted_columns" if kind == "float32_collisions" else "redone"
    if kind != "float32_collisions" or dtype == np.float64:  # float32 input has no float64 near-ties
        assert calls[expected] > 0, calls
    np.testing.assert_array_equal(rerank_i2t(sim, CONFIG), i2t_rerank_optim(sim, CONFIG.k, CONFIG.wp1, CONFIG.wp2))
    np.testing.assert_array_equal(rerank_t2i(sim, CONFIG), t2i_rerank_optim(sim, CONFIG.k, CONFIG.wp1, CONFIG.wp2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cosine_matrices_are_bit_identical_to_the_original(dtype):
    sim = _cosine(50, 250, dtype, seed=11)
    config = RerankConfig(k=20, wp1=0.7, wp2=0.9)
    np.testing.assert_array_equal(rerank_i2t(sim, config), i2t_rerank_optim(sim, config.k, config.wp1, config.wp2))
    np.testing.assert_array_equal(rerank_t2i(sim, config), t2i_rerank_optim(sim, config.k, config.wp1, config.wp2))
    assert rerank_i2t(sim, config).dtype == np.float32


def test_small_blocks_do_not_change_the_survivor_path():
    sim = _cosine(40, 180, np.float64, seed=3)
    for direction in ("i2t", "t2i"):
        whole = rerank(sim, direction, CONFIG)
        for chunk in (1, 7):
            np.testing.assert_array_equal(rerank(sim, direction, CONFIG, query_chunk=chunk), whole)
    view = np.asfortranarray(sim)[::2, ::3]  # neither C- nor F-contiguous
    np.testing.assert_array_equal(rerank_t2i(view, CONFIG), rerank_t2i(np.ascontiguousarray(view), CONFIG))


def test_tie_heavy_matrices_hand_over_to_the_sort_path():
    sim = _matrix((40, 160), "ties64", seed=1)
    assert fast_module.survivor_statistics(sim, 30, block_elements=1 << 22) is None
    assert _max_diff(rerank_i2t(sim, CONFIG), _loop_mr(sim, CONFIG)) <= TOLERANCE


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_survivor_path_rejects_non_finite_entries(bad_value, direction):
    sim = _cosine(30, 150, np.float32, seed=2)
    sim[7, 40] = bad_value
    with pytest.raises(ValueError, match="NaN or inf"):
        rerank(sim, direction, CONFIG)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pairwise_column_sums_match_numpy_per_column(dtype):
    rng = np.random.default_rng(4)
    for n_rows in (1, 7, 8, 9, 127, 128, 129, 300, 1001):
        matrix = (rng.standard_normal((n_rows, 13)) * 10.0 ** rng.uniform(-3, 3, (n_rows, 1))).astype(dtype)
        matrix[:, 0] = -0.0  # numpy's sum of -0.0s is 0.0
        for step in (3, 64, 1 << 30):
            runs: list[tuple[int, int]] = []

            def record(first: int, rows: np.ndarray) -> None:
                runs.append((first, len(rows)))

            sums = sort_module.pairwise_column_sums(matrix, record, step=step)
            np.testing.assert_array_equal(sums, [np.sum(matrix[:, j]) for j in range(13)])
            assert np.signbit(sums[0]) == np.signbit(np.sum(matrix[:, 0]))
            assert [first for first, _ in runs] == list(np.cumsum([0] + [size for _, size in runs])[:-1])
            assert sum(size for _, size in runs) == n_rows


@pytest.mark.parametrize("size", [0, 5, 64, 1003, 40_001])
def test_true_positions_equal_flatnonzero(size):
    rng = np.random.default_rng(size)
    for density in (0.0, 0.004, 0.05, 0.5, 1.0):
        mask = rng.random(size) < density
        for sparse in (True, False):
            np.testing.assert_array_equal(fast_module._true_positions(mask, sparse=sparse), np.flatnonzero(mask))
    grid = rng.random((37, 91)) < 0.03
    np.testing.assert_array_equal(fast_module._true_positions(grid, sparse=True), np.flatnonzero(grid))


def test_grouped_order_lexsort_fallback_equals_packed_sort():
    rng = np.random.default_rng(6)
    groups = rng.integers(0, 50, 5000)
    keys = rng.integers(0, 40, 5000).astype(np.uint32)  # many equal (group, key) pairs
    packed_order, packed_heads = fast_module._grouped_order(groups, keys, 50)
    # A group count too large for the 64-bit packing takes the lexsort branch.
    lexsort_order, lexsort_heads = fast_module._grouped_order(groups, keys, 1 << 40)
    np.testing.assert_array_equal(packed_order, lexsort_order)
    np.testing.assert_array_equal(packed_heads, lexsort_heads)
    np.testing.assert_array_equal(packed_order, np.lexsort((keys, groups)))
    np.testing.assert_array_equal(packed_heads >> np.uint64(32), groups[packed_order])


@pytest.mark.parametrize("highest", [2, 30, 5000])
def test_argsort_rows_equals_numpy_argsort_with_and_without_ties(highest):
    # MR's third term depends on argsort's order among equal reverse ranks: rows with ties must
    # come out exactly as np.argsort orders them, the others in plain value order.
    rng = np.random.default_rng(highest)
    ranks = rng.integers(0, highest, (400, 30)).astype(np.float64)
    np.testing.assert_array_equal(sort_module.argsort_rows(ranks), np.argsort(ranks, axis=1))
    huge = np.full((2, 3), 2.0**61)  # keys would overflow int64: numpy's argsort runs
    np.testing.assert_array_equal(sort_module.argsort_rows(huge), np.argsort(huge, axis=1))
