"""Tests for galr.retrieval.rerank against a plain loop version of the authors' MR."""

from __future__ import annotations

import numpy as np
import pytest

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
