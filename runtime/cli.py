"""``galr-run``: answer queries from a file against a gallery index (torch-free)."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import click

from galr import paths
from galr.config import RerankConfig

EXIT_OK = 0
EXIT_INPUT = 2  # missing/unreadable/empty query file, bad bundle or index, index from another model
EXIT_BACKEND = 3  # the requested backend or device cannot run here

_EPILOG = """\b
Exit codes:
  0  results printed (and written with --json / --html)
  2  bad input: query file missing, empty or not UTF-8; bundle or index missing,
     corrupt or built with another model
  3  the requested backend/device is not available on this machine
"""


class QueryFileError(ValueError):
    """The query file cannot be used."""


def read_queries(path: Path) -> list[str]:
    """One query per line; blank lines and lines starting with ``#`` are ignored."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise QueryFileError(f"query file not found: {path}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise QueryFileError(f"{path} is not UTF-8 text (bad byte at line {line}); save it as UTF-8") from None
    queries = [line.strip() for line in text.splitlines()]
    queries = [q for q in queries if q and not q.startswith("#")]
    if not queries:
        raise QueryFileError(f"{path} has no queries (one per line; blank lines and # comments are ignored)")
    return queries


def format_results(results, mode: str) -> str:
    lines = []
    for number, result in enumerate(results, start=1):
        t = result.timings_ms
        timing = f"encode {t['encode']:.1f} ms, search {t['search']:.2f} ms"
        if result.reranked:
            timing += f", rerank {t['rerank']:.2f} ms"
        lines.append(f"\n[{number}] {result.query}   ({timing})")
        header = f"  {'rank':>4}  {'cosine':>7}  {'MR':>7}  {'image' if mode == 'text2image' else 'caption'}"
        lines.append(header)
        for hit in result.hits:
            mr = f"{hit.rerank_score:7.3f}" if hit.rerank_score is not None else f"{'-':>7}"
            extra = ""
            if hit.record and hit.record.get("width"):
                extra = f"  {hit.record['width']}x{hit.record['height']}"
            lines.append(f"  {hit.rank:>4}  {hit.score:7.3f}  {mr}  {hit.id}{extra}")
    return "\n".join(lines)


@click.command(epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "onnxruntime"]), default="auto", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "int8"]), default="auto", show_default=True)
@click.option("--k", "mr_k", type=int, default=RerankConfig.k, show_default=True, help="MR candidates (at least 10).")
@click.option("--wp1", type=float, default=RerankConfig.wp1, show_default=True, help="MR salience weight.")
@click.option("--wp2", type=float, default=RerankConfig.wp2, show_default=True, help="MR reverse-rank weight.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write results as JSON.")
@click.option("--html", "html_path", type=click.Path(path_type=Path), default=None,
              help="Also write a self-contained HTML contact sheet with thumbnails.")
def run_main(query_file, bundle, index_path, top_k, rerank, mode, detections, backend, device, precision, mr_k,
             wp1, wp2, json_path, html_path) -> None:
    """Search the gallery for every query in QUERY_FILE (one per line) and show the best images."""
    from galr.retrieval.rerank import MIN_CANDIDATES
    from galr.runtime.backends.device import BackendUnavailableError
    from galr.runtime.bundle import BundleError
    from galr.runtime.encoders import QueryError
    from galr.runtime.index import IndexFormatError, IndexModelMismatchError
    from galr.runtime.retriever import Retriever

    def fail(message: str, code: int) -> None:
        click.echo(f"galr-run: {message}", err=True)
        sys.exit(code)

    try:
        queries = read_queries(query_file)
    except QueryFileError as exc:
        fail(str(exc), EXIT_INPUT)
    if not bundle.is_file():
        fail(f"no bundle at {bundle}: make one with `galr-export` (after `galr-demo` for the demo model)", EXIT_INPUT)
    if not index_path.is_file():
        fail(f"no index at {index_path}: build one with `galr-index IMAGES --engine {bundle} -o {index_path}`", EXIT_INPUT)
    config = RerankConfig(k=max(mr_k, MIN_CANDIDATES), wp1=wp1, wp2=wp2)
    start = time.perf_counter()
    try:
        retriever = Retriever.open(bundle, index_path, backend=backend, device=device, precision=precision, rerank=config)
    except BackendUnavailableError as exc:
        fail(str(exc), EXIT_BACKEND)
    except (BundleError, IndexFormatError, IndexModelMismatchError, FileNotFoundError) as exc:
        fail(str(exc), EXIT_INPUT)
    load_ms = (time.perf_counter() - start) * 1e3
    with retriever:
        index = retriever.index
        click.echo(f"engine: {retriever.engine.info.describe()} · loaded in {load_ms:.0f} ms")
        click.echo(f"index:  {index_path} · {len(index)} images · text bank {len(index.text_bank_texts)} captions")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if mode == "text2image":
                    results = retriever.search_text(queries, top_k=top_k, rerank=rerank)
                else:
                    missing = [q for q in queries if not Path(q).is_file()]
                    if missing:
                        fail(f"image not found: {missing[0]} (image2text reads one image path per line)", EXIT_INPUT)
                    results = retriever.search_images(queries, local=str(detections) if detections else None,
                                                      top_k=top_k, rerank=rerank)
            except (QueryError, ValueError) as exc:
                fail(str(exc), EXIT_INPUT)
        for warning in {str(w.message) for w in caught}:
            click.echo(f"warning: {warning}", err=True)
        click.echo(format_results(results, mode))
        total = sum(sum(r.timings_ms.values()) for r in results)
        click.echo(f"\n{len(results)} queries in {total:.1f} ms ({total / len(results):.2f} ms per query)")
        info = retriever.engine.info
        if json_path:
            payload = {"engine": info.describe(), "bundle": str(bundle), "index": str(index_path), "mode": mode,
                       "rerank": {"enabled": rerank, **config.__dict__}, "results": [r.to_dict() for r in results]}
            json_path.write_text(json.dumps(payload, indent=2), encoding="utf-8")
            click.echo(f"wrote {json_path}")
        if html_path:
            from galr.runtime.html_report import write_contact_sheet

            subtitle = f"{info.describe()} · {len(index)} images · MR {'on' if rerank else 'off'}"
            write_contact_sheet(html_path, results, f"galr-run: {query_file.name}", subtitle, mode)
            click.echo(f"wrote {html_path}")
