"""Scenes with coordinates: reading GeoTIFF/COG windows, tiling, footprints, GeoJSON, semantic localisation.

Torch-free. rasterio (``pip install 'galr[geo]'``) is imported only when a scene is opened.

- :mod:`~galr.geo.scene`: :class:`Scene` (windowed 8-bit reads, bands, stretch, nodata, WGS84 footprints).
- :mod:`~galr.geo.tiling`: tile windows, tile ids and geo fields, detections clipped into tiles.
- :mod:`~galr.geo.geojson`: FeatureCollections of hits and regions.
- :mod:`~galr.geo.selo`: semantic localisation heat maps (SeLo windows, aggregation, smoothing).
- :mod:`~galr.geo.selo_metrics`: Rsu, Ras, Rda and Rmi.
"""

from galr.geo.scene import (
    GeoWarning,
    PixelWindow,
    Scene,
    SceneError,
    SceneReadSettings,
    default_bands,
    is_scene_file,
    parse_bands,
    require_rasterio,
)
from galr.geo.tiling import TileSettings, clip_detections, count_tiles, tile_id, tile_windows

__all__ = [
    "GeoWarning",
    "PixelWindow",
    "Scene",
    "SceneError",
    "SceneReadSettings",
    "TileSettings",
    "clip_detections",
    "count_tiles",
    "default_bands",
    "is_scene_file",
    "parse_bands",
    "require_rasterio",
    "tile_id",
    "tile_windows",
]
