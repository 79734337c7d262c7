"""Cutting scenes into tiles: the windows, and what each tile records about its place.

Windows of one size start every ``size - overlap`` pixels from the top-left corner; the last
column and row of windows are moved back to end exactly at the scene's edge (so every pixel is
covered and no window hangs outside), and a scene smaller than a tile gets one window padded with
nodata. Several sizes (``sizes=(256, 512)``) give a multi-scale tiling; the model sees every tile
resized to its input size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from galr.errors import InputError
from galr.geo.scene import PixelWindow, Scene

if TYPE_CHECKING:
    from galr.preprocess.detections import DetectionSet


@dataclass(frozen=True)
class TileSettings:
    """How scenes are tiled.

    Attributes:
        sizes: tile sides in pixels, one tiling per size.
        overlap: pixels shared by neighbouring tiles (the same for every size; must be below the smallest).
    """

    sizes: tuple[int, ...] = (256,)
    overlap: int = 0

    def __post_init__(self) -> None:
        sizes = tuple(self.sizes)
        if not sizes or any(isinstance(s, bool) or int(s) != s or s < 16 for s in sizes):
            raise InputError(f"tile sizes must be whole numbers of at least 16 pixels, got {list(self.sizes)}")
        object.__setattr__(self, "sizes", tuple(sorted({int(s) for s in sizes})))
        if self.overlap < 0 or self.overlap >= min(self.sizes):
            raise InputError(f"overlap must be at least 0 and below the smallest tile ({min(self.sizes)} px), "
                             f"got {self.overlap}")


def parse_tile_sizes(text: str) -> tuple[int, ...]:
    """``"256"`` or ``"256,512"`` -> tile sizes."""
    try:
        return tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise InputError(f"--tile takes pixel sizes separated by commas (e.g. 256 or 256,512), got {text!r}") from None


def axis_starts(length: int, size: int, stride: int) -> list[int]:
    """Window starts along one axis: every ``stride``, the last moved back to end at ``length``."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def tile_windows(width: int, height: int, settings: TileSettings) -> Iterator[tuple[int, PixelWindow]]:
    """``(size, window)`` for every tile of a ``width`` x ``height`` scene, size by size, row by row.

    A scene smaller than a tile in one direction gets windows as long as the scene in that direction
    (read padded to the tile size).
    """
    for size in settings.sizes:
        stride = size - settings.overlap
        for row in axis_starts(height, size, stride):
            for col in axis_starts(width, size, stride):
                yield size, PixelWindow(col, row, min(size, width), min(size, height))


def count_tiles(width: int, height: int, settings: TileSettings) -> int:
    """How many windows :func:`tile_windows` yields (without making them)."""
    total = 0
    for size in settings.sizes:
        stride = size - settings.overlap
        total += len(axis_starts(width, size, stride)) * len(axis_starts(height, size, stride))
    return total


def tile_id(scene_id: str, size: int, window: PixelWindow) -> str:
    """The index id of a tile: ``scene.tif@256:col,row`` (stable: rebuilding gives the same ids)."""
    return f"{scene_id}@{size}:{window.col},{window.row}"


def tile_geo_fields(scene: Scene, windows: list[PixelWindow]) -> list[dict[str, Any]]:
    """``lat``, ``lon`` and ``footprint`` of each tile (``None`` each without georeference).

    All windows of a scene in one coordinate transformation (one call instead of two per tile).
    """
    if not scene.georeferenced:
        return [{"lat": None, "lon": None, "footprint": None} for _ in windows]
    cols, rows = [], []
    for w in windows:
        c0, r0, c1, r1 = w.col, w.row, w.col + w.width, w.row + w.height
        cols += [c0, c1, c1, c0, c0, (c0 + c1) / 2]
        rows += [r0, r0, r1, r1, r0, (r0 + r1) / 2]
    lons, lats = scene.lonlat(cols, rows)
    fields = []
    for start in range(0, len(lons), 6):
        ring = tuple(zip(lons[start:start + 5], lats[start:start + 5]))
        fields.append({"lat": lats[start + 5], "lon": lons[start + 5], "footprint": ring})
    return fields


def scene_metadata(scene: Scene) -> dict[str, Any]:
    """What every tile of ``scene`` records about it (JSON; goes into ``ImageRecord.extra``)."""
    metadata = {"crs": scene.crs_name, "gsd": None if scene.gsd is None else round(scene.gsd, 4),
                "scene_size": [scene.width, scene.height], "bands": list(scene.bands)}
    if scene.datetime:
        metadata["datetime"] = scene.datetime
    if scene.stretch_range is not None:  # so a tile's pixels are read again without the overview
        metadata["stretch"] = [[lo, hi] for lo, hi in scene.stretch_range]
    return metadata



def clip_detections(detections: "DetectionSet", window: PixelWindow, size: tuple[int, int],
                    image: str | None = None) -> "DetectionSet":
    """The detections of a whole scene that belong to one tile, in the tile's pixel coordinates.

    A detection belongs to the tile that holds its box centre (overlapping tiles may both hold it);
    its box is shifted by the window's corner and clipped to the tile, an oriented polygon is
    shifted only (DREA reads its bounds).

    Args:
        detections: the scene's detections in scene pixel coordinates.
        window: the tile's window.
        size: ``(width, height)`` of the tile as read (larger than the window when padded).
        image: what messages call the tile (its index id); the scene's name by default.
    """
    from galr.preprocess.detections import Detection, DetectionSet

    width, height = size
    kept = []
    for detection in detections.detections:
        x0, y0, x1, y1 = detection.box
        cx, cy = (x0 + x1) / 2 - window.col, (y0 + y1) / 2 - window.row
        if not (0 <= cx < window.width and 0 <= cy < window.height):
            continue
        box = (min(max(x0 - window.col, 0.0), width), min(max(y0 - window.row, 0.0), height),
               min(max(x1 - window.col, 0.0), width), min(max(y1 - window.row, 0.0), height))
        polygon = None if detection.polygon is None else tuple(
            (x - window.col, y - window.row) for x, y in detection.polygon)
        kept.append(Detection(detection.label, detection.score, box, polygon))
    return DetectionSet(tuple(kept), width, height, f"{detections.source} {window.as_list()}",
                        image or detections.image)

__all__ = ["TileSettings", "axis_starts", "clip_detections", "count_tiles", "parse_tile_sizes", "scene_metadata", "tile_geo_fields",
           "tile_id", "tile_windows"]
