"""Accuracy on the synthetic benchmark: mR and R@1/5/10 for PyTorch, ONNX FP32, FP16 and INT8, with and without MR.

The ONNX rows come from a real export: :func:`galr.export.pipeline.export_bundle` writes FP32, FP16
and INT8 graphs of the trained checkpoint into a temporary bundle, calibrating INT8 on the dataset's
train split, and scores every precision on the test split through the runtime (ONNX Runtime CPU),
with and without MR; its report is read here as it is. The export's mR-drop gates are opened wide
(:data:`GATE_WIDE_OPEN`) so a precision that loses accuracy is *measured* rather than refused; its
cosine gates still apply, and a failure is reported as the reason the section did not run.

The PyTorch row scores the checkpoint itself with :func:`galr.torch_encoder.evaluate_checkpoint` on
the same split (CPU), through the same evaluation code.
"""

from __future__ import annotations

import importlib.util
import tempfile
import warnings
from pathlib import Path
from typing import Any

from galr.bench.harness import STATUS_OK, Log, not_run, stopwatch

#: mR drop allowed by the export gates during the benchmark: large enough never to refuse.
GATE_WIDE_OPEN = 100.0
PRECISION_LABELS = {"fp32": "ONNX Runtime FP32", "fp16": "ONNX Runtime FP16", "int8": "ONNX Runtime INT8"}
TORCH_LABEL = "PyTorch (eager)"


def _metrics_row(label: str, metrics: dict[str, Any], reranked: dict[str, Any] | None) -> dict[str, Any]:
    return {"model": label, "status": STATUS_OK, "metrics": metrics, "metrics_rerank": reranked}


def _torch_row(checkpoint: Path, dataset: Path, log: Log) -> dict[str, Any]:
    if importlib.util.find_spec("galr.torch_encoder") is None:
        return {"model": TORCH_LABEL, **not_run("galr.torch_encoder is not available in this galr")}
    from galr.torch_encoder import evaluate_checkpoint

    log(f"scoring the PyTorch model on {dataset} [test]")
    report = evaluate_checkpoint(checkpoint, dataset, "test", device="cpu")
    return _metrics_row(TORCH_LABEL, report["metrics"], report["metrics_rerank"])


def run_accuracy(checkpoint: Path, dataset: Path, log: Log) -> dict[str, Any]:
    """The ``accuracy`` section for a trained checkpoint and a dataset in the original layout.

    Args:
        checkpoint: the trained model (e.g. ``galr-demo/model.pt``).
        dataset: the benchmark folder (e.g. ``galr-demo/benchmark``).
        log: progress messages.

    Returns:
        ``rows`` (PyTorch, ONNX FP32/FP16/INT8), each with ``metrics`` and ``metrics_rerank``, or a
        not-run section naming the missing file or the failed step.
    """
    if not Path(checkpoint).is_file():
        return not_run(f"no trained model at {checkpoint}")
    if not Path(dataset).is_dir():
        return not_run(f"no benchmark dataset at {dataset}")
    from galr.errors import GalrError
    from galr.export.pipeline import ExportSettings, export_bundle

    elapsed = stopwatch()
    with tempfile.TemporaryDirectory(prefix="galr-bench-accuracy-") as work:
        settings = ExportSettings(checkpoint=Path(checkpoint), output=Path(work) / "accuracy.plan", fp16=True, int8=True,
                                  dataset=Path(dataset), tensorrt="no", max_mr_drop_fp16=GATE_WIDE_OPEN,
                                  max_mr_drop_int8=GATE_WIDE_OPEN)
        log(f"exporting {checkpoint} at FP32/FP16/INT8 and scoring each on {dataset} [test]")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = export_bundle(settings, log=lambda message: log(f"  {message}"))
        except (GalrError, OSError) as exc:
            return not_run(f"export of {checkpoint} failed: {exc}")
    rows = [_torch_row(Path(checkpoint), Path(dataset), log)]
    for precision in ("fp32", "fp16", "int8"):
        entry = report.accuracy.get(precision)
        if entry is None:
            rows.append({"model": PRECISION_LABELS[precision], **not_run("the export did not score this precision")})
            continue
        rows.append(_metrics_row(PRECISION_LABELS[precision], entry["metrics"], entry.get("metrics_rerank")))
    return {"status": STATUS_OK, "checkpoint": str(checkpoint), "dataset": str(dataset), "split": "test",
            "inputs": report.inputs, "calibration_method": settings.calibration_method, "rows": rows,
            "drea_inputs": drea_input_rows(Path(checkpoint), Path(dataset), log), "seconds": round(elapsed(), 1)}


#: What a detector is worth: the DREA input sources compared (folder under the dataset, or None = no detections).
DREA_SOURCES: tuple[tuple[str, str | None], ...] = (
    ("ground-truth boxes (detections_gt)", "detections_gt"),
    ("noisy synthetic detector (detections)", "detections"),
    ("no detections (all-zero DREA input)", None),
)


def drea_input_rows(checkpoint: Path, dataset: Path, log: Log) -> list[dict[str, Any]]:
    """The checkpoint scored on the test split with each DREA source of :data:`DREA_SOURCES` (PyTorch, CPU)."""
    if importlib.util.find_spec("galr.torch_encoder") is None:
        return []
    from galr.torch_encoder import evaluate_checkpoint

    rows = []
    with tempfile.TemporaryDirectory(prefix="galr-bench-nodets-") as empty:
        for label, folder in DREA_SOURCES:
            source = Path(empty) if folder is None else dataset / folder
            if not source.is_dir():
                rows.append({"model": label, **not_run(f"no {source}")})
                continue
            log(f"scoring {checkpoint} with DREA input: {label}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the no-detection fallback warns once per image
                report = evaluate_checkpoint(checkpoint, dataset, "test", detections_dir=source, device="cpu")
            rows.append(_metrics_row(label, report["metrics"], report["metrics_rerank"]))
    return rows


__all__ = ["DREA_SOURCES", "GATE_WIDE_OPEN", "drea_input_rows", "run_accuracy"]
