"""``galr-export``: checkpoint -> ONNX graphs per precision -> gated, self-describing ``galr.plan``.

Order of work (each step must pass before anything is written):

1. load the checkpoint (galr's own, or the authors' with ``--vocab``) and its preprocessing spec;
2. export the four FP32 graphs; derive FP16 (precision in the graph), INT8 (explicit Q/DQ, for
   TensorRT) and INT8-CPU (u8/s8 integer kernels and an INT8-weight GRU loop, for ONNX Runtime's CPU
   provider) graphs when asked;
3. assemble the bundle **in memory** and serve it through the runtime exactly as a user would:
   each FP32 graph, and the image chain end to end, against PyTorch on real inputs (ONNX Runtime
   FP32: cosine >= 0.99999, max abs error <= 1e-4), then every precision's retrieval scores, FP16
   and INT8 gated against FP32 (cosine, and mR when a dataset is available); the INT8-CPU text
   graph is also gated alone (cosine >= 0.999 and the mR of FP32 images with its text embeddings);
4. add the reports to the manifest and write the bundle **once**, atomically, then build TensorRT
   engines into it when TensorRT and a GPU exist.
"""

from __future__ import annotations

import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import galr
from galr import graphs
from galr.bundle import (
    DETECTOR_MEMBER,
    Bundle,
    build_bundle,
    model_hash,
    onnx_member,
    write_bundle,
)
from galr.clock import utc_now
from galr.container import sha256_bytes
from galr.errors import InputError
from galr.export.onnx_export import ExportOptions, export_all
from galr.retrieval.parity import (
    FP16_GATE,
    FP32_GATE,
    INT8_GATE,
    ParityError,
    ParityGate,
    compare,
)

CPU_INT8 = "int8-cpu"
#: The INT8-CPU text graph (INT8 GRU weights) against the FP32 text graph.
CPU_TEXT_GATE = ParityGate(min_cosine=0.999)


@dataclass(frozen=True)
class ExportSettings:
    """What ``galr-export`` does.

    Attributes:
        checkpoint: galr checkpoint or an authors' ``.pth.tar``.
        output: the bundle to write.
        vocab: vocabulary JSON (required for authors' checkpoints).
        fp16: also export FP16 graphs.
        int8: also export INT8 (Q/DQ) graphs; needs calibration data (``dataset``).
        int8_cpu: also export the ``int8-cpu`` set for ONNX Runtime's CPU provider
            (:mod:`galr.calibration.int8.cpu`); needs calibration data (``dataset``). The runtime
            chooses it on ONNX Runtime's CPU provider by itself.
        dataset: a dataset root in the original layout (images, captions, detections) used for
            real parity inputs, FP16/INT8 mR gates and INT8 calibration. ``None`` = random inputs.
        split: the split of ``dataset`` used for the accuracy gates.
        calibration_split: the split used for INT8 calibration (never the gate split).
        calibration_method: ``minmax`` | ``entropy`` | ``percentile`` (default: ORT's entropy clips
            post-ReLU tensors hard and lost 0.016 cosine on the global graph; see calibration/int8.py).
        calibration_images: at most this many calibration images.
        parity_images: images (x5 captions) for the per-graph parity checks.
        gate_images: images (x5 captions) for the mR gates; ``0`` = the whole split.
        max_mr_drop_fp16: fail if FP16 mR is lower than FP32 by more than this.
        max_mr_drop_int8: fail if INT8 mR is lower than FP32 by more than this.
        max_mr_drop_int8_cpu: fail if INT8-CPU mR is lower than FP32 by more than this.
        max_mr_drop_cpu_text: fail if the INT8-CPU text graph alone (with FP32 image embeddings)
            loses more mR than this.
        cpu_text_kernel: how the INT8-CPU text graph stores its GRU weights
            (:data:`galr.calibration.int8.cpu_text.RECURRENT_KERNELS`).
        max_text_length: longest query in tokens (also the TensorRT text profile); ``None`` keeps the
            checkpoint's.
        tensorrt: ``"auto"`` (build engines when TensorRT and a GPU exist), ``"yes"`` (fail when they do
            not), ``"no"``.
        opset: ONNX opset.
        detector: an Ultralytics OBB detector ONNX stored in the bundle (checked first: metadata, output
            layout, classes that map to DREA categories); the runtime then uses it by default.
    """

    checkpoint: Path
    output: Path = Path("galr.plan")
    vocab: Path | None = None
    fp16: bool = False
    int8: bool = False
    int8_cpu: bool = False
    dataset: Path | None = None
    split: str = "test"
    calibration_split: str = "train"
    calibration_method: str = "percentile"
    calibration_images: int = 128
    parity_images: int = 16
    gate_images: int = 0
    max_mr_drop_fp16: float = 0.5
    max_mr_drop_int8: float = 1.0
    max_mr_drop_int8_cpu: float = 1.0
    max_mr_drop_cpu_text: float = 0.5
    cpu_text_kernel: str = "matmulnbits"
    max_text_length: int | None = None
    tensorrt: str = "auto"
    opset: int = 17
    detector: Path | None = None


@dataclass
class ExportReport:
    """What the export measured; stored in the manifest and printed by the CLI."""

    output: Path
    parity: dict[str, dict[str, Any]] = field(default_factory=dict)
    accuracy: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    calibration_int8_cpu: dict[str, Any] = field(default_factory=dict)
    engines: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inputs: str = ""


def _parity_inputs(settings: ExportSettings, loaded, spec, log) -> tuple[Any, str]:
    """Real inputs from the dataset when there is one, else random but well-formed inputs."""
    from galr.retrieval.evaluate import SplitInputs, load_split_inputs

    config = loaded.model.config
    if settings.dataset is not None:
        from galr.data import DatasetPaths, load_split
        paths = DatasetPaths.find(settings.dataset)
        split = load_split(settings.dataset, settings.split, image_dir=paths.images)
        log(f"reading {settings.split} split of {settings.dataset} ({len(split.image_names)} images)")
        inputs = load_split_inputs(split, spec, detections_dir=paths.detections, progress=True)
        return inputs, f"{settings.dataset} [{settings.split}]"
    rng = np.random.default_rng(0)
    n, s = settings.parity_images, config.image_size
    words = loaded.vocab.words()
    captions = tuple(" ".join(rng.choice(words, size=rng.integers(4, 12))) for _ in range(n * 5))
    adj = rng.random((n, config.num_objects, config.num_objects), dtype=np.float32) / config.num_objects
    inputs = SplitInputs(tuple(f"random_{i}" for i in range(n)), rng.standard_normal((n, 3, s, s), dtype=np.float32),
                         rng.random((n, config.num_objects, config.object_dim), dtype=np.float32), adj, captions)
    return inputs, "random images and DREA matrices, captions of random vocabulary words"


def _check_fp32_graphs(model, encoders, inputs, count: int) -> dict[str, dict]:
    """Each FP32 graph, as the runtime serves it, against the same PyTorch stage; then the whole chain."""
    import torch

    sub = inputs.subset(min(count, len(inputs.image_names)))
    tokens = encoders.tokenizer.encode_batch(list(sub.captions), warn=False).tokens
    t = torch.from_numpy
    with torch.no_grad():
        ref_global = model.encode_global(t(sub.images)).numpy()
        ref_local = model.encode_local(t(sub.local_rep), t(sub.local_adj)).numpy()
        ref_fused = model.fuse(t(ref_global), t(ref_local)).numpy()
        ref_text = model.encode_text(t(tokens)).numpy()
    run = {name: runner.infer for name, runner in encoders.runners.items()}
    onnx_global = run[graphs.GLOBAL]({graphs.IMAGE: sub.images})[graphs.GLOBAL_FEATURE]
    onnx_local = run[graphs.LOCAL]({graphs.LOCAL_REP: sub.local_rep, graphs.LOCAL_ADJ: sub.local_adj})[graphs.LOCAL_FEATURE]
    # Per graph: each fed the *reference* inputs, so one graph's error does not hide in another's.
    onnx_fused = run[graphs.FUSION]({graphs.GLOBAL_FEATURE: ref_global, graphs.LOCAL_FEATURE: ref_local})[graphs.IMAGE_EMBEDDING]
    onnx_text = run[graphs.TEXT]({graphs.TOKENS: tokens})[graphs.TEXT_EMBEDDING]
    chained = run[graphs.FUSION]({graphs.GLOBAL_FEATURE: onnx_global, graphs.LOCAL_FEATURE: onnx_local})[graphs.IMAGE_EMBEDDING]
    results = {
        graphs.GLOBAL: compare(ref_global, onnx_global), graphs.LOCAL: compare(ref_local, onnx_local),
        graphs.FUSION: compare(ref_fused, onnx_fused), graphs.TEXT: compare(ref_text, onnx_text),
        "image end-to-end": compare(ref_fused, chained),
    }
    for label, stats in results.items():
        FP32_GATE.check(stats, f"ONNX Runtime FP32 vs PyTorch, {label}")
    return {label: stats.to_dict() for label, stats in results.items()}


def _toolchain() -> dict[str, str]:
    versions = {"galr": galr.__version__, "python": platform.python_version()}
    for module in ("torch", "onnx", "onnxruntime", "numpy"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    return versions


def build_manifest(loaded, spec, checkpoint: Path, graph_bytes: dict[str, dict[str, bytes]], settings: ExportSettings,
                   report: ExportReport) -> dict[str, Any]:
    """The manifest: everything the runtime needs besides the graphs, and where they came from."""
    config = loaded.model.config
    io = graphs.graph_io(config)
    return {
        "created": utc_now(),
        "model": config.to_dict(),
        "model_hash": model_hash(graph_bytes["fp32"]),
        "embedding": {"dim": config.embed_dim, "l2_normalised": True, "similarity": "dot product = cosine"},
        "vocab": loaded.vocab.to_json_dict(),
        **spec.to_dict(),
        "graphs": {name: {"inputs": [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in spec.inputs],
                          "outputs": [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in spec.outputs]}
                   for name, spec in io.items()},
        "onnx": {precision: {name: onnx_member(precision, name) for name in members}
                 for precision, members in graph_bytes.items()},
        "onnx_sha256": {precision: {name: sha256_bytes(data) for name, data in members.items()}
                        for precision, members in graph_bytes.items()},
        "opset": settings.opset,
        "engines": [],
        "toolchain": _toolchain(),
        "provenance": {"checkpoint": str(checkpoint), "checkpoint_sha256": sha256_bytes(checkpoint.read_bytes()),
                       "checkpoint_format": loaded.source_format, "checkpoint_metadata": _plain(loaded.metadata)},
        "reports": _reports(report),
    }


def _reports(report: ExportReport) -> dict[str, Any]:
    return {"inputs": report.inputs, "parity": report.parity, "accuracy": report.accuracy,
            "calibration": report.calibration,
            **({"calibration_int8_cpu": report.calibration_int8_cpu} if report.calibration_int8_cpu else {})}


def _plain(value: Any) -> Any:
    """JSON-safe copy of checkpoint metadata (tensors and other objects become strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _accuracy_gates(bundle: Bundle, inputs, precisions: list[str], settings: ExportSettings, report: ExportReport,
                    log) -> None:
    """Evaluate every precision through the runtime exactly as it will serve, and gate FP16/INT8."""
    from galr.config import RerankConfig
    from galr.retrieval.evaluate import evaluate_encoder
    from galr.runtime.encoders import load_engine

    if settings.gate_images:
        inputs = inputs.subset(min(settings.gate_images, len(inputs.image_names)))
    results = {}
    for precision in precisions:
        log(f"scoring {precision} graphs on {len(inputs.image_names)} images / {len(inputs.captions)} captions")
        with load_engine(bundle, backend="onnxruntime", device="cpu", precision=precision, cpu_int8=False) as encoders:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[precision] = evaluate_encoder(encoders, inputs, RerankConfig())
    base = results["fp32"]
    max_drops = {"fp16": settings.max_mr_drop_fp16, "int8": settings.max_mr_drop_int8,
                 CPU_INT8: settings.max_mr_drop_int8_cpu}
    for precision, result in results.items():
        entry: dict[str, Any] = {"metrics": result.metrics.to_dict(), "metrics_rerank": result.metrics_rerank.to_dict()}
        if precision != "fp32":
            image_stats = compare(base.image_embeddings, result.image_embeddings)
            text_stats = compare(base.text_embeddings, result.text_embeddings)
            drop = base.metrics.mean_recall - result.metrics.mean_recall
            entry.update({"vs_fp32_image": image_stats.to_dict(), "vs_fp32_text": text_stats.to_dict(), "mr_drop": drop})
            gate, max_drop = (FP16_GATE, max_drops["fp16"]) if precision == "fp16" else (INT8_GATE, max_drops[precision])
            if precision == CPU_INT8:  # the text graph's own, stricter gate first: its failure names it
                entry["text_only"] = _cpu_text_gate(base, result, inputs.captions_per_image, settings)
            gate.check(image_stats, f"{precision} image embeddings vs FP32")
            gate.check(text_stats, f"{precision} text embeddings vs FP32")
            if settings.dataset is not None and drop > max_drop:
                raise ParityError(f"{precision} loses {drop:.2f} mR against FP32 (allowed {max_drop}); the export was not written")
        report.accuracy[precision] = entry


def _cpu_text_gate(base, result, captions_per_image: int, settings: ExportSettings) -> dict[str, Any]:
    """The INT8-CPU text graph alone: its embeddings against FP32 (cosine >= 0.999), and the mR of the
    FP32 image embeddings scored against them (at most ``max_mr_drop_cpu_text`` below FP32)."""
    from galr.retrieval.metrics import evaluate_similarity

    stats = compare(base.text_embeddings, result.text_embeddings)
    CPU_TEXT_GATE.check(stats, f"{CPU_INT8} text graph vs FP32")
    metrics = evaluate_similarity(base.image_embeddings @ result.text_embeddings.T, captions_per_image)
    drop = base.metrics.mean_recall - metrics.mean_recall
    if settings.dataset is not None and drop > settings.max_mr_drop_cpu_text:
        raise ParityError(f"the {CPU_INT8} text graph loses {drop:.2f} mR against FP32 with FP32 image embeddings "
                          f"(allowed {settings.max_mr_drop_cpu_text}); the export was not written")
    return {"vs_fp32_text": stats.to_dict(), "metrics": metrics.to_dict(), "mr_drop": drop}


def export_bundle(settings: ExportSettings, log: Callable[[str], None] = print) -> ExportReport:
    """Run the whole export; see the module docstring. Returns what was measured.

    Raises:
        ParityError: a gate failed (nothing was written; an existing bundle is untouched).
        CheckpointError, BundleError, NotFoundError: bad inputs.
    """
    from galr.calibration.fp16 import convert_to_fp16
    from galr.model import load_checkpoint
    from galr.runtime.encoders import load_engine

    report = ExportReport(settings.output)
    if settings.tensorrt == "yes":  # fail before minutes of export, not after
        from galr.export.engines import check_engine_build_possible

        check_engine_build_possible()
    loaded = load_checkpoint(settings.checkpoint, vocab=settings.vocab)
    spec = loaded.spec.with_max_text_length(settings.max_text_length)
    detector = _checked_detector(settings.detector, spec, log) if settings.detector is not None else None
    inputs, report.inputs = _parity_inputs(settings, loaded, spec, log)

    log(f"exporting 4 graphs (opset {settings.opset})")
    protos = export_all(loaded.model, ExportOptions(opset=settings.opset))
    graph_bytes: dict[str, dict[str, bytes]] = {"fp32": {n: p.SerializeToString() for n, p in protos.items()}}
    if settings.fp16:
        graph_bytes["fp16"] = {name: convert_to_fp16(proto).SerializeToString() for name, proto in protos.items()}
    if (settings.int8 or settings.int8_cpu) and settings.dataset is None:
        raise InputError("INT8 needs calibration data: pass --dataset (images with detections and captions)")
    if settings.int8:
        from galr.calibration.int8 import CalibrationSettings, quantize_bundle_graphs

        log(f"calibrating INT8 ({settings.calibration_method}) on the {settings.calibration_split} split")
        graph_bytes["int8"], report.calibration = quantize_bundle_graphs(
            graph_bytes["fp32"], loaded.vocab, spec,
            CalibrationSettings(dataset=settings.dataset, split=settings.calibration_split,
                                method=settings.calibration_method, max_images=settings.calibration_images,
                                evaluation_split=settings.split),
            log=log)
    if settings.int8_cpu:
        graph_bytes[CPU_INT8], report.calibration_int8_cpu = _cpu_int8_graphs(graph_bytes["fp32"], loaded.vocab,
                                                                              spec, settings, log)

    members = {onnx_member(p, n): data for p, graphs_ in graph_bytes.items() for n, data in graphs_.items()}
    manifest = build_manifest(loaded, spec, settings.checkpoint, graph_bytes, settings, report)
    if detector is not None:
        manifest["detector"], members[DETECTOR_MEMBER] = detector
    bundle = build_bundle(settings.output, manifest, members)
    with load_engine(bundle, backend="onnxruntime", device="cpu", precision="fp32") as encoders:
        report.parity["fp32"] = _check_fp32_graphs(loaded.model, encoders, inputs, settings.parity_images)
    log("ONNX Runtime FP32 matches PyTorch on every graph")
    _accuracy_gates(bundle, inputs, list(graph_bytes), settings, report, log)
    write_bundle(settings.output, {**manifest, "reports": _reports(report)}, members)
    size = settings.output.stat().st_size
    log(f"wrote {settings.output} ({size / 1e6:.1f} MB; precisions {', '.join(graph_bytes)})")
    _maybe_build_engines(settings, report, log)
    return report


def _checked_detector(path: Path, spec, log) -> tuple[dict[str, Any], bytes]:
    """The manifest entry and bytes of a detector to bundle, after the runtime has loaded it once."""
    from galr.errors import NotFoundError
    from galr.runtime.detector import describe, load_detector

    if not Path(path).is_file():
        raise NotFoundError(f"detector not found: {path}")
    data = Path(path).read_bytes()
    with load_detector(data, drea_classes=spec.drea.classes, name=Path(path).name) as detector:
        log(f"bundling the detector {describe(detector)}")
        entry = {"member": DETECTOR_MEMBER, "source": Path(path).name, "task": "obb",
                 "names": list(detector.info.names), "imgsz": list(detector.info.imgsz),
                 "drea_labels": list(detector.labels), "sha256": sha256_bytes(data)}
    return entry, data


def _cpu_int8_graphs(fp32: dict[str, bytes], vocab, spec, settings: ExportSettings, log) -> tuple[dict[str, bytes], dict]:
    from galr.calibration.int8 import CalibrationSettings
    from galr.calibration.int8.cpu import CpuInt8Settings, build_cpu_int8_graphs
    from galr.calibration.int8.cpu_text import CpuTextSettings

    log(f"building the int8-cpu set (ONNX Runtime CPU kernels) from the {settings.calibration_split} split")
    calibration = CalibrationSettings(dataset=settings.dataset, split=settings.calibration_split,
                                      max_images=settings.calibration_images, evaluation_split=settings.split)
    return build_cpu_int8_graphs(fp32, vocab, spec, calibration,
                                 CpuInt8Settings(text=CpuTextSettings(kernel=settings.cpu_text_kernel)), log=log)


def _maybe_build_engines(settings: ExportSettings, report: ExportReport, log) -> None:
    """Build TensorRT engines into the bundle when asked or when possible (``tensorrt='auto'``)."""
    if settings.tensorrt == "no":
        return
    from galr.export.engines import EngineBuildUnavailable, build_bundle_engines

    try:
        report.engines = [entry.to_dict() for entry in build_bundle_engines(settings.output, log=log)]
    except EngineBuildUnavailable as exc:
        if settings.tensorrt == "yes":
            raise
        report.notes.append(f"TensorRT engines not built: {exc}")
        log(f"TensorRT engines not built ({exc}); the bundle serves with ONNX Runtime. "
            f"On a GPU machine with TensorRT run: galr-build {settings.output}")
