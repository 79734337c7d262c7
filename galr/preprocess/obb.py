"""Oriented-box detector output, as Ultralytics YOLO-OBB ONNX exports produce it, in numpy.

The rules follow Ultralytics' own code (``docs/research/ultralytics_obb.md`` cites the file and
function of each): letterbox to the model's input (aspect kept, centred, pad 114, small images
scaled up), the raw ``(1, 4 + nc + 1, N)`` output (centre x/y, width, height in input pixels, ``nc``
class scores after sigmoid, the angle in radians), a strict ``score > conf`` filter on the best
class, rotated **Fast-NMS** with probabilistic IoU (a box that was itself suppressed still
suppresses lower-scored ones, as Ultralytics does; class offsets keep classes apart), and the
letterbox undone with the pad the letterbox used. The model's facts come from the metadata
Ultralytics writes into the ONNX (``names``, ``imgsz``, ``stride``, ``task``).

Where this differs from Ultralytics: the resize is Pillow's bilinear on RGB, not OpenCV's
fixed-point ``INTER_LINEAR`` on BGR (pixel values may differ by about one grey level).
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from PIL import Image

from galr.errors import InputError
from galr.preprocess.detections import Detection, DetectionSet

PAD_VALUE = 114
#: Class offset added to box centres so that NMS never compares boxes of different classes.
CLASS_OFFSET = 7680.0
_EPS = 1e-7


class DetectorModelError(InputError):
    """A detector ONNX that galr cannot use (not an OBB export, no metadata, wrong output)."""


@dataclass(frozen=True)
class ObbModelInfo:
    """What the Ultralytics metadata of an OBB export says.

    Attributes:
        names: class names by class index.
        imgsz: the model input ``(height, width)``.
        stride: the largest stride (informational: static exports always pad to ``imgsz``).
    """

    names: tuple[str, ...]
    imgsz: tuple[int, int]
    stride: int = 32

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: str = "detector") -> "ObbModelInfo":
        """Parse the ONNX metadata (every value is the ``str()`` of a Python literal).

        Raises:
            DetectorModelError: no metadata, a task other than ``obb``, or unreadable names/imgsz.
        """
        if not metadata or "names" not in metadata:
            raise DetectorModelError(f"{source} has no Ultralytics metadata (names, imgsz, task); export it with "
                                     "`yolo export model=...-obb.pt format=onnx`")
        task = metadata.get("task")
        if task != "obb":
            raise DetectorModelError(f"{source} is a {task!r} model; galr needs an oriented-box (task 'obb') "
                                     "detector such as yolo11n-obb")
        try:
            names = ast.literal_eval(metadata["names"])
            imgsz = ast.literal_eval(metadata.get("imgsz", "[1024, 1024]"))
            stride = int(metadata.get("stride", "32"))
        except (ValueError, SyntaxError) as exc:
            raise DetectorModelError(f"{source}: unreadable metadata ({exc})") from None
        if not isinstance(names, dict) or sorted(names) != list(range(len(names))):
            raise DetectorModelError(f"{source}: metadata 'names' should map 0..n-1 to class names")
        if isinstance(imgsz, int):
            imgsz = [imgsz, imgsz]
        return cls(tuple(str(names[i]) for i in range(len(names))), (int(imgsz[0]), int(imgsz[1])), stride)


@dataclass(frozen=True)
class Letterbox:
    """How an image was fitted into the model input: scale ``gain``, then ``left``/``top`` padding."""

    gain: float
    left: int
    top: int


def letterbox(image: Image.Image, size: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    """The image as the detector's float32 ``[3, H, W]`` input in [0, 1], and how it was placed."""
    height, width = size
    gain = min(height / image.height, width / image.width)
    new_w, new_h = round(image.width * gain), round(image.height * gain)
    pad_w, pad_h = (width - new_w) / 2, (height - new_h) / 2
    left, top = round(pad_w - 0.1), round(pad_h - 0.1)
    canvas = Image.new("RGB", (width, height), (PAD_VALUE,) * 3)
    resized = image.convert("RGB")
    if resized.size != (new_w, new_h):
        resized = resized.resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas.paste(resized, (left, top))
    pixels = np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return np.ascontiguousarray(pixels), Letterbox(gain, left, top)


def _covariance(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b = boxes[:, 2] ** 2 / 12, boxes[:, 3] ** 2 / 12
    cos, sin = np.cos(boxes[:, 4]), np.sin(boxes[:, 4])
    return a * cos**2 + b * sin**2, a * sin**2 + b * cos**2, (a - b) * cos * sin


def probiou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Probabilistic IoU of every box of ``first`` ``[n, 5]`` with every box of ``second`` ``[m, 5]``
    (``cx, cy, w, h, angle``): ``[n, m]`` in [0, 1) (identical boxes give about 0.9995)."""
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    a1, b1, c1 = (v[:, None] for v in _covariance(first))
    a2, b2, c2 = (v[None, :] for v in _covariance(second))
    x1, y1 = first[:, 0:1], first[:, 1:2]
    x2, y2 = second[None, :, 0], second[None, :, 1]
    denominator = (a1 + a2) * (b1 + b2) - (c1 + c2) ** 2
    t1 = 0.25 * ((a1 + a2) * (y1 - y2) ** 2 + (b1 + b2) * (x1 - x2) ** 2) / (denominator + _EPS)
    t2 = 0.5 * (c1 + c2) * (x2 - x1) * (y1 - y2) / (denominator + _EPS)
    determinants = np.sqrt(np.clip(a1 * b1 - c1**2, 0, None) * np.clip(a2 * b2 - c2**2, 0, None))
    t3 = 0.5 * np.log(denominator / (4 * determinants + _EPS) + _EPS)
    distance = np.clip(t1 + t2 + t3, _EPS, 100.0)
    return 1 - np.sqrt(1 - np.exp(-distance) + _EPS)


def fast_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by Fast-NMS with :func:`probiou`, best score first.

    A box is dropped when any higher-scored box (kept or not) overlaps it by ``iou`` or more.
    """
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(-np.asarray(scores), kind="stable")
    overlaps = np.triu(probiou(boxes[order], boxes[order]), k=1)
    return order[overlaps.max(axis=0) < iou]


def decode(output: np.ndarray, num_classes: int, conf: float = 0.25, iou: float = 0.7, max_det: int = 300,
           agnostic: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes ``[k, 5]`` (input pixels), scores ``[k]`` and classes ``[k]`` of one image's raw output.

    Args:
        output: ``[4 + num_classes + 1, N]`` (one image of the ``(1, C, N)`` output).

    Raises:
        DetectorModelError: a wrong number of channels, or NaN/inf values.
    """
    output = np.asarray(output, np.float32)
    if output.ndim != 2 or output.shape[0] != 4 + num_classes + 1:
        raise DetectorModelError(f"detector output has shape {output.shape}; an OBB model with {num_classes} "
                                 f"classes gives (1, {4 + num_classes + 1}, N)")
    if not np.isfinite(output).all():
        raise DetectorModelError("detector output holds NaN or infinite values; check the model file")
    rows = output.T
    class_scores = rows[:, 4:4 + num_classes]
    classes = class_scores.argmax(axis=1)
    scores = class_scores[np.arange(len(rows)), classes]
    keep = scores > conf
    boxes = np.concatenate([rows[keep, :4], rows[keep, -1:]], axis=1)
    scores, classes = scores[keep], classes[keep]
    shifted = boxes.copy()
    if not agnostic:
        shifted[:, :2] += classes[:, None] * CLASS_OFFSET
    kept = fast_nms(shifted, scores, iou)[:max_det]
    return boxes[kept], scores[kept], classes[kept]


def corners(box: np.ndarray) -> list[tuple[float, float]]:
    """The four corners of ``(cx, cy, w, h, angle)``."""
    cx, cy, w, h, angle = (float(v) for v in box)
    cos, sin = math.cos(angle), math.sin(angle)
    dx_w, dy_w = w / 2 * cos, w / 2 * sin
    dx_h, dy_h = -h / 2 * sin, h / 2 * cos
    return [(cx + dx_w + dx_h, cy + dy_w + dy_h), (cx + dx_w - dx_h, cy + dy_w - dy_h),
            (cx - dx_w - dx_h, cy - dy_w - dy_h), (cx - dx_w + dx_h, cy - dy_w + dy_h)]


def to_detections(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, placement: Letterbox,
                  names: tuple[str, ...], image_size: tuple[int, int], source: str) -> DetectionSet:
    """Detections in the original image's pixels (the letterbox undone; the angle is unchanged)."""
    detections = []
    for box, score, klass in zip(boxes, scores, classes):
        restored = np.array([(box[0] - placement.left) / placement.gain, (box[1] - placement.top) / placement.gain,
                             box[2] / placement.gain, box[3] / placement.gain, box[4]])
        detections.append(Detection.from_polygon(names[int(klass)], float(min(max(score, 0.0), 1.0)),
                                                 corners(restored)))
    return DetectionSet(tuple(detections), width=image_size[0], height=image_size[1], source=source)


__all__ = ["CLASS_OFFSET", "DetectorModelError", "Letterbox", "ObbModelInfo", "corners", "decode", "fast_nms",
           "letterbox", "probiou", "to_detections"]
