"""Semantic localisation on a scene: window embeddings once, then one heat map per query.

>>> with load_engine("galr.plan") as encoders:                                         # doctest: +SKIP
...     windows = scene_window_embeddings(encoders, "scene.tif", LocateSettings(), cache_dir="out/")
...     maps = locate(encoders, windows, ["two planes next to the runway"], LocateSettings())

Window pixels are read from the scene one batch at a time on a reader thread while the encoder runs
(the same prefetch as scene indexing), so memory does not grow with the scene and a scene's windows
are encoded at the encoder's speed. The embeddings are cached beside the outputs, keyed by the
scene file (size and modification time), the scales, the pixel rules and the model hash: ten
queries cost one encoding pass plus ten matrix-vector products.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from galr.geo.scene import Scene, SceneReadSettings
from galr.geo.selo import LocateSettings, Region, WindowEmbeddings, heat_map, selo_windows, strongest_regions
from galr.runtime.index.scenes import prefetched


def _scene_stamp(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_path(cache_dir: Path, scene_path: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:12]
    return cache_dir / f"{scene_path.stem}.windows-{digest}.npz"


def scene_window_embeddings(encoders: Any, scene_path: str | os.PathLike, settings: LocateSettings,
                            read: SceneReadSettings | None = None, cache_dir: str | os.PathLike | None = None,
                            batch_size: int = 32, progress: bool = True, local: Any = None
                            ) -> tuple[WindowEmbeddings, bool]:
    """The embeddings of every SeLo window of a scene, from the cache when it matches.

    Args:
        encoders: the :class:`~galr.runtime.encoders.Encoders`.
        scene_path: a GeoTIFF / COG (or any raster GDAL reads; plain images work in pixel coordinates).
        settings: the scales (the cell size does not change the embeddings).
        read: band and stretch rules.
        cache_dir: where the cache lives (``None``: no cache).
        batch_size: windows per encoder call.
        progress: a tqdm bar on stderr.
        local: a detector run on each window for the DREA input, or ``None`` (no-detection fallback).

    Returns:
        ``(embeddings, from_cache)``.
    """
    from tqdm import tqdm

    read = read or SceneReadSettings(min_valid_fraction=0.0)
    path = Path(scene_path)
    size = encoders.spec.image.size
    with Scene.open(path, read) as scene:
        windows = selo_windows(scene.width, scene.height, settings.scales)
        key = {"scene": _scene_stamp(path), "scales": list(settings.scales), "model": encoders.model_hash,
               "read_side": 2 * size,
               "bands": list(scene.bands), "stretch": list(read.stretch) if read.stretch else None,
               "detector": getattr(getattr(local, "path", None), "name", None)}
        cached_at = cache_path(Path(cache_dir), path, key) if cache_dir is not None else None
        if cached_at is not None and cached_at.is_file():
            cached = WindowEmbeddings.load(cached_at, key)
            if cached is not None:
                return cached, True

        def batches() -> Iterator[list[np.ndarray]]:
            for start in range(0, len(windows), batch_size):
                # Windows larger than twice the model's input are read decimated: the encoder shrinks them anyway.
                yield [scene.read_window(window, max_side=2 * size)[0] for window in windows[start:start + batch_size]]

        parts = []
        with tqdm(total=len(windows), unit="window", desc=f"encoding {path.name}", disable=not progress) as bar, \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the no-detection fallback would warn once per window
            for pixels in prefetched(batches()):
                parts.append(encoders.encode_images(pixels, local=local))
                bar.update(len(pixels))
        result = WindowEmbeddings((scene.width, scene.height),
                                  np.array([w.as_list() for w in windows], np.int64).reshape(-1, 4),
                                  np.concatenate(parts).astype(np.float32), key)
    if cached_at is not None:
        cached_at.parent.mkdir(parents=True, exist_ok=True)
        result.save(cached_at)
    return result, False


@dataclass
class LocateResult:
    """One query's heat map over one scene."""

    query: str
    heat: np.ndarray
    regions: list[Region]
    timings_ms: dict[str, float] = field(default_factory=dict)


def locate(encoders: Any, windows: WindowEmbeddings, queries: Sequence[str], settings: LocateSettings
           ) -> list[LocateResult]:
    """Heat maps of ``queries`` from a scene's window embeddings (one matrix product for all queries)."""
    started = time.perf_counter()
    query_embeddings = encoders.encode_text(list(queries))
    encode_ms = (time.perf_counter() - started) * 1e3 / max(1, len(queries))
    scores = windows.scores(query_embeddings)
    results = []
    for query, row in zip(queries, scores):
        began = time.perf_counter()
        heat = heat_map(row, windows.windows, windows.scene_size, settings)
        regions = strongest_regions(heat, settings, windows.scene_size)
        results.append(LocateResult(query, heat, regions,
                                    {"encode": encode_ms, "map": (time.perf_counter() - began) * 1e3}))
    return results


def write_heat_geotiff(path: Path, heat: np.ndarray, scene: Scene, cell: int) -> Path:
    """The map as a float32 GeoTIFF on the scene's georeference (one pixel = ``cell`` scene pixels)."""
    import rasterio
    from rasterio.transform import Affine

    from galr.atomic import atomic_output

    profile = {"driver": "GTiff", "width": heat.shape[1], "height": heat.shape[0], "count": 1, "dtype": "float32"}
    if scene.georeferenced:
        profile.update(crs=scene.crs, transform=scene.transform @ Affine.scale(cell, cell))
    with atomic_output(path) as handle, rasterio.MemoryFile() as memory:
        with memory.open(**profile) as dataset:
            dataset.write(heat.astype(np.float32), 1)
            dataset.update_tags(galr_cell_px=str(cell), galr_meaning="SeLo heat map in [0, 1]")
        handle.write(memory.read())
    return path


def overlay_picture(scene: Scene, heat: np.ndarray, side: int = 1024, regions: Sequence[Region] = (),
                    truth: Sequence[Sequence[Sequence[float]]] = ()) -> Any:
    """The scene's overview blended with the JET-coloured map (0.7 scene + 0.3 map, as the reference),
    the strongest ``regions`` outlined in red (rank 1 thicker) and ground-truth polygons in white."""
    from PIL import Image, ImageDraw

    from galr.geo.selo import jet

    overview = Image.fromarray(scene.overview(side))
    coloured = Image.fromarray(jet(heat)).resize(overview.size, Image.Resampling.BILINEAR)
    picture = Image.blend(overview, coloured, 0.3)
    factor = picture.width / scene.width
    draw = ImageDraw.Draw(picture)
    for points in truth:
        draw.polygon([(x * factor, y * factor) for x, y in points], outline=(255, 255, 255), width=3)
    for rank, region in reversed(list(enumerate(regions, start=1))):
        w = region.window
        draw.rectangle([w.col * factor, w.row * factor, (w.col + w.width) * factor, (w.row + w.height) * factor],
                       outline=(230, 30, 30), width=4 if rank == 1 else 2)
    return picture


def region_features(regions: Sequence[Region], scene: Scene, query: str) -> list[dict[str, Any]]:
    """GeoJSON features of the strongest regions (geometry ``null`` for a scene without georeference)."""
    from galr.geo.geojson import polygon

    features = []
    for rank, region in enumerate(regions, start=1):
        footprint = scene.footprint(region.window)
        features.append({"type": "Feature", "geometry": polygon(footprint) if footprint else None,
                         "properties": {"query": query, "rank": rank, "peak": round(region.peak, 4),
                                        "mean": round(region.mean, 4), "scene": scene.path.name,
                                        "window": region.window.as_list()}})
    return features


__all__ = ["LocateResult", "cache_path", "locate", "overlay_picture", "region_features", "scene_window_embeddings",
           "write_heat_geotiff"]
