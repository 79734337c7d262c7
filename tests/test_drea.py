"""The DREA reconstruction: features, de-noising, salience order, adjacency, fallbacks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from galr.preprocess.detections import Detection, DetectionSet
from galr.preprocess.drea import (
    DOTA_V1_CLASSES,
    DREAConfig,
    NoDetectionsWarning,
    UnknownLabelWarning,
    build_local_batch,
    build_local_features,
)

SIZE = (256, 256)


def det(label: str, score: float, x0: float, y0: float, x1: float, y1: float) -> Detection:
    return Detection(label, score, (x0, y0, x1, y1))


def spread_objects(count: int, seed: int = 0) -> list[Detection]:
    """Non-overlapping objects of distinct classes/scores/sizes on a grid."""
    rng = np.random.default_rng(seed)
    objects = []
    for i in range(count):
        x, y = 6 + 42 * (i % 6), 6 + 42 * (i // 6)
        side = float(rng.uniform(4, 30))
        objects.append(det(DOTA_V1_CLASSES[i % 15], float(rng.uniform(0.4, 1.0)), x, y, x + side, y + side))
    return objects


def test_dota_config_matches_the_original_gcn_input():
    config = DREAConfig()
    assert len(DOTA_V1_CLASSES) == 15 and config.feature_dim == 20 and config.num_objects == 20
    assert DREAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown DREAConfig fields"):
        DREAConfig.from_dict({"classes": ["plane"], "radius": 3})


@pytest.mark.parametrize(
    "kwargs, message",
    [({"classes": ("Storage Tank",)}, "normalised"), ({"classes": ("ship", "ship")}, "more than once"),
     ({"normalization": "row"}, "normalization"), ({"unknown_labels": "ignore"}, "unknown_labels"),
     ({"duplicate_iou": 0.0}, "duplicate_iou"), ({"classes": ()}, "empty")],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DREAConfig(**kwargs)


def test_shapes_dtypes_features_and_padding():
    rep, adj = build_local_features([det("plane", 0.9, 64, 0, 128, 32), det("ship", 0.8, 200, 200, 210, 240)], SIZE)
    assert rep.shape == (20, 20) and adj.shape == (20, 20) and rep.dtype == adj.dtype == np.float32
    expected_plane = np.zeros(20, dtype=np.float32)
    expected_plane[0] = 1.0
    expected_plane[15:] = [96 / 256, 16 / 256, 64 / 256, 32 / 256, 0.9]  # cx, cy, w, h, score
    np.testing.assert_allclose(rep[0], expected_plane, rtol=1e-6)
    assert rep[1, 1] == 1.0  # ship one-hot
    assert not rep[2:].any() and not adj[2:].any() and not adj[:, 2:].any()


def test_same_class_overlap_keeps_the_higher_score():
    weak = det("plane", 0.6, 10, 10, 60, 60)
    strong = det("plane", 0.9, 12, 12, 62, 62)  # IoU ~0.85
    other_class = det("ship", 0.7, 12, 12, 62, 62)
    rep, _ = build_local_features([weak, strong, other_class], SIZE)
    kept = rep[np.abs(rep).sum(axis=1) > 0]
    assert len(kept) == 2
    assert {float(s) for s in kept[:, -1]} == {np.float32(0.9), np.float32(0.7)}


def test_feature_cosine_merges_nearby_same_class_objects_unless_disabled():
    # Adjacent cars that do not overlap: only the feature-similarity test can call them redundant.
    cars = [det("small-vehicle", 0.9, 120, 120, 128, 128), det("small-vehicle", 0.88, 130, 120, 138, 128)]
    rep, _ = build_local_features(cars, SIZE)
    assert (np.abs(rep).sum(axis=1) > 0).sum() == 1 and rep[0, -1] == np.float32(0.9)
    rep, _ = build_local_features(cars, SIZE, DREAConfig(duplicate_cosine=None))
    assert (np.abs(rep).sum(axis=1) > 0).sum() == 2


def test_salience_order_and_top_n():
    big_low = det("harbor", 0.5, 0, 0, 200, 200)  # salience 0.5 * 200/256
    small_high = det("plane", 1.0, 220, 220, 240, 240)  # salience 1.0 * 20/256
    rep, _ = build_local_features([small_high, big_low], SIZE)
    assert rep[0, 7] == 1.0 and rep[1, 0] == 1.0

    objects = spread_objects(30)
    rep, _ = build_local_features(objects, SIZE)
    salience = np.array([d.score * np.sqrt(d.width * d.height) / 256 for d in objects])
    expected_scores = np.array([objects[i].score for i in np.argsort(-salience)[:20]], dtype=np.float32)
    np.testing.assert_array_equal(rep[:, -1], expected_scores)


def test_low_scores_and_boxes_outside_the_image_are_dropped():
    rep, _ = build_local_features(
        [det("plane", 0.1, 0, 0, 10, 10), det("ship", 0.9, 300, 300, 320, 320), det("bridge", 0.9, 250, 250, 280, 270)],
        SIZE,
    )
    assert (np.abs(rep).sum(axis=1) > 0).sum() == 1
    np.testing.assert_allclose(rep[0, -3:-1], [6 / 256, 6 / 256], rtol=1e-6)  # bridge clipped to the image


@pytest.mark.parametrize("normalization", ["max_row_sum", "symmetric"])
def test_adjacency_is_symmetric_non_negative_and_bounded(normalization):
    config = DREAConfig(normalization=normalization)
    rep, adj = build_local_features(spread_objects(25, seed=3), SIZE, config)
    assert np.allclose(adj, adj.T) and (adj >= 0).all() and (np.diag(adj) > 0).all()
    assert np.linalg.norm(adj, 2) <= 1.0 + 1e-5
    x = rep.astype(np.float64)
    for _ in range(3):  # the GCN applies A three times, without normalising it itself
        x = adj @ x
    assert np.linalg.norm(x) <= np.linalg.norm(rep) + 1e-5


def test_salient_objects_are_enhanced():
    # Two isolated objects of equal score: the larger one is more salient.
    objects = [det("plane", 0.8, 0, 0, 60, 60), det("ship", 0.8, 230, 230, 240, 240)]
    _, plain = build_local_features(objects, SIZE, DREAConfig(salience_boost=0.0))
    _, enhanced = build_local_features(objects, SIZE, DREAConfig(salience_boost=1.0))
    assert plain[0, 0] == pytest.approx(plain[1, 1])
    assert enhanced[0, 0] > 2 * enhanced[1, 1]


def test_unknown_labels_error_or_skip():
    objects = [det("plane", 0.9, 0, 0, 50, 50), det("vehicle", 0.9, 100, 100, 150, 150)]
    with pytest.raises(ValueError, match=r"\['vehicle'\].*unknown_labels='skip'"):
        build_local_features(DetectionSet(tuple(objects), 256, 256, "scene.json"), None)
    with pytest.warns(UnknownLabelWarning, match="scene.json.*vehicle"):
        rep, adj = build_local_features(
            DetectionSet(tuple(objects), 256, 256, "scene.json"), None, DREAConfig(unknown_labels="skip")
        )
    expected = build_local_features(objects[:1], SIZE)
    np.testing.assert_array_equal(rep, expected[0])
    np.testing.assert_array_equal(adj, expected[1])


def test_labels_are_normalised_before_matching():
    rep, _ = build_local_features([det("Storage Tank", 0.9, 0, 0, 50, 50)], SIZE)
    assert rep[0, 2] == 1.0


@pytest.mark.parametrize("objects", [[], [det("plane", 0.05, 0, 0, 10, 10)]])
def test_empty_fallback_is_zero_and_warns(objects):
    detections = DetectionSet(tuple(objects), 256, 256, source="dets/scene_7.json", image="scene_7.png")
    with pytest.warns(NoDetectionsWarning, match="scene_7.png"):
        rep, adj = build_local_features(detections)
    assert rep.shape == (20, 20) and not rep.any() and not adj.any()


def test_feature_dim_mismatch_is_explained():
    with pytest.raises(ValueError, match="expects 21 features per object.*gives 20"):
        build_local_features([det("plane", 0.9, 0, 0, 5, 5)], SIZE, object_dim=21)
    small = DREAConfig(classes=("plane", "ship"), num_objects=4)
    rep, adj = build_local_features([det("ship", 0.9, 0, 0, 5, 5)], SIZE, small, object_dim=7)
    assert rep.shape == (4, 7) and adj.shape == (4, 4)
    with pytest.raises(ValueError, match="num_objects"):
        small.check_model(num_objects=20)


def test_image_size_sources_and_mismatch():
    detections = DetectionSet((det("plane", 0.9, 0, 0, 32, 32),), 128, 64, "a.json")
    rep, _ = build_local_features(detections)
    np.testing.assert_allclose(rep[0, -3:-1], [0.25, 0.5])
    with pytest.raises(ValueError, match="128x64 image but image_size is 256x256"):
        build_local_features(detections, SIZE)
    with pytest.raises(ValueError, match="image size unknown"):
        build_local_features([det("plane", 0.9, 0, 0, 32, 32)])


def test_deterministic_under_repetition_and_input_order():
    objects = spread_objects(18, seed=5)
    first = build_local_features(objects, SIZE)
    second = build_local_features(list(reversed(objects)), SIZE)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_batch_equals_single_builds():
    sets = [spread_objects(5, seed=1), DetectionSet(tuple(spread_objects(3, seed=2)), 256, 256), []]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDetectionsWarning)
        rep, adj = build_local_batch(sets, [SIZE, None, SIZE])
        singles = [build_local_features(s, size) for s, size in zip(sets, [SIZE, None, SIZE])]
    assert rep.shape == (3, 20, 20) and adj.shape == (3, 20, 20)
    for i, (single_rep, single_adj) in enumerate(singles):
        np.testing.assert_array_equal(rep[i], single_rep)
        np.testing.assert_array_equal(adj[i], single_adj)
    with pytest.raises(ValueError, match="2 detection sets but 1 image sizes"):
        build_local_batch(sets[:2], [SIZE])
