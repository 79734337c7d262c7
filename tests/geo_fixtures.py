"""Small GeoTIFF scenes written with rasterio inside the tests (no files are shipped)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio", reason="the geo tests need rasterio (pip install 'galr[geo]')")

from rasterio.transform import from_origin  # noqa: E402

#: UTM zone 33N, a corner near 15.0 E / 45.0 N, 0.5 m pixels.
UTM_ORIGIN = (500_000.0, 4_983_000.0)


def write_scene(path: Path, pixels: np.ndarray, *, crs: str | None = "EPSG:32633", gsd: float = 0.5,
                nodata: float | None = None, origin: tuple[float, float] = UTM_ORIGIN, tiled: bool = True,
                overviews: bool = False) -> Path:
    """Write ``pixels`` ``[bands, h, w]`` as a GeoTIFF (no georeference when ``crs`` is None)."""
    bands, height, width = pixels.shape
    profile = {"driver": "GTiff", "width": width, "height": height, "count": bands, "dtype": pixels.dtype.name}
    if crs is not None:
        profile.update(crs=crs, transform=from_origin(origin[0], origin[1], gsd, gsd))
    if nodata is not None:
        profile["nodata"] = nodata
    if tiled and width >= 16 and height >= 16:
        profile.update(tiled=True, blockxsize=16 * max(1, min(width, 256) // 16),
                       blockysize=16 * max(1, min(height, 256) // 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        dataset = rasterio.open(path, "w", **profile)
    with dataset:
        dataset.write(pixels)
        if overviews:
            dataset.build_overviews([2, 4], rasterio.enums.Resampling.average)
    return path


def gradient_scene(width: int, height: int, bands: int = 3, dtype: str = "uint8", seed: int = 0) -> np.ndarray:
    """A deterministic textured scene ``[bands, h, w]`` of ``dtype``."""
    rng = np.random.default_rng(seed)
    top = {"uint8": 255, "uint16": 10_000, "float32": 1.0}[dtype]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([(xs / max(width, 1) + band / bands + ys / max(height, 1)) % 1.0 for band in range(bands)])
    noisy = np.clip(base * 0.8 + rng.random(base.shape, dtype=np.float32) * 0.2, 0, 1)
    return (noisy * top).astype(dtype)
