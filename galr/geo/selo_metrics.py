"""SeLo metrics of a semantic-localisation map: Rsu, Ras, Rda and Rmi (Yuan et al., TGRS 2022).

The formulas and constants are those of the authors' ``SemanticLocalizationMetrics/evaluations/SLM.py``
as written down in ``shared/docs/semantic-localization.md`` section 4 (the paper text was not
available): pixels are full-resolution scene pixels, a point is ``(x, y)`` = (column, row).

Maps are usually evaluated on a reduced grid (one cell = ``cell`` scene pixels, as galr-locate makes
them): the absolute constants (the 50-px box filter, the 1000-px local-maximum window) are divided
by ``cell`` and peak positions are mapped back to scene pixels (cell centres), so the metrics keep
their meaning; with ``cell=1`` this is the reference computation.

Blind spots (documented by the method's authors' code, kept here): peaks outside every region's
circle are ignored by Ras and Rda (distractors only cost Rsu); Rsu saturates when the background
is near 0; below about 1000 px a scene has at most one peak.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from galr.errors import InputError

BETA_SU = 0.707
EPSILON = 1e-7
RADIUS_FACTOR = 1.5
BOX_FILTER_PX = 50
BOX_FILTER_PASSES = 5
LOCAL_MAX_PX = 1000
PEAK_MIN = 0.5
BETA_AS = 3.0
ETA_DA = 0.5
RMI_WEIGHTS = (0.4, 0.35, 0.25)

Polygon = Sequence[Sequence[float]]


@dataclass(frozen=True)
class SeLoScores:
    """The four metrics of one map (higher is better except Ras)."""

    rsu: float
    ras: float
    rda: float
    rmi: float
    peaks: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def region_mask(polygons: Sequence[Polygon], shape: tuple[int, int], cell: int = 1) -> np.ndarray:
    """The union of the filled polygons on a grid of ``shape`` cells (vertices truncated to int, as OpenCV's fillPoly)."""
    from PIL import Image, ImageDraw

    height, width = shape
    picture = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(picture)
    for points in polygons:
        vertices = [(int(x) / cell, int(y) / cell) for x, y in points]
        if len(vertices) >= 3:
            draw.polygon(vertices, fill=1, outline=1)
    return np.asarray(picture, dtype=bool)


def region_circle(points: Polygon) -> tuple[tuple[int, int], int]:
    """Centre (truncated mean of the vertices, not the area centroid) and radius (1.5 x mean vertex distance)."""
    vertices = np.asarray(points, dtype=np.float64)
    centre = vertices.mean(axis=0).astype(int)
    radius = int(RADIUS_FACTOR * float(np.mean(np.hypot(*(vertices - centre).T))))
    return (int(centre[0]), int(centre[1])), radius


def find_peaks(probability: np.ndarray, cell: int = 1) -> list[tuple[float, float]]:
    """Attention peaks in scene pixels ``(x, y)``, strongest first (section 4, "Peaks")."""
    from scipy import ndimage

    box = max(1, round(BOX_FILTER_PX / cell))
    window = max(1, round(LOCAL_MAX_PX / cell))
    smoothed = (255 * np.clip(probability, 0, 1)).astype(np.uint8)
    for _ in range(BOX_FILTER_PASSES):
        smoothed = np.rint(ndimage.uniform_filter(smoothed.astype(np.float32), size=box, mode="mirror")).astype(np.uint8)
    candidates = (smoothed == ndimage.maximum_filter(smoothed, size=window, mode="reflect")) & (smoothed > 0)
    labels, count = ndimage.label(candidates, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return []
    centres = ndimage.center_of_mass(candidates, labels, range(1, count + 1))
    points = []
    for row, col in centres:
        row, col = int(row), int(col)
        value = float(probability[row, col])
        if value >= PEAK_MIN:
            points.append((value, (col * cell + (cell - 1) / 2, row * cell + (cell - 1) / 2)))
    points.sort(key=lambda item: -item[0])
    return [point for _, point in points]


def rsu(probability: np.ndarray, mask: np.ndarray) -> float:
    """Attention inside the regions against outside, ``1 - exp(-0.707 rho)``; 0.507 for a uniform map.

    Raises:
        InputError: the regions cover no cell (the ratio is undefined).
    """
    inside_area = float(mask.sum())
    if inside_area == 0:
        raise InputError("the ground-truth regions cover no pixel of the map; Rsu is undefined")
    outside_area = mask.size - inside_area
    inside = float((probability * mask).sum())
    outside = float(probability.sum()) - inside
    rho = (inside / (outside + EPSILON)) * (outside_area / inside_area)
    return 1.0 - math.exp(-BETA_SU * rho)


def _within(peaks: Sequence[tuple[float, float]], centre: tuple[int, int], radius: int) -> np.ndarray:
    if not peaks:
        return np.zeros((0, 2))
    points = np.asarray(peaks, dtype=np.float64)
    return points[np.hypot(*(points - centre).T) <= radius]


def ras(peaks: Sequence[tuple[float, float]], polygons: Sequence[Polygon]) -> float:
    """How far the peaks inside each region's circle sit from its centre, ``(e^{3g} - 1) / (e^3 - 1)``; 1 without peaks."""
    if not peaks:
        return 1.0
    offsets = []
    for points in polygons:
        centre, radius = region_circle(points)
        inside = _within(peaks, centre, radius)
        if radius <= 0:
            offsets.append(0.0 if len(inside) else 1.0)
            continue
        offset = float(np.mean(np.hypot(*(inside - centre).T))) if len(inside) else float(radius)
        offsets.append(offset / radius)
    g = float(np.mean(offsets))
    return (math.exp(BETA_AS * g) - 1) / (math.exp(BETA_AS) - 1)


def rda(peaks: Sequence[tuple[float, float]], polygons: Sequence[Polygon]) -> float:
    """One peak per region scores 1, none 0, several ``0.5 (1 - spread / r) + e^{-0.5 (n + 2)}``."""
    values = []
    for points in polygons:
        centre, radius = region_circle(points)
        inside = _within(peaks, centre, radius)
        if len(inside) == 0:
            values.append(0.0)
        elif len(inside) == 1:
            values.append(1.0)
        else:
            spread = float(np.mean(np.hypot(*(inside - inside.mean(axis=0)).T)))
            values.append(ETA_DA * (1 - spread / max(radius, 1)) + math.exp(-ETA_DA * (len(inside) + 2)))
    return float(np.mean(values)) if values else 0.0


def rmi(su: float, as_: float, da: float) -> float:
    """``0.4 Rsu + 0.35 (1 - Ras) + 0.25 Rda``."""
    w_su, w_as, w_da = RMI_WEIGHTS
    return w_su * su + w_as * (1 - as_) + w_da * da


def selo_scores(probability: np.ndarray, polygons: Sequence[Polygon], cell: int = 1) -> SeLoScores:
    """All four metrics of a map ``[rows, cols]`` in [0, 1] against ground-truth polygons in scene pixels.

    Args:
        probability: the map, one value per ``cell`` x ``cell`` scene pixels.
        polygons: regions, each a list of ``(x, y)`` vertices in scene pixels.
        cell: scene pixels per map cell (1 = full resolution).
    """
    probability = np.asarray(probability, dtype=np.float64)
    if probability.ndim != 2 or not np.isfinite(probability).all():
        raise InputError(f"a SeLo map must be a finite 2-D array, got shape {probability.shape}")
    if not polygons:
        raise InputError("a SeLo sample needs at least one ground-truth region")
    mask = region_mask(polygons, probability.shape, cell)
    peaks = find_peaks(probability, cell)
    su, as_, da = rsu(probability, mask), ras(peaks, polygons), rda(peaks, polygons)
    return SeLoScores(su, as_, da, rmi(su, as_, da), len(peaks))


__all__ = ["SeLoScores", "find_peaks", "ras", "rda", "region_circle", "region_mask", "rmi", "rsu", "selo_scores"]
