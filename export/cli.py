"""Command-line entry points ``galr-export`` and ``galr-build`` (parsing only; work is in the library)."""

from __future__ import annotations

from pathlib import Path

import click

from galr import paths
from galr.console import GalrCommand
from galr.errors import NotFoundError


def _format_report(report) -> str:
    lines = [f"inputs: {report.inputs}", "", "parity, ONNX Runtime FP32 vs PyTorch (gate: cosine >= 0.99999, max abs <= 1e-4)"]
    for label, stats in report.parity.get("fp32", {}).items():
        lines.append(f"  {label:<18} min cosine {stats['min_cosine']:.8f}   max abs {stats['max_abs_error']:.2e}   rows {stats['rows']}")
    lines += ["", f"{'precision':<10}{'mR':>8}{'mR+MR':>9}{'R@1 i2t':>9}{'R@1 t2i':>9}{'img cos>=':>11}{'txt cos>=':>11}{'mR drop':>9}"]
    for precision, entry in report.accuracy.items():
        m, r = entry["metrics"], entry["metrics_rerank"]
        image = entry.get("vs_fp32_image", {}).get("min_cosine")
        text = entry.get("vs_fp32_text", {}).get("min_cosine")
        drop = entry.get("mr_drop")
        lines.append(
            f"{precision:<10}{m['mean_recall']:>8.2f}{r['mean_recall']:>9.2f}{m['i2t_r1']:>9.2f}{m['t2i_r1']:>9.2f}"
            f"{'' if image is None else f'{image:.6f}':>11}{'' if text is None else f'{text:.6f}':>11}"
            f"{'' if drop is None else f'{drop:+.2f}':>9}"
        )
    if report.calibration:
        c = report.calibration
        lines += ["", f"INT8 calibration: {c.get('method')} on {c.get('images')} images, quantised graphs {c.get('quantized_graphs')}"]
    if report.calibration_int8_cpu:
        c = report.calibration_int8_cpu
        kernels = {name: graph.get("integer_kernels") for name, graph in c.get("graphs", {}).items()}
        lines += [f"INT8-CPU set: {c.get('settings', {}).get('method')} ranges on {c.get('images')} images, "
                  f"quantised graphs {c.get('quantized_graphs')}, integer kernels after ORT's optimiser {kernels}"]
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


@click.command("galr-export", cls=GalrCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(path_type=Path), default=paths.DEFAULT_CHECKPOINT, show_default=True,
              help="galr checkpoint, or an authors' .pth.tar (then also --vocab).")
@click.option("--vocab", type=click.Path(path_type=Path), default=None, help="Vocabulary JSON of an authors' checkpoint.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=paths.DEFAULT_BUNDLE, show_default=True)
@click.option("--fp16", is_flag=True, help="Also export FP16 graphs (precision inside the ONNX, FP32 I/O).")
@click.option("--int8", is_flag=True, help="Also export INT8 Q/DQ graphs calibrated on --dataset.")
@click.option("--int8-cpu", "int8_cpu", is_flag=True,
              help="Also export the int8-cpu set for ONNX Runtime's CPU provider (u8/s8 integer kernels, the GRU as a "
                   "loop over INT8 weights), calibrated on --dataset; galr-run then uses it on the CPU by itself.")
@click.option("--dataset", type=click.Path(path_type=Path), default=None,
              help=f"Dataset root (original layout) for real parity inputs, accuracy gates and INT8 calibration "
                   f"[default: {paths.DEFAULT_BENCHMARK} when it exists].")
@click.option("--split", default="test", show_default=True, help="Split used for the accuracy gates.")
@click.option("--calibration-split", default="train", show_default=True)
@click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="percentile", show_default=True)
@click.option("--calibration-images", type=int, default=128, show_default=True)
@click.option("--gate-images", type=int, default=0, show_default=True, help="Images for the mR gates (0 = whole split).")
@click.option("--max-text-length", type=click.IntRange(min=1), default=None,
              help="Longest query, in tokens  [default: the checkpoint's]")
@click.option("--detector", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Store this Ultralytics oriented-box detector ONNX in the bundle; galr-index, galr-run, "
                   "galr-locate and galr-serve then use it for the DREA input by default.")
@click.option("--tensorrt", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Build TensorRT engines: auto = when TensorRT and a GPU are present; yes = fail otherwise.")
def main(checkpoint, vocab, output, fp16, int8, int8_cpu, dataset, split, calibration_split, calibration_method,
         calibration_images, gate_images, max_text_length, detector, tensorrt) -> None:
    """Export a trained GaLR to a gated, self-describing galr.plan bundle.

    With no arguments it exports the demo model made by `galr-demo`; `galr-export --fp16` adds
    FP16 graphs. Every graph is checked against PyTorch before anything is written.
    """
    from galr.export.pipeline import ExportSettings, export_bundle

    if not checkpoint.is_file():
        hint = "run `galr-demo` first to train the demo model, or " if checkpoint == paths.DEFAULT_CHECKPOINT else ""
        raise NotFoundError(f"no checkpoint at {checkpoint}: {hint}pass --checkpoint PATH")
    if dataset is None and paths.DEFAULT_BENCHMARK.is_dir() and checkpoint == paths.DEFAULT_CHECKPOINT:
        dataset = paths.DEFAULT_BENCHMARK
    if dataset is not None and not dataset.is_dir():
        raise NotFoundError(f"dataset folder not found: {dataset}")
    settings = ExportSettings(checkpoint=checkpoint, output=output, vocab=vocab, fp16=fp16, int8=int8, int8_cpu=int8_cpu,
                              dataset=dataset,
                              split=split, calibration_split=calibration_split, calibration_method=calibration_method,
                              calibration_images=calibration_images, gate_images=gate_images,
                              max_text_length=max_text_length, tensorrt=tensorrt, detector=detector)
    log = lambda message: click.echo(f"[galr-export] {message}", err=True)  # noqa: E731
    report = export_bundle(settings, log=log)
    click.echo(_format_report(report))
    click.echo(f"\nwrote {output}. Next: galr-index IMAGES --engine {output} -o {paths.DEFAULT_INDEX}   then   "
               f"galr-run {paths.DEFAULT_QUERIES} --engine {output}")


@click.command("galr-build", cls=GalrCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(path_type=Path), default=paths.DEFAULT_BUNDLE)
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp32", "fp16", "int8"]),
              help="Precisions to build (default: every precision in the bundle).")
@click.option("--max-batch", type=int, default=32, show_default=True, help="Largest batch of the optimisation profiles.")
@click.option("--workspace-gb", type=float, default=2.0, show_default=True)
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None, help="Timing cache file (per GPU and TensorRT version).")
def build_main(bundle, precisions, max_batch, workspace_gb, timing_cache) -> None:
    """Compile BUNDLE's ONNX graphs into TensorRT engines for this GPU and store them in the bundle."""
    from galr.export.engines import EngineBuildUnavailable, build_bundle_engines

    log = lambda message: click.echo(f"[galr-build] {message}", err=True)  # noqa: E731
    try:
        entries = build_bundle_engines(bundle, list(precisions) or None, max_batch=max_batch,
                                       workspace_bytes=int(workspace_gb * (1 << 30)), timing_cache=timing_cache, log=log)
    except EngineBuildUnavailable as exc:
        raise EngineBuildUnavailable(f"cannot build TensorRT engines here: {exc}. The bundle is unchanged and still "
                                     "serves with ONNX Runtime.") from None
    for entry in entries:
        click.echo(f"built {entry.key_string} on {entry.gpu}")
