"""Object detections for the DREA local branch, read from two documented file formats.

**DOTA-style text** (``.txt``), one object per line::

    imagesource:GoogleEarth          <- optional header lines, skipped
    gsd:0.146343590398
    x1 y1 x2 y2 x3 y3 x4 y4 label difficult [score]

The four corners are pixel coordinates of an oriented box; the axis-aligned ``box`` is their
bounds. ``difficult`` may be omitted when no score follows; ``score`` defaults to 1.0
(ground-truth annotations carry none). Blank lines and lines starting with ``#`` are skipped.

**JSON** (``.json``), the schema shared with the rest of the project::

    {"image": "scene_00001.png", "width": 256, "height": 256,
     "detections": [{"label": "plane", "score": 0.93, "box": [x_min, y_min, x_max, y_max]},
                    {"label": "ship", "score": 0.8, "polygon": [[x, y], [x, y], [x, y], [x, y]]}]}

An entry gives ``box``, ``polygon`` or both; ``score`` defaults to 1.0; other keys are ignored.
``image``, ``width`` and ``height`` are optional, and a bare list of entries is also accepted.

**CSV** (``.csv``), one object per row under a header naming the columns: ``label``, optional
``score``, and either ``x_min,y_min,x_max,y_max`` (a box) or ``x1,y1,x2,y2,x3,y3,x4,y4`` (an
oriented box); other columns are ignored::

    label,score,x1,y1,x2,y2,x3,y3,x4,y4
    plane,0.91,10,12,40,12,40,30,10,30

Labels are kept as written; :func:`normalize_label` maps spellings to one form.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from galr.atomic import write_text_atomically
from galr.errors import InputError

Box = tuple[float, float, float, float]
Point = tuple[float, float]

_DOTA_HEADERS = ("imagesource:", "gsd:")
_LABEL_SEPARATORS = re.compile(r"[\s_\-]+")


class DetectionFormatError(InputError):
    """A detection file is malformed; the message names the file and the line or entry."""


def normalize_label(label: str) -> str:
    """Canonical class name: lower case, spaces/underscores/hyphen runs -> one ``-``.

    ``"storage tank"``, ``"Storage_Tank"`` and ``" storage-tank "`` all become ``"storage-tank"``.
    """
    return _LABEL_SEPARATORS.sub("-", label.strip().lower()).strip("-")


def _finite(value: Any, what: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise InputError(f"{what} must be a finite number, got {value!r}")
    return number


@dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
        label: class name as written by the detector (see :func:`normalize_label`).
        score: confidence in [0, 1]; 1.0 for ground truth.
        box: axis-aligned ``(x_min, y_min, x_max, y_max)`` in pixels.
        polygon: optional four ``(x, y)`` corners of an oriented box, in pixels.
    """

    label: str
    score: float
    box: Box
    polygon: tuple[Point, Point, Point, Point] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label.strip():
            raise InputError(f"Detection.label must be a non-empty string, got {self.label!r}")
        score = _finite(self.score, "Detection.score")
        if not 0.0 <= score <= 1.0:
            raise InputError(f"Detection.score must be in [0, 1], got {score}; rescale detector logits first")
        if len(self.box) != 4:
            raise InputError(f"Detection.box needs 4 numbers (x_min, y_min, x_max, y_max), got {self.box!r}")
        box = tuple(_finite(v, "Detection.box") for v in self.box)
        if box[2] < box[0] or box[3] < box[1]:
            raise InputError(
                f"Detection.box {box} has x_max < x_min or y_max < y_min; use (x_min, y_min, x_max, y_max)"
            )
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "box", box)
        if self.polygon is not None:
            object.__setattr__(self, "polygon", _as_polygon(self.polygon))

    @classmethod
    def from_polygon(cls, label: str, score: float, polygon: Sequence[Sequence[float]]) -> "Detection":
        """A detection whose ``box`` is the bounds of an oriented 4-point polygon."""
        points = _as_polygon(polygon)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        return cls(label=label, score=score, box=(min(xs), min(ys), max(xs), max(ys)), polygon=points)

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]


def _as_polygon(polygon: Sequence[Sequence[float]]) -> tuple[Point, Point, Point, Point]:
    points = tuple(tuple(_finite(v, "Detection.polygon") for v in point) for point in polygon)
    if len(points) != 4 or any(len(p) != 2 for p in points):
        raise InputError(f"Detection.polygon needs 4 (x, y) points, got {polygon!r}")
    return points  # type: ignore[return-value]


@dataclass(frozen=True)
class DetectionSet:
    """The detections of one image.

    Attributes:
        detections: the objects, in file order.
        width: image width in pixels the boxes refer to, when known.
        height: image height in pixels, when known.
        source: where the detections came from (file path or a caller-chosen name).
        image: the image file name the detections belong to, when known (JSON ``"image"``).
    """

    detections: tuple[Detection, ...] = ()
    width: int | None = None
    height: int | None = None
    source: str = "<detections>"
    image: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "detections", tuple(self.detections))
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise InputError(
                    f"DetectionSet.{name} must be a positive integer or None, got {value!r} ({self.source})"
                )

    @property
    def name(self) -> str:
        """The image name when known, else the source; used in messages."""
        return self.image or self.source

    def __len__(self) -> int:
        return len(self.detections)


# ---------------------------------------------------------------------------------------------
# Reading and writing


def _parse_dota_line(tokens: list[str]) -> Detection:
    if len(tokens) not in (9, 10, 11):
        raise InputError(f"expected 'x1 y1 x2 y2 x3 y3 x4 y4 label [difficult [score]]', got {len(tokens)} fields")
    coords = [float(t) for t in tokens[:8]]
    score = float(tokens[10]) if len(tokens) == 11 else 1.0
    polygon = [(coords[i], coords[i + 1]) for i in range(0, 8, 2)]
    return Detection.from_polygon(tokens[8], score, polygon)


def _read_dota(path: Path) -> DetectionSet:
    detections = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.lower().startswith(_DOTA_HEADERS):
            continue
        try:
            detections.append(_parse_dota_line(stripped.split()))
        except ValueError as exc:
            raise DetectionFormatError(f"{path}:{line_number}: {exc}") from exc
    return DetectionSet(tuple(detections), source=str(path))


def _parse_json_entry(entry: Any) -> Detection:
    if not isinstance(entry, dict):
        raise InputError(f"an entry must be an object with label/score/box, got {type(entry).__name__}")
    if "label" not in entry:
        raise InputError("missing 'label'")
    score = entry.get("score", 1.0)
    if "box" in entry:
        polygon = entry.get("polygon")
        return Detection(entry["label"], score, tuple(entry["box"]), tuple(polygon) if polygon is not None else None)
    if "polygon" in entry:
        return Detection.from_polygon(entry["label"], score, entry["polygon"])
    raise InputError("needs 'box' [x_min, y_min, x_max, y_max] or 'polygon' [[x, y] x 4]")


def _read_json(path: Path) -> DetectionSet:
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DetectionFormatError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    header: dict[str, Any] = {}
    if isinstance(document, dict):
        if "detections" not in document or not isinstance(document["detections"], list):
            raise DetectionFormatError(f"{path}: expected a 'detections' list (or a bare list of entries)")
        header, entries = document, document["detections"]
    elif isinstance(document, list):
        entries = document
    else:
        raise DetectionFormatError(
            f"{path}: expected an object with 'detections' or a list, got {type(document).__name__}"
        )
    detections = []
    for index, entry in enumerate(entries):
        try:
            detections.append(_parse_json_entry(entry))
        except (ValueError, TypeError) as exc:
            raise DetectionFormatError(f"{path}: detections[{index}]: {exc}") from exc
    image = header.get("image")
    if image is not None and not isinstance(image, str):
        raise DetectionFormatError(f"{path}: 'image' must be a file name string, got {image!r}")
    try:
        return DetectionSet(tuple(detections), header.get("width"), header.get("height"), str(path), image)
    except (ValueError, TypeError) as exc:
        raise DetectionFormatError(f"{path}: {exc}") from exc


_CSV_BOX = ("x_min", "y_min", "x_max", "y_max")
_CSV_CORNERS = ("x1", "y1", "x2", "y2", "x3", "y3", "x4", "y4")


def _read_csv(path: Path) -> DetectionSet:
    import csv

    with path.open("r", encoding="utf-8-sig", newline="") as handle:
        rows = csv.DictReader(handle)
        columns = {name.strip().lower() for name in rows.fieldnames or ()}
        corners = set(_CSV_CORNERS) <= columns
        if "label" not in columns or not (corners or set(_CSV_BOX) <= columns):
            raise DetectionFormatError(f"{path}: the header must name 'label' and either {','.join(_CSV_BOX)} or "
                                       f"{','.join(_CSV_CORNERS)} (got {sorted(columns)})")
        detections = []
        for line_number, row in enumerate(rows, start=2):
            row = {key.strip().lower(): (value or "").strip() for key, value in row.items() if key}
            try:
                score = float(row["score"]) if row.get("score") else 1.0
                if corners:
                    values = [float(row[name]) for name in _CSV_CORNERS]
                    detections.append(Detection.from_polygon(row["label"], score,
                                                             [(values[i], values[i + 1]) for i in range(0, 8, 2)]))
                else:
                    detections.append(Detection(row["label"], score, tuple(float(row[name]) for name in _CSV_BOX)))
            except (ValueError, TypeError) as exc:
                raise DetectionFormatError(f"{path}:{line_number}: {exc}") from exc
    return DetectionSet(tuple(detections), source=str(path))


def read_detections(path: str | os.PathLike) -> DetectionSet:
    """Read a DOTA-style ``.txt``, a ``.json`` or a ``.csv`` detection file (formats in the module docstring).

    Args:
        path: the detection file; the format is chosen by its suffix.

    Returns:
        DetectionSet: the detections, with ``source`` set to ``path``.

    Raises:
        FileNotFoundError: no such file.
        DetectionFormatError: unknown suffix or malformed content (names the file and line/entry).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such detection file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_dota(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    raise DetectionFormatError(f"{path}: unknown detection format {suffix!r}; use a DOTA-style .txt, a .json or a "
                               ".csv file")


def write_detections_json(path: str | os.PathLike, detections: DetectionSet) -> Path:
    """Write detections in the project's JSON schema (readable by :func:`read_detections`).

    Args:
        path: destination ``.json`` file; parent folders must exist.
        detections: what to write. ``image``/``width``/``height`` are written when known.

    Returns:
        Path: the written path.
    """
    path = Path(path)
    document: dict[str, Any] = {}
    if detections.image is not None:
        document["image"] = detections.image
    if detections.width is not None:
        document["width"] = int(detections.width)
    if detections.height is not None:
        document["height"] = int(detections.height)
    entries = []
    for detection in detections.detections:
        entry: dict[str, Any] = {"label": detection.label, "score": detection.score, "box": list(detection.box)}
        if detection.polygon is not None:
            entry["polygon"] = [list(point) for point in detection.polygon]
        entries.append(entry)
    document["detections"] = entries
    write_text_atomically(path, json.dumps(document, indent=1) + "\n")
    return path


def find_detection_file(directory: str | os.PathLike, image_path: str | os.PathLike) -> Path | None:
    """The detection file for an image: same stem, ``.json`` preferred over ``.txt``, then ``.csv``.

    Args:
        directory: folder holding detection files.
        image_path: the image file (only its stem is used: ``a/boat_0.tif`` -> ``boat_0``).

    Returns:
        Path | None: ``directory/<stem>.json``, ``.txt`` or ``.csv``, or None when none exists.

    Raises:
        NotADirectoryError: ``directory`` is not a folder (a typo would otherwise look like "no detections").
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: detection directory does not exist")
    stem = Path(image_path).stem
    for suffix in (".json", ".txt", ".csv"):
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


__all__ = [
    "Detection",
    "DetectionFormatError",
    "DetectionSet",
    "find_detection_file",
    "normalize_label",
    "read_detections",
    "write_detections_json",
]
