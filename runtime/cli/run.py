"""``galr-run``: answer queries from a file against a gallery index (torch-free)."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import click

from galr import paths
from galr.atomic import check_writable, write_text_atomically
from galr.config import RerankConfig
from galr.console import GalrCommand, printable
from galr.errors import NotFoundError, NothingDoneError
from galr.geo.filters import PlaceFilter
from galr.preprocess.text import read_text_lines
from galr.runtime.backends.registry import AUTO, REQUESTABLE_DEVICES, backend_names
from galr.runtime.encoders import QueryWarning

_EPILOG = """\b
Examples:
  galr-run query.txt --engine galr.plan
  galr-run query.txt --engine galr.plan --index gallery.gidx --top-k 10 --json hits.json --html hits.html
  galr-run images.txt --mode image2text --detections dets/
  galr-run query.txt --engine galr.plan --index archive.gidx --geojson hits.geojson --bbox 14.9,44.9,15.1,45.1
"""


def _usable_queries(lines: list, encoders) -> list:
    """The lines that can be encoded; each one that cannot is skipped with a warning naming its line."""
    usable = []
    for line in lines:
        problem = encoders.query_problem(line.text)
        if problem is None:
            usable.append(line)
        else:
            warnings.warn(QueryWarning(f"line {line.number} ({printable(line.text[:60])!r}) {problem}; skipped",
                                       f"line {line.number}"), stacklevel=2)
    return usable


def _report_warnings(caught: list, lines: list) -> None:
    """Each distinct warning once, those about a query in the order of its line in the file."""
    line_of = {f"line {line.number}": line.number for line in lines}
    ordered = sorted(caught, key=lambda w: line_of.get(getattr(w.message, "label", None), 0))
    for message in dict.fromkeys(str(w.message) for w in ordered):
        click.echo(f"warning: {printable(message)}", err=True)


@click.command("galr-run", cls=GalrCommand, epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("query_file", type=click.Path(path_type=Path))
@click.option("--engine", "bundle", type=click.Path(path_type=Path), default=paths.DEFAULT_BUNDLE, show_default=True,
              help="The galr.plan bundle made by galr-export.")
@click.option("--index", "index_path", type=click.Path(path_type=Path), default=paths.DEFAULT_INDEX, show_default=True,
              help="Gallery index made by galr-index with the same bundle.")
@click.option("--top-k", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--rerank/--no-rerank", default=True, show_default=True,
              help="Multivariate rerank (needs the index's text bank for text queries).")
@click.option("--mode", type=click.Choice(["text2image", "image2text"]), default="text2image", show_default=True,
              help="image2text: QUERY_FILE lists image paths, answered with captions of the index's text bank.")
@click.option("--detections", type=click.Path(path_type=Path), default=None,
              help="image2text: folder of detection files for the query images.")
@click.option("--detector", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="image2text: an Ultralytics oriented-box detector ONNX run on the query images for DREA.")
@click.option("--no-detector", "no_detector", is_flag=True,
              help="image2text: do not run the detector stored in the bundle (galr-export --detector).")
@click.option("--backend", type=click.Choice([AUTO, *backend_names()]), default=AUTO, show_default=True)
@click.option("--device", type=click.Choice(list(REQUESTABLE_DEVICES)), default=AUTO, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "int8", "int8-cpu"]), default="auto",
              show_default=True, help="auto: int8-cpu on ONNX Runtime CPU when the bundle has it, else fp32 (fp16 on GPUs).")
@click.option("--k", "mr_k", type=int, default=RerankConfig.k, show_default=True, help="MR candidates (at least 10).")
@click.option("--wp1", type=float, default=RerankConfig.wp1, show_default=True, help="MR salience weight.")
@click.option("--wp2", type=float, default=RerankConfig.wp2, show_default=True, help="MR reverse-rank weight.")
@click.option("--nprobe", type=click.IntRange(min=1), default=None,
              help="ivf/ivfpq indexes: lists scanned per query (more: better recall, slower)  [default: the index's]")
@click.option("--ef", type=click.IntRange(min=1), default=None,
              help="hnsw indexes: search beam width (more: better recall, slower)  [default: the index's]")
@click.option("--exact-rerank", type=click.IntRange(min=0, max=1000), default=None, metavar="R",
              help="ivfpq indexes built with rerank: re-score R x k PQ candidates with the exact vectors kept on "
                   "disk (more: better recall, slower; 0: PQ scores only)  [default: the index's]")
@click.option("--bbox", default=None, metavar="W,S,E,N",
              help="Only tiles whose footprint meets this WGS84 box (degrees), searched inside the index.")
@click.option("--since", default=None, metavar="DATE", help="Only tiles of scenes acquired on or after DATE (YYYY-MM-DD).")
@click.option("--until", default=None, metavar="DATE", help="Only tiles of scenes acquired on or before DATE.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write results as JSON.")
@click.option("--geojson", "geojson_path", type=click.Path(path_type=Path), default=None,
              help="Also write the hits as a GeoJSON FeatureCollection (footprints in WGS84; needs an index of "
                   "georeferenced scene tiles, galr-index --tile).")
@click.option("--html", "html_path", type=click.Path(path_type=Path), default=None,
              help="Also write a self-contained HTML contact sheet with thumbnails.")
def main(query_file, bundle, index_path, top_k, rerank, mode, detections, detector, no_detector, backend, device,
         precision, mr_k,
         wp1, wp2, nprobe, ef, exact_rerank, bbox, since, until, json_path, geojson_path, html_path) -> None:
    """Search the gallery for every query in QUERY_FILE (one per line) and show the best images."""
    from galr.retrieval.rerank import MIN_CANDIDATES
    from galr.runtime.report.table import format_results
    from galr.runtime.retriever import Retriever

    if detections is not None and detector is not None:
        raise click.UsageError("give --detections or --detector, not both")
    where = PlaceFilter.from_text(bbox, since, until)
    if where is not None and mode != "text2image":
        raise click.UsageError("--bbox/--since/--until restrict gallery images: use them with --mode text2image")
    if geojson_path is not None and mode != "text2image":
        raise click.UsageError("--geojson places gallery tiles on a map: use it with --mode text2image")
    lines = read_text_lines(query_file, "queries")
    for output in (json_path, html_path, geojson_path):
        if output is not None:
            check_writable(output)  # before minutes of work, not after
    if mode == "image2text":
        missing = [line for line in lines if not Path(line.text).is_file()]
        if missing:
            raise NotFoundError(f"line {missing[0].number}: image not found: {missing[0].text} (image2text reads one "
                                "image path per line)")
    config = RerankConfig(k=max(mr_k, MIN_CANDIDATES), wp1=wp1, wp2=wp2)
    start = time.perf_counter()
    search_params = {name: value for name, value in (("nprobe", nprobe), ("ef", ef), ("rerank", exact_rerank))
                     if value is not None}
    retriever = Retriever.open(bundle, index_path, backend=backend, device=device, precision=precision, rerank=config,
                               search_params=search_params)
    load_ms = (time.perf_counter() - start) * 1e3
    with retriever:
        index = retriever.index
        click.echo(f"engine: {retriever.encoders.info.describe()} · loaded in {load_ms:.0f} ms")
        click.echo(f"index:  {printable(index_path)} · {len(index)} images ({index.images.kind} search) · text bank "
                   f"{len(index.text_bank_texts)} captions")
        if geojson_path is not None and not len(index.keys_matching(PlaceFilter(bbox=(-180.0, -90.0, 180.0, 90.0)))):
            raise NothingDoneError(f"{index_path} holds no georeferenced tiles, so --geojson has nothing to place; "
                                   "index GeoTIFF scenes with galr-index --tile, or use --json for pixel windows")
        if where is not None:
            matching = len(index.keys_matching(where))
            click.echo(f"filter: {where.describe()} · {matching} of {len(index)} images match")
            if matching == 0:
                raise NothingDoneError(f"no image of {index_path} matches {where.describe()} (only georeferenced, "
                                       "dated scene tiles can); nothing searched")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if mode == "text2image":
                usable = _usable_queries(lines, retriever.encoders)
                results = retriever.search_text([line.text for line in usable], top_k=top_k, rerank=rerank,
                                                labels=[f"line {line.number}" for line in usable], where=where)
            else:
                local: Any = str(detections) if detections else None
                if local is None:
                    from galr.runtime.detector import choose_detector

                    local, line = choose_detector(detector, retriever.encoders.bundle,
                                                  drea_classes=retriever.encoders.spec.drea.classes,
                                                  use_bundled=not no_detector,
                                                  backend=retriever.encoders.info.backend)
                    if line:
                        click.echo(line)
                results = retriever.search_images([line.text for line in lines], local=local, top_k=top_k,
                                                  rerank=rerank)
        _report_warnings(caught, lines)
        if not results:
            raise NothingDoneError(f"none of the {len(lines)} queries in {query_file} can be encoded; nothing written")
        click.echo(format_results(results, mode))
        total = sum(sum(r.timings_ms.values()) for r in results)
        click.echo(f"\n{len(results)} queries in {total:.1f} ms ({total / len(results):.2f} ms per query)")
        info = retriever.encoders.info
        if json_path:
            payload = {"engine": info.describe(), "bundle": str(bundle), "index": str(index_path), "mode": mode,
                       "rerank": {"enabled": rerank, **config.__dict__}, "results": [r.to_dict() for r in results]}
            write_text_atomically(json_path, json.dumps(payload, indent=2))
            click.echo(f"wrote {printable(json_path)}")
        if geojson_path:
            from galr.geo.geojson import write_hits_geojson

            write_hits_geojson(geojson_path, results)
            click.echo(f"wrote {printable(geojson_path)}")
        if html_path:
            from galr.runtime.report.html import write_contact_sheet

            subtitle = f"{info.describe()} · {len(index)} images · MR {'on' if rerank else 'off'}"
            write_contact_sheet(html_path, results, f"galr-run: {query_file.name}", subtitle, mode)
            click.echo(f"wrote {printable(html_path)}")


__all__ = ["main"]
