"""``galr-bench``: measure every backend and precision in one run, write JSON and ``BENCHMARKS.md``.

>>> galr-bench -o bench/results.json --markdown BENCHMARKS.md      # doctest: +SKIP  (full, ~10 min)
>>> galr-bench --quick -o /tmp/quick.json                          # doctest: +SKIP  (CI, < 1 min)

Sections (``--only`` picks some): ``limits`` (analytic costs, machine peaks), ``rerank`` (batched MR
vs the original loop), ``gallery`` (index build, search, memory), ``encoders`` (latency and
throughput per encoder and backend), ``accuracy`` (the trained demo model at every precision) and
``bounds`` (peak memory of many queries and of large or hostile images). They run in that order, so
the machine peaks are measured before any inference session exists.

Quick mode uses a tiny model (:meth:`GaLRConfig.small`), one thread, a 10k gallery, the RSITMD-sized MR
only and few repeats; it skips accuracy unless ``--checkpoint`` is given. Its numbers check that the
benchmark runs, they are not performance figures.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from galr import paths
from galr.atomic import write_text_atomically
from galr.console import GalrCommand
from galr.errors import GateError, InputError, NotFoundError

#: The sections in the order they run (the report orders them its own way).
SECTIONS: tuple[str, ...] = ("limits", "rerank", "gallery", "encoders", "accuracy", "bounds", "serve", "geo", "detector")
DEFAULT_OUTPUT = Path("bench/results.json")
_BLAS_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class BenchOptions:
    """One ``galr-bench`` run.

    Attributes:
        output: the JSON result file.
        markdown: where to render ``BENCHMARKS.md`` (``None`` = do not render).
        quick: the CI mode (see the module docstring).
        sections: sections to run (default: all of :data:`SECTIONS`).
        threads: torch and ONNX Runtime intra-op threads, and the BLAS threads of the search processes
            (``None``: every usable core in full mode, 1 in quick mode).
        checkpoint: trained model for the accuracy section (``None``: ``galr-demo/model.pt`` in full mode,
            skip in quick mode).
        dataset: benchmark folder for the accuracy section (``None``: ``galr-demo/benchmark``).
        seed: seed of every random input.
        note: free text shown under the machine description (e.g. why the thread count was chosen).
        approximate: results of ``python -m galr.bench.approximate`` (JSON files, e.g. one at 10^6 and
            one at 10^7 vectors) to include in the approximate-search section; those runs take minutes per
            million vectors, so they are their own command.
        soak_minutes: run the serving soak test for this long after the load steps (0: not run; it
            is a benchmark of its own: memory under steady load, minutes of machine time).
        work_dir: where the benchmark model and bundle are written (``None``: a temporary folder).
    """

    output: Path = DEFAULT_OUTPUT
    markdown: Path | None = None
    quick: bool = False
    sections: tuple[str, ...] = SECTIONS
    threads: int | None = None
    checkpoint: Path | None = None
    dataset: Path | None = None
    seed: int = 0
    note: str | None = None
    approximate: tuple[Path, ...] = ()
    soak_minutes: float = 0.0
    work_dir: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sections) - set(SECTIONS))
        if unknown:
            raise InputError(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be >= 1, got {self.threads}")
        if self.soak_minutes < 0:
            raise InputError(f"soak_minutes must be 0 or more, got {self.soak_minutes}")

    @property
    def resolved_threads(self) -> int:
        if self.threads is not None:
            return self.threads
        if self.quick:
            return 1
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 1

    def command_line(self) -> str:
        """The ``galr-bench`` command that reproduces this run."""
        args = ["galr-bench"]
        if self.quick:
            args.append("--quick")
        args += ["-o", str(self.output)]
        if self.markdown is not None:
            args += ["--markdown", str(self.markdown)]
        if tuple(self.sections) != SECTIONS:
            for name in self.sections:
                args += ["--only", name]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        for flag, value in (("--checkpoint", self.checkpoint), ("--dataset", self.dataset)):
            if value is not None:
                args += [flag, str(value)]
        if self.seed:
            args += ["--seed", str(self.seed)]
        if self.note:
            args += ["--note", self.note]
        for path in self.approximate:
            args += ["--approximate", str(path)]
        if self.soak_minutes:
            args += ["--soak-minutes", f"{self.soak_minutes:g}"]
        return shlex.join(args)


def _settings(options: BenchOptions, threads: int) -> dict[str, Any]:
    """Per-section settings of the mode, built on first use (the bench modules import numpy)."""
    from galr.bench.bounds import BoundsSettings
    from galr.bench.detector import DetectorBenchSettings
    from galr.bench.encoders import EncoderBenchSettings
    from galr.bench.gallery import GallerySettings
    from galr.bench.geo import GeoBenchSettings
    from galr.bench.harness import TimingSettings
    from galr.bench.limits import PeakSettings
    from galr.bench.rerank import RerankBenchSettings
    from galr.bench.serve import ServeBenchSettings
    from galr.config import GaLRConfig

    seed = options.seed
    if not options.quick:
        return {
            "encoders": EncoderBenchSettings(threads=threads, seed=seed),
            "gallery": GallerySettings(threads=threads, seed=seed, ray_images=512),
            "rerank": RerankBenchSettings(seed=seed),
            "limits": PeakSettings(),
            "bounds": BoundsSettings(seed=seed),
            "serve": ServeBenchSettings(soak_minutes=options.soak_minutes, seed=seed),
            "geo": GeoBenchSettings(seed=seed),
            "detector": DetectorBenchSettings(seed=seed),
        }
    fast = TimingSettings(warmup=2, repeats=3, min_iterations=2, max_iterations=10, target_seconds=0.05)
    return {
        "encoders": EncoderBenchSettings(config=GaLRConfig.small(), batch_sizes=(8,), threads=threads, e2e_gallery=2000,
                                         latency=fast, throughput=fast.with_iterations(1, 5), calibration_images=4,
                                         seed=seed),
        "gallery": GallerySettings(sizes=(10_000,), build_images=8, build_batch=8, threads=threads, seed=seed,
                                   timing=fast.with_iterations(1, 10)),
        "rerank": RerankBenchSettings(sizes=("RSITMD test",), seed=seed, reference_runs=1,
                                      timing=TimingSettings(warmup=1, repeats=3, min_iterations=1, max_iterations=1)),
        "limits": PeakSettings(matmul_size=512, stream_bytes=32 * 2**20, timing=fast.with_iterations(1, 5)),
        "bounds": BoundsSettings(query_counts=(10, 100), text_bank=300, gallery=100, tiff_side=512, tiff_bands=16,
                                 png_side=1200, png_count=2, seed=seed),
        "serve": ServeBenchSettings(clients=(1, 4), requests_per_client=5, gallery=500, text_bank=50, ray_replicas=0,
                                    soak_minutes=options.soak_minutes, soak_sample_s=2.0, seed=seed),
        "geo": GeoBenchSettings(throughput_side=512, tile=64, batch=8, memory_sides=(256, 512),
                                memory_locate_scales=(128, 256), locate_side=512, locate_scales=(64, 128),
                                locate_queries=3, filter_gallery=5_000, filter_queries=3, seed=seed),
        "detector": DetectorBenchSettings(imgsz=256, width=8, images=4, repeats=2, seed=seed),
    }


def _accuracy_paths(options: BenchOptions) -> tuple[Path, Path] | None:
    """(checkpoint, dataset) for the accuracy section, or ``None`` when quick mode skips it."""
    if options.checkpoint is None and options.quick:
        return None
    return (options.checkpoint or paths.DEFAULT_CHECKPOINT, options.dataset or paths.DEFAULT_BENCHMARK)


def _limit_threads(threads: int) -> str:
    """Set torch's threads and, if numpy is not loaded yet, the BLAS threads; say what BLAS got."""
    numpy_loaded = "numpy" in sys.modules
    for name in _BLAS_VARIABLES:
        os.environ[name] = str(threads)  # also inherited by the gallery's search processes
    import torch

    torch.set_num_threads(threads)
    if numpy_loaded:
        return "library default (numpy was loaded before galr-bench could set it)"
    # galr.console sets the timeout for every command; shown because it changes end-to-end latency.
    timeout = os.environ.get("OPENBLAS_THREAD_TIMEOUT", "unset (OpenBLAS default 28)")
    return f"{threads} (OPENBLAS/OMP/MKL_NUM_THREADS), OPENBLAS_THREAD_TIMEOUT {timeout}"


def run_benchmarks(options: BenchOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """Run the selected sections and write the JSON (and the Markdown when asked).

    Args:
        options: what to run and where to write.
        log: progress messages.

    Returns:
        The result document (as written to ``options.output``).
    """
    threads = options.resolved_threads
    blas_threads = _limit_threads(threads)
    from galr.bench import harness
    from galr.bench.accuracy import run_accuracy
    from galr.bench.bounds import run_bounds_benchmarks
    from galr.bench.detector import run_detector_benchmarks
    from galr.bench.encoders import (
        prepare_model,
        run_encoder_benchmarks,
        tensorrt_unavailable_reason,
    )
    from galr.bench.gallery import run_gallery_benchmarks
    from galr.bench.geo import run_geo_benchmarks
    from galr.bench.limits import attach_fractions, run_limits
    from galr.bench.report import render_markdown
    from galr.bench.rerank import run_rerank_benchmarks
    from galr.bench.serve import run_serve_benchmarks

    elapsed = harness.stopwatch()
    approximate = [_approximate_results(path) for path in options.approximate]
    settings = _settings(options, threads)
    encoder_settings = settings["encoders"]
    summary = {name: value.to_dict() for name, value in settings.items()}
    summary.update({"threads": threads, "blas_threads": blas_threads, "sections": list(options.sections),
                    "seed": options.seed})
    results = harness.new_results("quick" if options.quick else "full", harness.machine_description(threads), summary,
                                  options.command_line())
    if options.note:
        results["note"] = options.note
    sections = results["sections"]
    wanted = set(options.sections)
    if "limits" in wanted:
        log("limits: analytic costs and machine peaks")
        sections["limits"] = run_limits(encoder_settings.config, encoder_settings.text_length,
                                        encoder_settings.e2e_gallery, (1, *encoder_settings.batch_sizes),
                                        settings["limits"], log)
    if "rerank" in wanted:
        sections["rerank"] = run_rerank_benchmarks(settings["rerank"], log)
    with tempfile.TemporaryDirectory(prefix="galr-bench-") as scratch:
        bench = None
        if wanted & {"encoders", "gallery", "bounds", "serve", "geo", "detector"}:
            log("preparing the random-weight benchmark model and its bundle")
            bench = prepare_model(encoder_settings.config, Path(options.work_dir or scratch),
                                  fp16=tensorrt_unavailable_reason() is None,
                                  calibration_images=encoder_settings.calibration_images, seed=options.seed, log=log)
        if "gallery" in wanted:
            sections["gallery"] = run_gallery_benchmarks(bench, settings["gallery"], log)
        if "encoders" in wanted:
            sections["encoders"] = run_encoder_benchmarks(bench, encoder_settings, log)
        if "bounds" in wanted:
            sections["bounds"] = run_bounds_benchmarks(bench, settings["bounds"], log)
        if "serve" in wanted:
            sections["serve"] = run_serve_benchmarks(bench, settings["serve"], log)
        if "geo" in wanted:
            sections["geo"] = run_geo_benchmarks(bench, settings["geo"], log)
        if "detector" in wanted:
            sections["detector"] = run_detector_benchmarks(bench, settings["detector"], log)
    if "accuracy" in wanted:
        chosen = _accuracy_paths(options)
        sections["accuracy"] = (run_accuracy(*chosen, log) if chosen is not None else harness.not_run(
            "quick mode: pass --checkpoint (and --dataset) to score a trained model"))
    attach_fractions(sections["limits"], sections["encoders"])
    if approximate:
        results["approximate"] = approximate
    results["machine"]["load_average_end"] = harness.load_average()
    results["seconds"] = round(elapsed(), 1)
    if options.markdown is not None:
        results["markdown_command"] = f"galr-bench --render {shlex.quote(str(options.output))} --markdown " \
                                      f"{shlex.quote(str(options.markdown))}"
    harness.write_results(options.output, results)
    log(f"wrote {options.output}")
    if options.markdown is not None:
        write_text_atomically(options.markdown, render_markdown(harness.load_results(options.output)))
        log(f"wrote {options.markdown}")
    return results


def _approximate_results(path: Path) -> dict[str, Any]:
    """The JSON of a ``galr.bench.approximate`` run, checked enough to render."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file; make it with `python -m galr.bench.approximate --gallery "
                            f"gallery.gidx -o {path}`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a galr.bench.approximate result ({exc})") from None
    if not isinstance(data, dict) or not {"settings", "fit", "models"} <= data.keys():
        raise InputError(f"{path}: not a galr.bench.approximate result (expected settings, fit and models)")
    return data


def mr_mismatches(results: dict[str, Any]) -> list[str]:
    """Rows of the rerank section whose batched output differs from the original's."""
    section = results["sections"]["rerank"]
    if section.get("status") != "ok":
        return []
    return [f"{row['size']} {row['direction']} (max abs diff {row['max_abs_diff']})"
            for row in section["rows"] if not row["equal"]]


def _stderr_log() -> Callable[[str], None]:
    start = time.perf_counter()
    return lambda message: click.echo(f"[{time.perf_counter() - start:7.1f} s] {message}", err=True)


_EPILOG = """\b
When the batched MR's outputs differ from the original algorithm's, the results are still
written and the command exits with the gate code (4).
"""


@click.command("galr-bench", cls=GalrCommand, epilog=_EPILOG)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_OUTPUT,
              show_default=True, help="JSON result file.")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also render the results as Markdown here (e.g. BENCHMARKS.md).")
@click.option("--quick", is_flag=True, help="CI mode: tiny model, small sizes, few repeats (well under a minute).")
@click.option("--only", "sections", type=click.Choice(SECTIONS), multiple=True,
              help="Run only these sections (repeatable). Default: all.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads for torch, ONNX Runtime and BLAS. Default: all usable cores (1 with --quick).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Trained model for the accuracy section. Default: {paths.DEFAULT_CHECKPOINT} (skipped with --quick).")
@click.option("--dataset", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Benchmark folder for the accuracy section. Default: {paths.DEFAULT_BENCHMARK}.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random input.")
@click.option("--note", default=None, help="Free text shown under the machine description in the Markdown.")
@click.option("--approximate", type=click.Path(dir_okay=False, path_type=Path), multiple=True,
              help="Include this result JSON of `python -m galr.bench.approximate` (approximate search at scale; "
                   "repeatable, e.g. a 10^6 and a 10^7 run).")
@click.option("--soak-minutes", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Also run the serving soak test this long (memory and errors under steady load).")
@click.option("--render", "render_from", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Measure nothing: render --markdown from this existing result JSON.")
def main(output: Path, markdown: Path | None, quick: bool, sections: tuple[str, ...], threads: int | None,
         checkpoint: Path | None, dataset: Path | None, seed: int, note: str | None, approximate: tuple[Path, ...],
         soak_minutes: float, render_from: Path | None) -> None:
    """Benchmark GaLR's encoders, gallery search, MR rerank, accuracy and the machine's limits."""
    if render_from is not None:
        from galr.bench.harness import load_results
        from galr.bench.report import render_markdown

        if markdown is None:
            raise click.UsageError("--render needs --markdown (where to write the Markdown)")
        results = load_results(render_from)
        write_text_atomically(markdown, render_markdown(results))
        click.echo(f"wrote {markdown}")
        return
    options = BenchOptions(output=output, markdown=markdown, quick=quick, sections=tuple(sections) or SECTIONS,
                           threads=threads, checkpoint=checkpoint, dataset=dataset, seed=seed, note=note,
                           approximate=approximate, soak_minutes=soak_minutes)
    results = run_benchmarks(options, _stderr_log())
    mismatches = mr_mismatches(results)
    if mismatches:
        raise GateError("MR outputs differ from the original algorithm (results written): " + "; ".join(mismatches))


__all__ = ["SECTIONS", "BenchOptions", "main", "mr_mismatches", "run_benchmarks"]
