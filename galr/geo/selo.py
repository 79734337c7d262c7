"""Semantic localisation (SeLo v1, Yuan et al.): where in a large scene a caption matches, as a heat map.

The windows, weights and filtering are those of the authors' ``generate_selo.py`` (see
``shared/docs/semantic-localization.md`` sections 1 and 7), computed the fast way the notes
recommend:

* **windows** (:func:`selo_windows`): per scale ``s`` two grids, offsets 0 and ``s/2``, stride
  ``s``; a window reaching the edge is moved back to end at it; identical windows count once; a
  scale larger than the scene is clamped to the scene (the reference does not guard this).
* **scores**: cosine of each window's embedding with the query. Window embeddings do not depend on
  the query: they are computed once per scene (:class:`WindowEmbeddings`, cached) and each query
  is one matrix-vector product.
* **aggregation** (:func:`heat_map`): every cell of a reduced grid (``cell`` scene pixels a side)
  gets the equal-weight mean score of the windows covering it, through a 2-D difference array
  (no per-pixel loop, no full-resolution array); window edges are rounded to cells, an error
  below one cell.
* **normalisation and smoothing**: scene-wide min-max (a constant map becomes all zeros instead
  of NaN), the truncating 8-bit cast, then a median filter of ``251 / cell`` cells (odd), as the
  reference's 251 x 251 median at full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from galr.errors import InputError
from galr.geo.scene import PixelWindow

DEFAULT_SCALES: tuple[int, ...] = (256, 512, 768)
MEDIAN_PX = 251


@dataclass(frozen=True)
class LocateSettings:
    """How a heat map is made.

    Attributes:
        scales: window sides in scene pixels (the reference's default 256, 512, 768).
        cell: scene pixels per heat-map cell (16: a 10k scene gives a 625 x 625 map).
        median_px: side of the median filter in scene pixels (0 = none).
        region_threshold: cells at or above this share of the map's range form the reported regions.
        max_regions: at most this many regions, strongest first.
    """

    scales: tuple[int, ...] = DEFAULT_SCALES
    cell: int = 16
    median_px: int = MEDIAN_PX
    region_threshold: float = 0.8
    max_regions: int = 5

    def __post_init__(self) -> None:
        scales = tuple(sorted({int(s) for s in self.scales}))
        if not scales or min(scales) < 16:
            raise InputError(f"scales must be window sides of at least 16 pixels, got {list(self.scales)}")
        object.__setattr__(self, "scales", scales)
        if not 1 <= self.cell <= min(scales):
            raise InputError(f"cell must be between 1 and the smallest scale ({min(scales)}), got {self.cell}")
        if self.median_px < 0:
            raise InputError(f"median_px must be 0 or more, got {self.median_px}")
        if not 0.0 < self.region_threshold <= 1.0:
            raise InputError(f"region_threshold must be in (0, 1], got {self.region_threshold}")
        if self.max_regions < 1:
            raise InputError(f"max_regions must be at least 1, got {self.max_regions}")


def _starts(length: int, size: int, offset: int) -> list[int]:
    if size >= length:
        return [0]
    starts = []
    start = offset
    while start < length:
        starts.append(length - size if start + size >= length else start)
        start += size
    return starts


def selo_windows(width: int, height: int, scales: tuple[int, ...] = DEFAULT_SCALES) -> list[PixelWindow]:
    """The unique SeLo v1 windows of a scene (389 for 3000 x 3000 with the default scales)."""
    seen: dict[tuple[int, int, int, int], None] = {}
    for size in scales:
        for offset in (0, size // 2):
            for row in _starts(height, size, offset):
                for col in _starts(width, size, offset):
                    seen[(col, row, min(size, width), min(size, height))] = None
    return [PixelWindow(*key) for key in seen]


@dataclass
class WindowEmbeddings:
    """The embeddings of a scene's SeLo windows: computed once, reused by every query.

    Attributes:
        scene_size: ``(width, height)`` of the scene in pixels.
        windows: ``[n, 4]`` int64 col, row, width, height.
        embeddings: ``[n, D]`` float32 unit-norm.
        key: what they were computed from (scene file hash or stamp, scales, model hash).
    """

    scene_size: tuple[int, int]
    windows: np.ndarray
    embeddings: np.ndarray
    key: dict = field(default_factory=dict)

    def scores(self, query_embeddings: np.ndarray) -> np.ndarray:
        """Cosine of every window with every query, ``[q, n]``."""
        return np.asarray(query_embeddings, np.float32) @ self.embeddings.T

    def save(self, path) -> None:
        """Write as ``.npz`` (atomically), with the key as JSON."""
        import io
        import json

        from galr.atomic import write_bytes_atomically

        buffer = io.BytesIO()
        np.savez(buffer, windows=self.windows, embeddings=self.embeddings, scene_size=np.array(self.scene_size),
                 key=np.array(json.dumps(self.key, sort_keys=True)))
        write_bytes_atomically(path, buffer.getvalue())

    @classmethod
    def load(cls, path, expected_key: dict) -> "WindowEmbeddings | None":
        """The cached embeddings at ``path`` if they were made with ``expected_key``; ``None`` otherwise."""
        import json
        import zipfile

        try:
            with np.load(path, allow_pickle=False) as data:
                key = json.loads(str(data["key"]))
                if key != json.loads(json.dumps(expected_key, sort_keys=True)):
                    return None
                return cls(tuple(int(v) for v in data["scene_size"]), data["windows"].astype(np.int64),
                           data["embeddings"].astype(np.float32), key)
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            return None  # missing or damaged: recompute


def heat_map(scores: np.ndarray, windows: np.ndarray, scene_size: tuple[int, int], settings: LocateSettings
             ) -> np.ndarray:
    """The smoothed, normalised map ``[rows, cols]`` in [0, 1] of one query's window scores.

    Args:
        scores: ``[n]`` one score per window.
        windows: ``[n, 4]`` col, row, width, height in scene pixels.
        scene_size: ``(width, height)``.
        settings: cell size and median filter.
    """
    from scipy import ndimage

    width, height = scene_size
    cell = settings.cell
    cols, rows = -(-width // cell), -(-height // cell)
    c0 = np.clip(np.rint(windows[:, 0] / cell), 0, cols).astype(np.int64)
    r0 = np.clip(np.rint(windows[:, 1] / cell), 0, rows).astype(np.int64)
    c1 = np.clip(np.rint((windows[:, 0] + windows[:, 2]) / cell), 0, cols).astype(np.int64)
    r1 = np.clip(np.rint((windows[:, 1] + windows[:, 3]) / cell), 0, rows).astype(np.int64)
    c1, r1 = np.maximum(c1, c0 + 1), np.maximum(r1, r0 + 1)
    total = np.zeros((rows + 1, cols + 1), np.float64)
    count = np.zeros((rows + 1, cols + 1), np.float64)
    values = np.asarray(scores, np.float64)
    for grid, weight in ((total, values), (count, np.ones_like(values))):
        np.add.at(grid, (r0, c0), weight)
        np.add.at(grid, (r0, c1), -weight)
        np.add.at(grid, (r1, c0), -weight)
        np.add.at(grid, (r1, c1), weight)
    total = total.cumsum(0).cumsum(1)[:rows, :cols]
    count = np.rint(count.cumsum(0).cumsum(1)[:rows, :cols])
    heat = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    low, high = float(heat.min()), float(heat.max())
    if high - low <= 1e-12:
        return np.zeros((rows, cols), np.float32)
    quantised = (255 * (heat - low) / (high - low)).astype(np.uint8)  # the reference's truncating cast
    side = settings.median_px // cell
    if side >= 2:
        quantised = ndimage.median_filter(quantised, size=side | 1, mode="nearest")
    return (quantised.astype(np.float32) / 255.0)


@dataclass(frozen=True)
class Region:
    """A strong part of a heat map: its pixel box in the scene and its strength."""

    window: PixelWindow
    peak: float
    mean: float


def strongest_regions(heat: np.ndarray, settings: LocateSettings, scene_size: tuple[int, int]) -> list[Region]:
    """Connected areas of the map at or above ``region_threshold``, strongest first, as scene pixel boxes."""
    from scipy import ndimage

    if not heat.size or float(heat.max()) <= 0:
        return []
    labels, count = ndimage.label(heat >= settings.region_threshold * float(heat.max()))
    regions = []
    for number, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        inside = heat[box][labels[box] == number]
        rows, cols = box
        cell = settings.cell
        col0, row0 = cols.start * cell, rows.start * cell
        col1, row1 = min(cols.stop * cell, scene_size[0]), min(rows.stop * cell, scene_size[1])
        regions.append(Region(PixelWindow(col0, row0, col1 - col0, row1 - row0), float(inside.max()),
                              float(inside.mean())))
    regions.sort(key=lambda region: (-region.peak, -region.mean))
    return regions[: settings.max_regions]


def jet(values: np.ndarray) -> np.ndarray:
    """The JET colour map (as the reference's overlay) of values in [0, 1]: ``[..., 3]`` uint8."""
    v = np.clip(values, 0, 1)[..., None]
    channels = np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1)
    return (channels * 255).astype(np.uint8)


__all__ = ["DEFAULT_SCALES", "LocateSettings", "Region", "WindowEmbeddings", "heat_map", "jet", "selo_windows",
           "strongest_regions"]
