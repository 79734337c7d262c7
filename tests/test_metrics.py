"""Tests for galr.retrieval.metrics: hand-computed ranks, the caption convention, ties, a loop oracle."""

from __future__ import annotations

import numpy as np
import pytest

from galr.bench.mr_reference import i2t_rerank_optim, t2i_rerank_optim
from galr.config import RerankConfig
from galr.retrieval.metrics import (
    RetrievalMetrics,
    evaluate_similarity,
    evaluate_with_rerank,
    i2t_ranks,
    t2i_ranks,
)


def _loop_i2t_ranks(S: np.ndarray, cpi: int) -> np.ndarray:
    """The authors' per-image loop: ascending argsort read backwards, best own caption."""
    ranks = []
    for image in range(S.shape[0]):
        ranking = np.argsort(S[image])[::-1]
        ranks.append(min(int(np.where(ranking == c)[0][0]) for c in range(cpi * image, cpi * image + cpi)))
    return np.array(ranks)


def _loop_t2i_ranks(S: np.ndarray, cpi: int) -> np.ndarray:
    """The authors' per-caption loop over the transposed matrix."""
    by_caption = S.T
    return np.array(
        [int(np.where(np.argsort(by_caption[c])[::-1] == c // cpi)[0][0]) for c in range(S.shape[1])]
    )


def _loop_metrics(S: np.ndarray, cpi: int) -> dict[str, float]:
    return RetrievalMetrics.from_ranks(_loop_i2t_ranks(S, cpi), _loop_t2i_ranks(S, cpi)).to_dict()


def test_hand_computed_two_captions_per_image():
    S = np.array([
        [0.9, 0.1, 0.8, 0.3],  # image 0 owns captions 0, 1: caption 0 is first -> rank 0
        [0.7, 0.2, 0.6, 0.5],  # image 1 owns captions 2, 3: order 0, 2, 3, 1 -> rank 1
    ])
    np.testing.assert_array_equal(i2t_ranks(S, captions_per_image=2), [0, 1])
    # caption 0 -> image 0 first; caption 1: 0.2 > 0.1 puts image 0 second; caption 2 (image 1):
    # 0.6 < 0.8 -> second; caption 3 (image 1): 0.5 > 0.3 -> first.
    np.testing.assert_array_equal(t2i_ranks(S, captions_per_image=2), [0, 1, 1, 0])

    metrics = evaluate_similarity(S, captions_per_image=2)
    assert (metrics.i2t_r1, metrics.i2t_r5, metrics.i2t_r10) == (50.0, 100.0, 100.0)
    assert (metrics.t2i_r1, metrics.t2i_r5, metrics.t2i_r10) == (50.0, 100.0, 100.0)
    assert (metrics.i2t_medr, metrics.i2t_meanr) == (1.0, 1.5)  # floor(0.5) + 1, 0.5 + 1
    assert (metrics.t2i_medr, metrics.t2i_meanr) == (1.0, 1.5)
    assert metrics.mean_recall == pytest.approx(500.0 / 6.0)


def test_hand_computed_five_caption_convention():
    S = np.array([
        # image 0 owns captions 0-4; captions 5-8 score higher, so its best own (4) sits at position 4.
        [0.10, 0.20, 0.30, 0.40, 0.50, 0.90, 0.80, 0.70, 0.60, 0.05],
        # image 1 owns captions 5-9; only caption 0 beats caption 5 -> rank 1.
        [0.95, 0.30, 0.20, 0.10, 0.00, 0.50, 0.45, 0.40, 0.35, 0.25],
    ])
    np.testing.assert_array_equal(i2t_ranks(S), [4, 1])
    np.testing.assert_array_equal(t2i_ranks(S), [1, 1, 0, 0, 0, 1, 1, 1, 1, 0])

    metrics = evaluate_similarity(S)
    assert (metrics.i2t_r1, metrics.i2t_r5, metrics.i2t_r10) == (0.0, 100.0, 100.0)
    assert (metrics.i2t_medr, metrics.i2t_meanr) == (3.0, 3.5)  # median 2.5 -> 3
    assert (metrics.t2i_r1, metrics.t2i_r5, metrics.t2i_r10) == (40.0, 100.0, 100.0)
    assert metrics.t2i_medr == 2.0  # median of four 0s and six 1s is 1
    assert metrics.t2i_meanr == pytest.approx(1.6)
    assert metrics.mean_recall == pytest.approx(440.0 / 6.0)


def test_recall_cutoffs_use_strict_less_than():
    # Image 0's own caption at exact positions 1, 5 and 10 must miss R@1, R@5 and R@10 respectively.
    n_image = 12
    for position, expected in [(1, (0.0, 100.0, 100.0)), (5, (0.0, 0.0, 100.0)), (10, (0.0, 0.0, 0.0))]:
        S = np.tile(np.linspace(1.0, 0.0, n_image)[None, :], (n_image, 1))  # column j scores 1 - j/11
        row = np.linspace(1.0, 0.0, n_image)
        row[[0, position]] = row[[position, 0]]  # put caption 0 at `position`
        S[0] = row
        i2t = i2t_ranks(S, captions_per_image=1)
        assert i2t[0] == position
        metrics = RetrievalMetrics.from_ranks(i2t[:1], np.zeros(1))
        assert (metrics.i2t_r1, metrics.i2t_r5, metrics.i2t_r10) == expected


def test_ties_that_do_not_depend_on_tie_order():
    # Image 0's five captions tie at the top: whichever comes first, its rank is 0. Image 1's own
    # captions tie with each other below five tied foreign captions: its rank is 5 either way.
    S = np.zeros((2, 10))
    S[0, :5] = 1.0
    S[1, :5] = 2.0
    S[1, 5:] = 1.0
    np.testing.assert_array_equal(i2t_ranks(S), [0, 5])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cpi", [1, 2, 5])
def test_tie_heavy_matrices_match_the_original_loop(dtype, cpi):
    # Few distinct values and rows longer than 16 so numpy's (unstable) default sort decides ties.
    rng = np.random.default_rng(cpi)
    S = (rng.integers(0, 3, size=(23, 23 * cpi)) / 2.0).astype(dtype)
    np.testing.assert_array_equal(i2t_ranks(S, cpi), _loop_i2t_ranks(S, cpi))
    np.testing.assert_array_equal(t2i_ranks(S, cpi), _loop_t2i_ranks(S, cpi))
    assert evaluate_similarity(S, cpi).to_dict() == _loop_metrics(S, cpi)


def test_mostly_zero_matrix_like_mr_output_matches_loop():
    rng = np.random.default_rng(7)
    S = rng.random((30, 150)).astype(np.float32)
    S[S < 0.8] = 0.0  # most entries tie at 0, as outside MR's top K
    assert evaluate_similarity(S).to_dict() == _loop_metrics(S, 5)


@pytest.mark.parametrize("shape", [(1, 5), (9, 45), (40, 200)])
def test_random_matrices_match_the_original_loop(shape):
    S = np.random.default_rng(shape[0]).standard_normal(shape)
    np.testing.assert_array_equal(i2t_ranks(S), _loop_i2t_ranks(S, 5))
    np.testing.assert_array_equal(t2i_ranks(S), _loop_t2i_ranks(S, 5))
    assert evaluate_similarity(S).to_dict() == _loop_metrics(S, 5)


def test_fortran_ordered_and_integer_input():
    rng = np.random.default_rng(3)
    S = np.asfortranarray(rng.integers(0, 4, size=(20, 100)))
    assert evaluate_similarity(S).to_dict() == _loop_metrics(np.ascontiguousarray(S), 5)


def test_evaluate_with_rerank_matches_original_compare():
    rng = np.random.default_rng(11)
    S = rng.random((32, 160))  # 32 images: the original needs at least K = 30 per direction
    config = RerankConfig()
    expected = RetrievalMetrics.from_ranks(
        _loop_i2t_ranks(i2t_rerank_optim(S, config.k, config.wp1, config.wp2), 5),
        _loop_t2i_ranks(t2i_rerank_optim(S, config.k, config.wp1, config.wp2), 5),
    )
    assert evaluate_with_rerank(S, config).to_dict() == expected.to_dict()
    assert evaluate_with_rerank(S, config) != evaluate_similarity(S)


def test_metrics_round_trip_and_table():
    metrics = evaluate_similarity(np.random.default_rng(0).random((6, 30)))
    assert RetrievalMetrics.from_dict(metrics.to_dict()) == metrics
    table = metrics.format_table("RSITMD fp32")
    lines = table.splitlines()
    assert lines[0] == "RSITMD fp32"
    assert lines[3].startswith("image->text") and f"{metrics.i2t_r10:.2f}" in lines[3]
    assert lines[4].startswith("text->image") and f"{metrics.t2i_meanr:.2f}" in lines[4]
    assert lines[-1].split() == ["mR", f"{metrics.mean_recall:.2f}"]
    with pytest.raises(ValueError, match="unknown"):
        RetrievalMetrics.from_dict({**metrics.to_dict(), "rsum": 1.0})


@pytest.mark.parametrize(
    ("S", "cpi", "message"),
    [
        (np.zeros((3, 14)), 5, "15 columns"),
        (np.zeros(10), 5, "2-D"),
        (np.zeros((0, 0)), 5, "non-empty"),
        (np.zeros((2, 10)), 0, "captions_per_image"),
        (np.full((2, 10), np.nan), 5, "NaN"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_error(S, cpi, message):
    with pytest.raises(ValueError, match=message):
        evaluate_similarity(S, cpi)
    with pytest.raises(ValueError, match=message):
        evaluate_with_rerank(S, RerankConfig(), cpi)
