"""Object detections for synthetic scenes: exact ground truth, plus optional detector-like noise.

GaLR's local branch (DREA) is built from an object detector's output. Here the "detector" is the
scene's ground truth, degraded on purpose by :class:`DetectorNoise` (missed objects, jittered boxes
and scores, near-duplicate boxes, look-alike class confusions and false alarms of random classes), so
that DREA's de-noising has something to do.

Files use this JSON schema (one file per image; labels are the hyphenated DOTA names of
:data:`~galr.synthetic.scenes.OBJECT_CLASSES`; boxes are pixel ``[x_min, y_min, x_max, y_max]``)::

    {"image": "train_00001.png", "width": 256, "height": 256,
     "detections": [{"label": "plane", "score": 0.93, "box": [12.5, 40.0, 60.25, 88.0]}]}

Detections are sorted by descending score.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np

from galr.atomic import write_text_atomically
from galr.errors import InputError
from galr.serialization import fields_from_dict
from galr.synthetic.scenes import (
    CLASS_STYLES,
    OBJECT_CLASSES,
    SceneSpec,
    object_outline,
    pick,
)

Box = tuple[float, float, float, float]

# Classes a detector plausibly mistakes for one another (symmetric).
LOOK_ALIKES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "plane": ("helicopter",),
        "helicopter": ("plane",),
        "small-vehicle": ("large-vehicle",),
        "large-vehicle": ("small-vehicle", "ship"),
        "ship": ("large-vehicle",),
        "tennis-court": ("basketball-court",),
        "basketball-court": ("tennis-court",),
        "soccer-ball-field": ("ground-track-field",),
        "ground-track-field": ("soccer-ball-field",),
        "storage-tank": ("roundabout",),
        "roundabout": ("storage-tank",),
        "harbor": ("bridge",),
        "bridge": ("harbor",),
        "swimming-pool": ("tennis-court",),
        "baseball-diamond": ("soccer-ball-field",),
    }
)


class DetectionFileError(InputError):
    """A detections JSON file is missing or does not follow the schema."""


@dataclass(frozen=True)
class Detection:
    """One detected object: class label, confidence and pixel box ``(x_min, y_min, x_max, y_max)``."""

    label: str
    score: float
    box: Box

    def to_dict(self) -> dict[str, Any]:
        # Rounded so files are compact and byte-identical across runs.
        return {
            "label": self.label,
            "score": round(float(self.score), 4),
            "box": [round(float(v), 2) for v in self.box],
        }


@dataclass(frozen=True)
class DetectorNoise:
    """How far the simulated detector departs from the ground truth.

    Attributes:
        miss_rate: probability that a real object is not detected.
        true_score: mean confidence of a detected real object.
        score_jitter: standard deviation of confidence noise.
        box_jitter: standard deviation of each box edge's shift, as a fraction of the box side.
        duplicate_rate: probability that a detection gets a second, overlapping box.
        duplicate_min_iou: lower bound of a duplicate's IoU with its source box.
        false_alarms: mean number of spurious detections per image (Poisson).
        false_alarm_score: (low, high) uniform range of a false alarm's confidence.
        confusion_rate: probability that a real object gets a look-alike class (:data:`LOOK_ALIKES`).
    """

    miss_rate: float = 0.1
    true_score: float = 0.88
    score_jitter: float = 0.07
    box_jitter: float = 0.04
    duplicate_rate: float = 0.15
    duplicate_min_iou: float = 0.6
    false_alarms: float = 0.8
    false_alarm_score: tuple[float, float] = (0.3, 0.75)
    confusion_rate: float = 0.05

    def __post_init__(self) -> None:
        for name in ("miss_rate", "duplicate_rate", "confusion_rate", "true_score", "duplicate_min_iou"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"DetectorNoise.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("score_jitter", "box_jitter", "false_alarms"):
            if getattr(self, name) < 0:
                raise InputError(f"DetectorNoise.{name} must be non-negative, got {getattr(self, name)}")
        low, high = self.false_alarm_score
        if not 0.0 <= low <= high <= 1.0:
            raise InputError(f"DetectorNoise.false_alarm_score must be (low, high) in [0, 1], got {(low, high)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DetectorNoise":
        return cls(**fields_from_dict(cls, values))


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x_min, y_min, x_max, y_max)`` boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _clip_box(box: Sequence[float], size: int) -> Box | None:
    x0, y0, x1, y1 = (min(max(float(v), 0.0), float(size)) for v in box)
    if (x1 - x0) * (y1 - y0) < 1.0:
        return None
    return x0, y0, x1, y1


def ground_truth_detections(spec: SceneSpec, size: int = 256) -> list[Detection]:
    """One exact detection (score 1) per object instance, distractors included.

    Args:
        spec: the scene.
        size: image side in pixels.

    Returns:
        Detections in the spec's group order.
    """
    detections: list[Detection] = []
    for group in spec.groups:
        for inst in group.instances:
            outline = object_outline(group.label, inst) * size
            box = _clip_box((*outline.min(axis=0), *outline.max(axis=0)), size)
            if box is not None:
                detections.append(Detection(group.label, 1.0, box))
    return detections


def _jitter_box(box: Box, rng: np.random.Generator, fraction: float, size: int) -> Box | None:
    w, h = box[2] - box[0], box[3] - box[1]
    shifts = rng.normal(0, fraction, size=4) * np.array([w, h, w, h])
    x0, y0, x1, y1 = (v + s for v, s in zip(box, shifts, strict=True))
    return _clip_box((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), size)


def _duplicate(box: Box, rng: np.random.Generator, min_iou: float, size: int) -> Box | None:
    fraction = 0.08
    for _attempt in range(8):
        candidate = _jitter_box(box, rng, fraction, size)
        if candidate is not None and box_iou(candidate, box) >= min_iou and candidate != box:
            return candidate
        fraction /= 2
    return None


def _false_alarm(rng: np.random.Generator, noise: DetectorNoise, size: int) -> Detection | None:
    label = pick(rng, OBJECT_CLASSES)
    style = CLASS_STYLES[label]
    length = rng.uniform(*style.length) * size
    width = length * rng.uniform(*style.aspect)
    w, h = (length, width) if rng.random() < 0.5 else (width, length)
    x0, y0 = rng.uniform(0, max(1.0, size - w)), rng.uniform(0, max(1.0, size - h))
    box = _clip_box((x0, y0, x0 + w, y0 + h), size)
    return None if box is None else Detection(label, float(rng.uniform(*noise.false_alarm_score)), box)


def apply_detector_noise(
    detections: Sequence[Detection], noise: DetectorNoise, rng: np.random.Generator, size: int = 256
) -> list[Detection]:
    """Degrade exact detections the way a real detector would.

    Args:
        detections: ground truth (e.g. from :func:`ground_truth_detections`).
        noise: the noise model; :meth:`DetectorNoise.none` returns the input sorted by score.
        rng: random source.
        size: image side in pixels (boxes are clipped to it).

    Returns:
        Noisy detections sorted by descending score.
    """
    out: list[Detection] = []
    for det in detections:
        if rng.random() < noise.miss_rate:
            continue
        label = det.label
        if label in LOOK_ALIKES and rng.random() < noise.confusion_rate:
            label = pick(rng, LOOK_ALIKES[label])
        box = _jitter_box(det.box, rng, noise.box_jitter, size) if noise.box_jitter > 0 else det.box
        if box is None:
            continue
        # Small objects are detected less confidently.
        small_penalty = 0.1 if (box[2] - box[0]) * (box[3] - box[1]) < 100 else 0.0
        score = float(np.clip(noise.true_score - small_penalty + rng.normal(0, noise.score_jitter), 0.05, 1.0))
        out.append(Detection(label, score, box))
        if rng.random() < noise.duplicate_rate:
            duplicate = _duplicate(box, rng, noise.duplicate_min_iou, size)
            if duplicate is not None:
                out.append(Detection(label, float(max(0.05, score - rng.uniform(0.05, 0.3))), duplicate))
    for _ in range(int(rng.poisson(noise.false_alarms))):
        alarm = _false_alarm(rng, noise, size)
        if alarm is not None:
            out.append(alarm)
    return sorted(out, key=lambda d: -d.score)


def detections_to_json(image: str, width: int, height: int, detections: Sequence[Detection]) -> dict[str, Any]:
    """The schema's JSON object for one image (see the module doc)."""
    return {"image": image, "width": int(width), "height": int(height), "detections": [d.to_dict() for d in detections]}


def write_detections(
    path: str | os.PathLike, image: str, width: int, height: int, detections: Sequence[Detection]
) -> None:
    """Write one image's detections as JSON (schema in the module doc)."""
    write_text_atomically(path, json.dumps(detections_to_json(image, width, height, detections)))


def read_detections(path: str | os.PathLike) -> tuple[str, int, int, list[Detection]]:
    """Read and validate one detections file.

    Args:
        path: a file written by :func:`write_detections`.

    Returns:
        (image name, width, height, detections).

    Raises:
        DetectionFileError: the file is missing, not JSON, or violates the schema (the message names
            the file and the offending entry).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DetectionFileError(f"detections file not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DetectionFileError(f"{path}: not a JSON detections file ({exc})") from None
    if not isinstance(data, dict) or not {"image", "width", "height", "detections"} <= set(data):
        raise DetectionFileError(f"{path}: expected an object with 'image', 'width', 'height' and 'detections'")
    detections: list[Detection] = []
    for k, entry in enumerate(data["detections"]):
        try:
            label, score, box = entry["label"], float(entry["score"]), tuple(float(v) for v in entry["box"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DetectionFileError(
                f"{path}: detection #{k} needs 'label', numeric 'score' and 'box' ({exc})"
            ) from None
        if label not in OBJECT_CLASSES:
            raise DetectionFileError(
                f"{path}: detection #{k} has unknown label {label!r}; expected one of {OBJECT_CLASSES}"
            )
        if len(box) != 4 or box[0] > box[2] or box[1] > box[3] or not all(math.isfinite(v) for v in box):
            raise DetectionFileError(
                f"{path}: detection #{k} box must be [x_min, y_min, x_max, y_max], got {list(box)}"
            )
        detections.append(Detection(label, score, box))  # type: ignore[arg-type]
    return str(data["image"]), int(data["width"]), int(data["height"]), detections
