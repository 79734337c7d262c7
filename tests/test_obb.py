"""Tests for galr.preprocess.obb: Ultralytics OBB output decoding, ProbIoU, Fast-NMS, letterbox."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from galr.preprocess.obb import (
    DetectorModelError,
    ObbModelInfo,
    corners,
    decode,
    fast_nms,
    letterbox,
    probiou,
    to_detections,
)

NAMES = ("plane", "ship", "storage tank")


def raw_output(boxes, class_ids, scores, nc=3, noise=20):
    """A ``(4 + nc + 1, N)`` output with planted boxes and low-score noise rows."""
    rows = []
    for (cx, cy, w, h, angle), klass, score in zip(boxes, class_ids, scores):
        probabilities = np.full(nc, 0.01)
        probabilities[klass] = score
        rows.append([cx, cy, w, h, *probabilities, angle])
    rng = np.random.default_rng(0)
    for _ in range(noise):
        rows.append([*rng.uniform(0, 100, 4), *rng.uniform(0, 0.2, nc), rng.uniform(-0.7, 2.3)])
    return np.asarray(rows, np.float32).T


def test_probiou_of_hand_computed_cases():
    box = np.array([[50, 50, 20, 10, 0.0]])
    assert probiou(box, box)[0, 0] == pytest.approx(0.99955, abs=2e-4)  # identical: not exactly 1
    turned = np.array([[50, 50, 10, 20, math.pi / 2]])  # the same rectangle described the other way
    assert probiou(box, turned)[0, 0] == pytest.approx(probiou(box, box)[0, 0], abs=1e-6)
    far = np.array([[500, 500, 20, 10, 0.0]])
    assert probiou(box, far)[0, 0] < 1e-3
    nested = np.array([[50, 50, 10, 5, 0.0]])
    assert 0.3 < probiou(box, nested)[0, 0] < 0.9
    near_zero = np.array([[50, 50, 20, 10, 1e-4]])
    assert probiou(box, near_zero)[0, 0] == pytest.approx(probiou(box, box)[0, 0], abs=1e-5)


def test_fast_nms_lets_a_suppressed_box_suppress_others():
    boxes = np.array([[0, 0, 10, 10, 0], [3, 0, 10, 10, 0], [6, 0, 10, 10, 0]], float)
    scores = np.array([0.9, 0.8, 0.7])
    iou = float(probiou(boxes[:1], boxes[1:2])[0, 0]) - 1e-3  # 0-1 and 1-2 overlap this much, 0-2 less
    assert probiou(boxes[:1], boxes[2:3])[0, 0] < iou
    # Greedy NMS would keep box 2 (only box 1 overlaps it, and box 1 is gone); Fast-NMS drops it.
    assert fast_nms(boxes, scores, iou).tolist() == [0]
    assert fast_nms(np.zeros((0, 5)), np.zeros(0), 0.5).tolist() == []


def test_decode_keeps_planted_boxes_drops_duplicates_and_keeps_classes_apart():
    planted = [(40, 40, 30, 12, 0.3), (41, 40, 30, 12, 0.3), (41, 40, 30, 12, 0.3), (80, 20, 10, 10, 1.2)]
    output = raw_output(planted, [0, 0, 1, 2], [0.9, 0.8, 0.85, 0.6])
    boxes, scores, classes = decode(output, 3)
    assert classes.tolist() == [0, 1, 2]  # the duplicate plane is suppressed; the ship on it is another class
    np.testing.assert_allclose(scores, [0.9, 0.85, 0.6], atol=1e-6)
    np.testing.assert_allclose(boxes[0], planted[0], atol=1e-5)
    agnostic = decode(output, 3, agnostic=True)[2]
    assert agnostic.tolist() == [0, 2]
    assert decode(output, 3, conf=0.9)[0].shape == (0, 5)  # strict '>'


@pytest.mark.parametrize("output, message", [
    (np.zeros((7, 5), np.float32), "shape"),
    (np.full((8, 5), np.nan, np.float32), "NaN"),
])
def test_bad_outputs_are_refused(output, message):
    with pytest.raises(DetectorModelError, match=message):
        decode(output, 3)


def test_letterbox_centres_pads_and_is_undone_exactly():
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    pixels, placement = letterbox(image, (64, 64))
    assert pixels.shape == (3, 64, 64) and placement.gain == pytest.approx(0.32) and placement.top == 16
    assert pixels[:, 0, 0].tolist() == pytest.approx([114 / 255] * 3)  # pad
    assert pixels[:, 32, 32].tolist() == pytest.approx([1.0, 0.0, 0.0])
    detected = np.array([[32, 32, 16, 8, 0.0]])  # the image centre in input pixels
    found = to_detections(detected, np.array([0.9]), np.array([1]), placement, NAMES, (200, 100), "test")
    detection = found.detections[0]
    assert detection.label == "ship" and found.width == 200
    assert detection.box == pytest.approx((75, 37.5, 125, 62.5))  # 50x25 box around (100, 50)


def test_corners_of_a_turned_box():
    points = corners(np.array([0, 0, 4, 2, math.pi / 2]))
    xs, ys = sorted({round(x, 6) for x, _ in points}), sorted({round(y, 6) for _, y in points})
    assert xs == [-1, 1] and ys == [-2, 2]


def test_model_metadata_is_read_and_checked():
    info = ObbModelInfo.from_metadata({"names": "{0: 'plane', 1: 'ship'}", "imgsz": "[1024, 1024]",
                                       "stride": "32", "task": "obb"})
    assert info.names == ("plane", "ship") and info.imgsz == (1024, 1024)
    with pytest.raises(DetectorModelError, match="'detect' model"):
        ObbModelInfo.from_metadata({"names": "{0: 'a'}", "task": "detect"})
    with pytest.raises(DetectorModelError, match="no Ultralytics metadata"):
        ObbModelInfo.from_metadata({})
    with pytest.raises(DetectorModelError, match="unreadable"):
        ObbModelInfo.from_metadata({"names": "{0: plane", "task": "obb"})
