"""Scenes: tiling throughput against the encoder alone, peak memory against scene size, galr-locate
query reuse, and the place/date filter at gallery scale.

==================  =========================================================================================
case                what runs
==================  =========================================================================================
throughput          ``encode_scene_files`` over a synthetic scene (``throughput_side``\\ ², tiles of
                    ``tile`` px, no overlap) against ``Encoders.encode_images`` on the same tiles already
                    decoded in memory (batch ``batch``): reading and preprocessing overlap the encoder
memory              ``galr-index --tile`` and ``galr-locate`` in fresh processes on scenes of each side in
                    ``memory_sides``; peak = the process's ``VmHWM``; the peaks must not grow with the scene
locate              ``galr-locate`` on a ``locate_side``\\ ² scene: the first query (window embeddings) and
                    each further query (from the cache: one matrix-vector product and the map)
filter              ``GalleryIndex.keys_matching`` and a filtered exact search (bbox covering
                    ``filter_fraction`` of the tiles) over ``filter_gallery`` records with footprints and dates,
                    against the unfiltered search of the same index (batch 1)
==================  =========================================================================================

Scenes come from :func:`galr.synthetic.geo.generate_geo_scenes` (UTM, 0.5 m); the model is the
benchmark's random-weight bundle (speed and memory do not depend on weights).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from galr.bench.harness import STATUS_OK, Log, not_run, stopwatch


@dataclass(frozen=True)
class GeoBenchSettings:
    """Sizes of the scene benchmark (see the module docstring)."""

    throughput_side: int = 4096
    tile: int = 256
    batch: int = 32
    memory_sides: tuple[int, ...] = (8192, 16384)
    memory_locate_scales: tuple[int, ...] = (1024, 2048)
    locate_side: int = 8192
    locate_scales: tuple[int, ...] = (256, 512, 768)
    locate_queries: int = 10
    filter_gallery: int = 1_000_000
    filter_fraction: float = 0.01
    filter_queries: int = 20
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _scene(folder: Path, side: int, seed: int, log: Log) -> Path:
    from galr.synthetic.geo import GeoSceneConfig, generate_geo_scenes

    target = folder / f"side{side}"
    log(f"geo: rendering a {side} x {side} synthetic scene")
    chip = 256 if side >= 1024 else side // 4  # quick mode's small scenes still hold a 2 x 2-chip target
    generate_geo_scenes(target, GeoSceneConfig(scenes=1, size=side, chip=chip, queries=1, placements=1, seed=seed),
                        progress=False)
    return target / "geo_scene_00.tif"


def measure_throughput(bench: Any, scene: Path, settings: GeoBenchSettings, log: Log) -> dict[str, Any]:
    """Tiles/s of scene indexing and of the encoder alone on the same tiles (best of two runs each)."""
    import warnings

    from galr.geo import Scene, TileSettings, tile_windows
    from galr.runtime.encoders import load_engine
    from galr.runtime.index.scenes import SceneTiling, encode_scene_files

    tiling = SceneTiling(TileSettings((settings.tile,)))
    with load_engine(bench.bundle, backend="onnxruntime", device="cpu", precision="fp32") as encoders, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Scene.open(scene) as opened:
            tiles = [opened.read_window(window, pad_to=settings.tile)[0]
                     for _, window in tile_windows(opened.width, opened.height, tiling.tiles)]
        encoders.encode_images(tiles[: settings.batch])  # warm-up
        alone, indexed = [], []
        for _ in range(2):
            log(f"geo: encoder alone on {len(tiles)} tiles")
            started = time.perf_counter()
            for start in range(0, len(tiles), settings.batch):
                encoders.encode_images(tiles[start:start + settings.batch])
            alone.append(len(tiles) / (time.perf_counter() - started))
            log(f"geo: indexing the scene ({len(tiles)} tiles)")
            started = time.perf_counter()
            records, _, _ = encode_scene_files(encoders, [scene], tiling, batch_size=settings.batch, progress=False)
            indexed.append(len(records) / (time.perf_counter() - started))
    return {"tiles": len(tiles), "encoder_tiles_per_s": max(alone), "indexing_tiles_per_s": max(indexed),
            "share": max(indexed) / max(alone)}


_LOCATE = """
    sys.argv = ["galr-locate", *sys.argv[1:]]
    from galr.console import galr_locate
    galr_locate()
"""
_INDEX = """
    sys.argv = ["galr-index", *sys.argv[1:]]
    from galr.console import galr_index
    galr_index()
"""


def measure_memory(bench: Any, scenes: dict[int, Path], folder: Path, settings: GeoBenchSettings,
                   log: Log) -> list[dict[str, Any]]:
    """Peak RSS of galr-index --tile and galr-locate per scene side (fresh processes)."""
    import textwrap

    from galr.bench.bounds import _peak_of

    rows = []
    scales = ",".join(map(str, settings.memory_locate_scales))
    for side, scene in scenes.items():
        log(f"geo: peak memory of galr-index --tile {settings.tile} on {side} x {side}")
        elapsed = stopwatch()
        index_peak, index_last = _peak_of(textwrap.dedent(_INDEX), str(scene), "--engine", str(bench.bundle),
                                          "--tile", str(settings.tile), "-o", str(folder / f"m{side}.gidx"),
                                          "--overwrite", "--no-progress", "--backend", "onnxruntime",
                                          "--precision", "fp32")
        index_s = elapsed()
        log(f"geo: peak memory of galr-locate --scales {scales} on {side} x {side}")
        elapsed = stopwatch()
        locate_peak, locate_last = _peak_of(textwrap.dedent(_LOCATE), str(scene), "--engine", str(bench.bundle),
                                            "--query", "two planes", "-o", str(folder / f"l{side}"), "--scales",
                                            scales, "--cell", "32", "--no-progress", "--backend", "onnxruntime",
                                            "--precision", "fp32")
        rows.append({"side": side, "index_peak_bytes": index_peak, "index_s": round(index_s, 1),
                     "locate_peak_bytes": locate_peak, "locate_s": round(elapsed(), 1),
                     "errors": [text for peak, text in ((index_peak, index_last), (locate_peak, locate_last))
                                if peak is None]})
    return rows


def measure_locate(bench: Any, scene: Path, folder: Path, settings: GeoBenchSettings, log: Log) -> dict[str, Any]:
    """The first query on a scene (window embeddings + map) and the further ones (cache)."""
    import warnings

    from galr.bench.encoders import synthetic_queries
    from galr.geo.selo import LocateSettings
    from galr.runtime.encoders import load_engine
    from galr.runtime.locate import locate, scene_window_embeddings

    queries = synthetic_queries(bench.vocab, settings.locate_queries, 12, settings.seed)
    locate_settings = LocateSettings(scales=settings.locate_scales)
    with load_engine(bench.bundle, backend="onnxruntime", device="cpu", precision="fp32") as encoders, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        log(f"geo: galr-locate first query on {settings.locate_side} x {settings.locate_side}")
        started = time.perf_counter()
        windows, _ = scene_window_embeddings(encoders, scene, locate_settings, cache_dir=folder, progress=False)
        locate(encoders, windows, queries[:1], locate_settings)
        first_s = time.perf_counter() - started
        further = []
        for query in queries[1:]:
            started = time.perf_counter()
            cached, from_cache = scene_window_embeddings(encoders, scene, locate_settings, cache_dir=folder,
                                                         progress=False)
            locate(encoders, cached, [query], locate_settings)
            further.append(time.perf_counter() - started)
    return {"windows": int(len(windows.windows)), "first_query_s": first_s,
            "further_query_s_p50": float(np.median(further)), "from_cache": bool(from_cache),
            "windows_per_s": len(windows.windows) / first_s}


def measure_filter(settings: GeoBenchSettings, log: Log, dim: int = 512) -> dict[str, Any]:
    """A bbox+date filter inside exact search over ``filter_gallery`` placed records."""
    from galr.geo.filters import PlaceFilter
    from galr.runtime.index import GalleryIndex, ImageRecord

    n = settings.filter_gallery
    rng = np.random.default_rng(settings.seed)
    log(f"geo: {n:,} placed records for the filter case")
    side = int(np.ceil(np.sqrt(n)))
    step = 0.002  # ~200 m tiles on a square grid of degrees
    records = []
    for i in range(n):
        lon, lat = 10.0 + (i % side) * step, 40.0 + (i // side) * step
        records.append(ImageRecord(f"s.tif@256:{i}", "/archive/s.tif", 256, 256, lat + step / 2, lon + step / 2,
                                   ((lon, lat + step), (lon + step, lat + step), (lon + step, lat), (lon, lat),
                                    (lon, lat + step)), {"datetime": "2024-05-01T10:30:00" if i % 2 else
                                                          "2023-05-01T10:30:00"}))
    index = GalleryIndex("bench", dim, "fp32")
    for start in range(0, n, 100_000):
        block = rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32)
        index.add(records[start:start + len(block)], block / np.linalg.norm(block, axis=1, keepdims=True))
    del records
    extent = side * step * np.sqrt(settings.filter_fraction)
    where = PlaceFilter(bbox=(10.0, 40.0, 10.0 + extent, 40.0 + extent),
                        since=np.datetime64("2024-01-01T00:00:00", "s"))
    started = time.perf_counter()
    index.keys_matching(where)
    places_s = time.perf_counter() - started  # the first call builds the place arrays
    queries = rng.standard_normal((settings.filter_queries, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    plain, filtered, matching = [], [], 0
    for query in queries:
        started = time.perf_counter()
        index.images.search(query[None], 10)
        plain.append(time.perf_counter() - started)
        started = time.perf_counter()
        allowed = index.keys_matching(where)
        index.images.search(query[None], 10, allowed=allowed)
        filtered.append(time.perf_counter() - started)
        matching = len(allowed)
    return {"records": n, "matching": matching, "places_build_s": places_s,
            "search_ms_p50": 1e3 * float(np.median(plain)), "filtered_search_ms_p50": 1e3 * float(np.median(filtered))}


def run_geo_benchmarks(bench: Any | None, settings: GeoBenchSettings, log: Log) -> dict[str, Any]:
    """The ``geo`` section (needs the benchmark model and the geo extra)."""
    if bench is None:
        return not_run("the encoder section's model was not built (encoders not selected)")
    try:
        import rasterio  # noqa: F401
        import scipy  # noqa: F401
    except ImportError:
        return not_run("the geo extra is not installed (pip install 'galr[geo]')")
    elapsed = stopwatch()
    with tempfile.TemporaryDirectory(prefix="galr-bench-geo-") as work:
        folder = Path(work)
        sides = sorted({settings.throughput_side, settings.locate_side, *settings.memory_sides})
        scenes = {side: _scene(folder, side, settings.seed, log) for side in sides}
        throughput = measure_throughput(bench, scenes[settings.throughput_side], settings, log)
        memory = measure_memory(bench, {side: scenes[side] for side in settings.memory_sides}, folder, settings, log)
        located = measure_locate(bench, scenes[settings.locate_side], folder, settings, log)
    filtered = measure_filter(settings, log)
    return {"status": STATUS_OK, "settings": settings.to_dict(), "throughput": throughput, "memory": memory,
            "locate": located, "filter": filtered, "seconds": round(elapsed(), 1)}


__all__ = ["GeoBenchSettings", "measure_filter", "measure_locate", "measure_memory", "measure_throughput",
           "run_geo_benchmarks"]
