"""``galr-locate``: semantic localisation heat maps of captions over large scenes (torch-free).

For each scene and query it writes, into ``--output``:

* ``<scene>.<query>.heat.tif``: the map (float32 in [0, 1]) on the scene's georeference, one pixel
  per ``--cell`` scene pixels;
* ``<scene>.<query>.overlay.png``: the map over the scene's overview (JET colours, 0.3 opacity), the
  strongest regions outlined in red and, with ``--annotations``, the ground truth in white;
* ``<scene>.<query>.regions.geojson``: the strongest regions as WGS84 polygons;
* ``locate.json``: every output, the regions and timings (and the SeLo metrics with ``--annotations``).

With ``--annotations anno.json`` (the SeLo format: ``[{caption, jpg_name, points}]``), the queries
are the annotated captions of each scene and Rsu, Ras, Rda and Rmi are reported per sample and on average.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import click

from galr import paths
from galr.atomic import write_bytes_atomically, write_text_atomically
from galr.console import GalrCommand, printable
from galr.errors import InputError, NotFoundError, NothingDoneError
from galr.preprocess.text import read_text_lines
from galr.runtime.backends.registry import AUTO, REQUESTABLE_DEVICES, backend_names

_EPILOG = """\b
Examples:
  galr-locate scene.tif --engine galr.plan --query "two planes next to the runway" -o out/
  galr-locate scenes/*.tif --queries q.txt -o out/ --scales 256,512,768 --cell 16
  galr-locate scenes/*.tif --annotations anno.json -o out/      (SeLo metrics)
"""


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return slug or "query"


def _read_annotations(path: Path) -> list[dict[str, Any]]:
    try:
        samples = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a SeLo annotation JSON ({exc})") from None
    if not isinstance(samples, list) or not all(isinstance(s, dict) and {"caption", "jpg_name", "points"} <= s.keys()
                                                 for s in samples):
        raise InputError(f"{path}: SeLo annotations are a list of {{caption, jpg_name, points}} objects")
    return samples


@click.command("galr-locate", cls=GalrCommand, epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("scenes", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--engine", "bundle", type=click.Path(path_type=Path), default=paths.DEFAULT_BUNDLE, show_default=True)
@click.option("--query", "query_texts", multiple=True, help="A caption to localise (repeat for several).")
@click.option("--queries", "query_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A file of captions, one per line.")
@click.option("--annotations", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="SeLo ground truth (anno.json): localise its captions and report Rsu, Ras, Rda, Rmi.")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder for the maps, overlays, regions, locate.json and the window-embedding cache.")
@click.option("--scales", default="256,512,768", show_default=True, help="Window sides in scene pixels.")
@click.option("--cell", type=click.IntRange(1, 512), default=16, show_default=True,
              help="Scene pixels per heat-map pixel.")
@click.option("--bands", default=None, metavar="R,G,B", help="Scene bands shown as R,G,B, counted from 1.")
@click.option("--detector", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="An Ultralytics oriented-box detector ONNX run on every window for the DREA input.")
@click.option("--no-detector", "no_detector", is_flag=True,
              help="Do not run the detector stored in the bundle (galr-export --detector).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--backend", type=click.Choice([AUTO, *backend_names()]), default=AUTO, show_default=True)
@click.option("--device", type=click.Choice(list(REQUESTABLE_DEVICES)), default=AUTO, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "int8", "int8-cpu"]), default="auto",
              show_default=True, help="auto: int8-cpu on ONNX Runtime CPU when the bundle has it, else fp32 (fp16 on GPUs).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def main(scenes, bundle, query_texts, query_file, annotations, output, scales, cell, bands, detector, no_detector,
         batch_size, backend, device, precision, progress) -> None:
    """Heat maps of where each query matches in each of SCENES (GeoTIFF, COG or plain images)."""
    from galr.geo import SceneReadSettings, parse_bands, require_rasterio
    from galr.geo.geojson import feature_collection
    from galr.geo.selo import LocateSettings
    from galr.geo.tiling import parse_tile_sizes
    from galr.runtime.encoders import load_engine
    from galr.runtime.locate import (
        locate,
        overlay_picture,
        region_features,
        scene_window_embeddings,
        write_heat_geotiff,
    )

    require_rasterio()
    settings = LocateSettings(scales=parse_tile_sizes(scales), cell=cell)
    read = SceneReadSettings(bands=parse_bands(bands), min_valid_fraction=0.0)
    for scene in scenes:
        if not scene.is_file():
            raise NotFoundError(f"{scene}: scene not found")
    queries = list(query_texts) + ([line.text for line in read_text_lines(query_file, "queries")] if query_file else [])
    samples = _read_annotations(annotations) if annotations else None
    if samples is None and not queries:
        raise click.UsageError("give --query TEXT, --queries FILE or --annotations anno.json")
    if samples is not None and queries:
        raise click.UsageError("--annotations brings its own captions; leave out --query/--queries")
    by_name = {scene.name: scene for scene in scenes}
    if samples is not None:
        missing = sorted({s["jpg_name"] for s in samples} - set(by_name))
        if missing:
            raise NotFoundError(f"the annotations name scenes that were not given: {missing[:5]}")
    output.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {"bundle": str(bundle), "scales": list(settings.scales), "cell": cell, "scenes": []}
    scored = []
    with load_engine(bundle, backend=backend, device=device, precision=precision) as encoders:
        click.echo(f"engine: {encoders.info.describe()}")
        from galr.runtime.detector import choose_detector

        local, line = choose_detector(detector, encoders.bundle, drea_classes=encoders.spec.drea.classes,
                                      use_bundled=not no_detector, backend=encoders.info.backend)
        if line:
            click.echo(line)
        for scene_path in scenes:
            scene_samples = [s for s in samples if s["jpg_name"] == scene_path.name] if samples is not None else None
            scene_queries = [s["caption"].strip() for s in scene_samples] if scene_samples is not None else queries
            if not scene_queries:
                continue
            began = time.perf_counter()
            windows, cached = scene_window_embeddings(encoders, scene_path, settings, read, output, batch_size,
                                                      progress, local)
            windows_s = time.perf_counter() - began
            click.echo(f"{printable(scene_path)}: {len(windows.windows)} windows "
                       f"({'from the cache' if cached else f'encoded in {windows_s:.1f} s'})")
            results = locate(encoders, windows, scene_queries, settings)
            entry = {"scene": str(scene_path), "windows": len(windows.windows), "windows_cached": cached,
                     "windows_s": round(windows_s, 3), "queries": []}
            from galr.geo import Scene

            with Scene.open(scene_path, read) as scene:
                for number, result in enumerate(results):
                    stem = f"{scene_path.stem}.{_slug(result.query)}"
                    heat_path = write_heat_geotiff(output / f"{stem}.heat.tif", result.heat, scene, cell)
                    truth = scene_samples[number]["points"] if scene_samples is not None else ()
                    overlay = overlay_picture(scene, result.heat, regions=result.regions, truth=truth)
                    import io

                    buffer = io.BytesIO()
                    overlay.save(buffer, format="PNG")
                    write_bytes_atomically(output / f"{stem}.overlay.png", buffer.getvalue())
                    features = region_features(result.regions, scene, result.query)
                    write_text_atomically(output / f"{stem}.regions.geojson",
                                          json.dumps(feature_collection(features), indent=1) + "\n")
                    query_entry = {"query": result.query, "heat": heat_path.name, "overlay": f"{stem}.overlay.png",
                                   "regions_geojson": f"{stem}.regions.geojson",
                                   "regions": [f["properties"] for f in features],
                                   "timings_ms": {k: round(v, 2) for k, v in result.timings_ms.items()}}
                    if scene_samples is not None:
                        from galr.geo.selo_metrics import selo_scores

                        metrics = selo_scores(result.heat, scene_samples[number]["points"], cell)
                        query_entry["selo"] = metrics.to_dict()
                        scored.append(metrics)
                    entry["queries"].append(query_entry)
                    best = result.regions[0] if result.regions else None
                    where = f"strongest region at px {best.window.as_list()}" if best else "flat map"
                    click.echo(f"  {printable(result.query[:60])!r}: {where} -> {stem}.*")
            report["scenes"].append(entry)
    if not report["scenes"]:
        raise NothingDoneError("no scene had a query to localise; nothing written")
    if scored:
        means = {name: sum(getattr(m, name) for m in scored) / len(scored) for name in ("rsu", "ras", "rda", "rmi")}
        report["selo_mean"] = {**{k: round(v, 4) for k, v in means.items()}, "samples": len(scored)}
        click.echo(f"SeLo over {len(scored)} samples: Rsu {means['rsu']:.4f} (up) · Ras {means['ras']:.4f} (down) · "
                   f"Rda {means['rda']:.4f} (up) · Rmi {means['rmi']:.4f} (up)")
    write_text_atomically(output / "locate.json", json.dumps(report, indent=1) + "\n")
    click.echo(f"wrote {printable(output / 'locate.json')}")


__all__ = ["main"]
