"""Encoder benchmarks: latency and throughput per encoder and end to end, per backend and precision.

What is timed, for each backend (:data:`BACKENDS`):

==========  ==========================================================================================
encoder     one call
==========  ==========================================================================================
global      ResNet-18 + MVSA on preprocessed images ``[B, 3, S, S]``
local       the DREA GCN on ``local_rep [B, N, F]`` and ``local_adj [B, N, N]``
fusion      MIDF on unit global and local features ``[B, D]``
text        the skip-thought GRU on token ids ``[B, T]`` (``T = text_length``; at batch 1 every token
            is real, a ``T``-word query; at larger batches one row is half padding)
end-to-end  ``B`` query strings -> tokeniser -> text encoder -> exact top-``k`` search of a gallery of
            ``e2e_gallery`` unit embeddings (fp32, :class:`~galr.runtime.index.GalleryIndex`, no MR)
==========  ==========================================================================================

Batch 1 is reported as latency (p50/p95/p99 per call); batches in ``batch_sizes`` as throughput
(items/s). Each row also has ``speedup_vs_onnxruntime_fp32``, the same ratio against the ONNX Runtime
FP32 row of the same run (how the ``int8-cpu`` set's goals are stated).

Besides the rows: ``query_profile``, one end-to-end query split into its stages (tokenise, text
encoder, search, the rest) per ONNX Runtime backend, and ``startup``, the wall time of a whole
``galr-run`` process answering one query from the benchmark bundle (:func:`measure_startup`). Every backend of one (encoder, batch) is measured interleaved with PyTorch eager, and the
``speedup_vs_eager`` of a row is computed against the eager row of *the same run*: eager median
p50 / backend median p50 for latency, backend median items/s / eager median items/s for throughput
(above 1 = faster than the reference).

The model has random weights (:func:`prepare_model`): speed does not depend on the weight values.
Its ONNX graphs are exported with :func:`galr.export.onnx_export.export_all` and calibrated to INT8
with :func:`galr.calibration.int8.quantize_bundle_graphs` on random in-memory inputs (calibration
ranges change accuracy, not speed), then written as an ordinary ``galr.plan`` bundle, so the runtime
serves it through the same code as a trained model (:func:`galr.runtime.encoders.load_engine`).
TensorRT rows run through ``load_engine(..., backend="tensorrt")`` and engines built into that bundle;
where TensorRT or a GPU is missing they are recorded as not run, never estimated.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from galr import graphs
from galr.bench.harness import (
    STATUS_OK,
    Case,
    Log,
    TimingSettings,
    not_run,
    ratio,
    run_interleaved,
    stopwatch,
)
from galr.config import GaLRConfig
from galr.errors import InputError

REFERENCE = "pytorch-eager"
ORT_FP32 = "onnxruntime-fp32"
ORT_CPU_INT8 = "onnxruntime-int8-cpu"
BACKENDS: tuple[str, ...] = (REFERENCE, ORT_FP32, "onnxruntime-int8", ORT_CPU_INT8, "tensorrt-fp16", "tensorrt-int8")
BACKEND_LABELS: dict[str, str] = {
    REFERENCE: "PyTorch eager (FP32)",
    ORT_FP32: "ONNX Runtime FP32",
    "onnxruntime-int8": "ONNX Runtime INT8 (Q/DQ, TensorRT's set)",
    ORT_CPU_INT8: "ONNX Runtime INT8-CPU (u8/s8 kernels, INT8 GRU)",
    "tensorrt-fp16": "TensorRT FP16",
    "tensorrt-int8": "TensorRT INT8",
}
END_TO_END = "end-to-end"
ENCODER_NAMES: tuple[str, ...] = (*graphs.GRAPH_NAMES, END_TO_END)


@dataclass(frozen=True)
class EncoderBenchSettings:
    """What the encoder section measures.

    Attributes:
        config: model dimensions (the full-size default for real numbers).
        batch_sizes: batches measured for throughput; batch 1 is always measured for latency.
        text_length: tokens per caption/query.
        threads: torch intra-op threads and ONNX Runtime ``intra_op_num_threads``.
        e2e_gallery: gallery size of the end-to-end search.
        top_k: results per end-to-end query.
        latency: timing of batch-1 latency cases.
        throughput: timing of throughput cases (calls of large batches take seconds: fewer per run).
        calibration_images: random images INT8 ranges are collected on.
        seed: seed of the random weights and inputs.
        startup_runs: ``galr-run`` processes timed per precision (:func:`measure_startup`).
    """

    config: GaLRConfig = field(default_factory=GaLRConfig)
    batch_sizes: tuple[int, ...] = (8, 32, 128)
    text_length: int = 16
    threads: int = 2
    e2e_gallery: int = 10_000
    top_k: int = 10
    latency: TimingSettings = TimingSettings(warmup=2, repeats=5, min_iterations=5, max_iterations=200)
    throughput: TimingSettings = TimingSettings(warmup=1, repeats=3, min_iterations=1, max_iterations=50)
    calibration_images: int = 8
    seed: int = 0
    startup_runs: int = 3

    def __post_init__(self) -> None:
        if any(b < 2 for b in self.batch_sizes):
            raise InputError(f"batch_sizes are throughput batches and must be >= 2, got {list(self.batch_sizes)}")
        if self.text_length < 1 or self.threads < 1 or self.e2e_gallery < self.top_k or self.top_k < 1:
            raise InputError("text_length, threads and top_k must be >= 1 and e2e_gallery >= top_k")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["config"] = self.config.to_dict()
        values["latency"] = self.latency.to_dict()
        values["throughput"] = self.throughput.to_dict()
        return values


@dataclass
class BenchModel:
    """A random-weight model with its bundle, shared by the encoder and gallery sections.

    Attributes:
        model: the PyTorch model (eval mode, CPU): the reference implementation.
        vocab: its synthetic vocabulary (``w1 .. wN`` and ``<unk>``).
        bundle: the ``galr.plan`` written from it.
        precisions: precisions in the bundle.
        int8_error: why the INT8 graphs could not be made (``None`` when they were).
        setup_seconds: export, calibration and bundle time.
        int8_cpu_error: why the ``int8-cpu`` graphs could not be made (``None`` when they were).
    """

    model: Any
    vocab: Any
    bundle: Path
    precisions: tuple[str, ...]
    int8_error: str | None
    setup_seconds: float
    int8_cpu_error: str | None = None


def synthetic_vocabulary(size: int) -> Any:
    """A vocabulary of ``size`` ids: ``size - 1`` words ``w1 ..`` and ``<unk>`` last (as the original)."""
    from galr.preprocess.text import Vocabulary

    return Vocabulary.from_words([f"w{i}" for i in range(1, size)])


def random_inputs(config: GaLRConfig, images: int, seed: int, vocab: Any) -> Any:
    """Random, well-formed :class:`~galr.retrieval.evaluate.SplitInputs` (for INT8 calibration)."""
    from galr.retrieval.evaluate import SplitInputs

    rng = np.random.default_rng(seed)
    n, s, objects = images, config.image_size, config.num_objects
    words = [w for w in vocab.words() if w != "<unk>"]
    captions = tuple(" ".join(rng.choice(words, size=int(rng.integers(4, 16)))) for _ in range(n * 5))
    return SplitInputs(
        tuple(f"random_{i}" for i in range(n)), rng.standard_normal((n, 3, s, s), dtype=np.float32),
        rng.random((n, objects, config.object_dim), dtype=np.float32),
        rng.random((n, objects, objects), dtype=np.float32) / objects, captions)


def prepare_model(config: GaLRConfig, work_dir: Path, *, fp16: bool, calibration_images: int, seed: int,
                  log: Log) -> BenchModel:
    """Build a random-weight model and write it as a bundle with FP32, INT8 and (``fp16``) FP16 graphs.

    Args:
        config: model dimensions.
        work_dir: where the checkpoint and the bundle are written.
        fp16: also write FP16 graphs (TensorRT's FP16 engines are built from them).
        calibration_images: random images for the INT8 ranges (min/max method: quick, and ranges do
            not change speed).
        seed: seed of the weights and the calibration inputs.
        log: progress messages.

    Returns:
        The model and its bundle. When INT8 calibration fails, the bundle has no INT8 graphs and
        :attr:`BenchModel.int8_error` says why.
    """
    import torch

    from galr.bundle import onnx_member, write_bundle
    from galr.calibration.fp16 import convert_to_fp16
    from galr.calibration.int8 import (
        CalibrationError,
        CalibrationSettings,
        quantize_bundle_graphs,
    )
    from galr.export.onnx_export import export_all
    from galr.export.pipeline import ExportReport, ExportSettings, build_manifest
    from galr.model import GaLR
    from galr.model.checkpoint import LoadedCheckpoint, save_checkpoint

    elapsed = stopwatch()
    torch.manual_seed(seed)
    model = GaLR(config).eval()
    vocab = synthetic_vocabulary(config.vocab_size)
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = save_checkpoint(work_dir / "random.pt", model, vocab, metadata={"purpose": "benchmark, random weights"})
    parameters = sum(p.numel() for p in model.parameters())
    log(f"exporting the random-weight model's 4 graphs ({parameters / 1e6:.1f} M parameters)")
    protos = export_all(model)
    graph_bytes: dict[str, dict[str, bytes]] = {"fp32": {name: p.SerializeToString() for name, p in protos.items()}}
    if fp16:
        graph_bytes["fp16"] = {name: convert_to_fp16(proto).SerializeToString() for name, proto in protos.items()}
    loaded = LoadedCheckpoint(model, vocab, "galr")
    int8_error = None
    log(f"calibrating INT8 on {calibration_images} random images (minmax)")
    try:
        settings = CalibrationSettings(method="minmax", max_images=calibration_images, batch_size=calibration_images,
                                       seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph_bytes["int8"], _ = quantize_bundle_graphs(graph_bytes["fp32"], vocab, loaded.spec, settings,
                                                            log=lambda _: None,
                                                            inputs=random_inputs(config, calibration_images, seed, vocab))
    except CalibrationError as exc:
        int8_error = f"INT8 calibration failed: {exc}"
        log(int8_error)
    int8_cpu_error = None
    log("building the int8-cpu set (ONNX Runtime CPU kernels) on the same random inputs")
    try:
        from galr.calibration.int8.cpu import build_cpu_int8_graphs

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph_bytes["int8-cpu"], _ = build_cpu_int8_graphs(
                graph_bytes["fp32"], vocab, loaded.spec, settings, log=lambda _: None,
                inputs=random_inputs(config, calibration_images, seed, vocab))
    except CalibrationError as exc:
        int8_cpu_error = f"int8-cpu graphs failed: {exc}"
        log(int8_cpu_error)
    bundle = work_dir / "random.plan"
    report = ExportReport(bundle, inputs="random weights; INT8 ranges from random inputs (benchmark only)")
    export_settings = ExportSettings(checkpoint=checkpoint, output=bundle)
    manifest = build_manifest(loaded, loaded.spec, checkpoint, graph_bytes, export_settings, report)
    members = {onnx_member(p, n): data for p, by_name in graph_bytes.items() for n, data in by_name.items()}
    write_bundle(bundle, manifest, members)
    return BenchModel(model, vocab, bundle, tuple(graph_bytes), int8_error, elapsed(), int8_cpu_error)


def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT rows cannot run here (``"TensorRT not installed / no GPU"``), or ``None``."""
    from galr.runtime.backends.device import probe_gpu, probe_tensorrt

    missing = []
    if probe_tensorrt() is None:
        missing.append("TensorRT not installed")
    if probe_gpu() is None:
        missing.append("no GPU")
    return " / ".join(missing) or None


def build_tensorrt_engines(bench: BenchModel, max_batch: int, log: Log) -> None:
    """Build FP16/INT8 TensorRT engines into the bundle (GPU machines only)."""
    from galr.export.engines import build_bundle_engines

    precisions = [p for p in ("fp16", "int8") if p in bench.precisions]
    build_bundle_engines(bench.bundle, precisions=precisions, max_batch=max_batch, log=log)


# ---------------------------------------------------------------------------------------------
# Callables per backend


InferFn = Callable[[dict[str, np.ndarray]], Any]


def _numpy_feeds(config: GaLRConfig, batch: int, text_length: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    from galr.export.onnx_export import example_inputs

    feeds = example_inputs(config, batch=batch, text_length=text_length, seed=seed)
    out = {name: {k: v.numpy() for k, v in by_input.items()} for name, by_input in feeds.items()}
    if batch == 1:
        # example_inputs pads half of row 0 (for tracing); a batch-1 query of T words has no padding,
        # and the int8-cpu text graph would otherwise run only the T/2 real steps.
        rng = np.random.default_rng(seed)
        out[graphs.TEXT][graphs.TOKENS] = rng.integers(1, config.vocab_size + 1, (1, text_length), dtype=np.int64)
    return out


def _eager_graphs(model: Any) -> dict[str, InferFn]:
    """The reference: each graph's PyTorch stage under ``no_grad``, numpy in and out."""
    import torch

    def wrap(stage: Callable[..., Any], names: list[str]) -> InferFn:
        def infer(feeds: dict[str, np.ndarray]) -> np.ndarray:
            with torch.no_grad():
                return stage(*(torch.from_numpy(feeds[n]) for n in names)).numpy()
        return infer

    io = graphs.graph_io(model.config)
    stages = {graphs.GLOBAL: model.encode_global, graphs.LOCAL: model.encode_local, graphs.FUSION: model.fuse,
              graphs.TEXT: model.encode_text}
    return {name: wrap(stage, io[name].input_names) for name, stage in stages.items()}


def _onnxruntime_options(threads: int) -> Any:
    from galr.runtime.backends.onnxruntime import OnnxRuntimeOptions

    return OnnxRuntimeOptions(intra_op_threads=threads)


def open_backend(bench: BenchModel, backend: str, threads: int) -> Any:
    """The :class:`~galr.runtime.encoders.Encoders` of one non-reference backend (one session per graph;
    the encoder rows time ``encoders.runners`` directly). Close them when done."""
    from galr.runtime.encoders import load_engine

    kind, precision = backend.split("-", 1)
    # cpu_int8=False: each row runs exactly the set it names (the int8 row is the Q/DQ set).
    return load_engine(bench.bundle, backend=kind, device="cpu" if kind == "onnxruntime" else "cuda",
                       precision=precision, options=[_onnxruntime_options(threads)], cpu_int8=False)


def _random_unit_rows(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def e2e_index(model_hash: str, dim: int, size: int, seed: int) -> Any:
    """A fp32 gallery of ``size`` random unit embeddings (the end-to-end search target)."""
    from galr.runtime.index import GalleryIndex, ImageRecord

    index = GalleryIndex(model_hash, dim, "fp32")
    records = [ImageRecord(f"image_{i:07d}", "", 0, 0) for i in range(size)]
    index.add(records, _random_unit_rows(size, dim, np.random.default_rng(seed)))
    return index


def synthetic_queries(vocab: Any, count: int, words: int, seed: int) -> list[str]:
    """``count`` queries of ``words`` in-vocabulary words each."""
    rng = np.random.default_rng(seed)
    choices = [w for w in vocab.words() if w != "<unk>"]
    return [" ".join(rng.choice(choices, size=words)) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# The section


@dataclass
class _Backend:
    name: str
    graphs: dict[str, InferFn]
    search_text: Callable[[list[str]], Any]
    close: Callable[[], None]
    encoders: Any = None


def _reference_backend(bench: BenchModel, index: Any, top_k: int) -> _Backend:
    import torch

    from galr.preprocess.text import Tokenizer

    tokenizer = Tokenizer(bench.vocab)

    def search_text(queries: list[str]) -> Any:
        tokens = torch.from_numpy(tokenizer.encode_batch(queries).tokens)
        with torch.no_grad():
            embedded = bench.model.encode_text(tokens).numpy()
        return index.search(embedded, k=top_k, device="cpu")

    return _Backend(REFERENCE, _eager_graphs(bench.model), search_text, lambda: None)


def _runtime_backend(bench: BenchModel, name: str, threads: int, index: Any, top_k: int) -> _Backend:
    encoders = open_backend(bench, name, threads)
    graphs_by_name = {graph: runner.infer for graph, runner in encoders.runners.items()}
    return _Backend(name, graphs_by_name, lambda queries: index.search(encoders.encode_text(queries), k=top_k,
                                                                       device="cpu"), encoders.close, encoders)


def _unavailable_backends(bench: BenchModel, tensorrt_reason: str | None) -> dict[str, str]:
    reasons: dict[str, str] = {}
    if "int8" not in bench.precisions:
        reasons["onnxruntime-int8"] = bench.int8_error or "no INT8 graphs in the bundle"
    if "int8-cpu" not in bench.precisions:
        reasons[ORT_CPU_INT8] = bench.int8_cpu_error or "no int8-cpu graphs in the bundle"
    for name in ("tensorrt-fp16", "tensorrt-int8"):
        if tensorrt_reason is not None:
            reasons[name] = tensorrt_reason
        elif name.split("-")[1] not in bench.precisions:
            reasons[name] = f"no {name.split('-')[1].upper()} graphs in the bundle"
    return reasons


def _cases_for(backends: list[_Backend], encoder: str, batch: int, feeds: dict[str, dict[str, np.ndarray]],
               queries: list[str]) -> dict[str, Case]:
    cases = {}
    for backend in backends:
        if encoder == END_TO_END:
            call = functools.partial(backend.search_text, queries[:batch])
        else:
            call = functools.partial(backend.graphs[encoder], feeds[encoder])
        cases[backend.name] = Case(call, batch)
    return cases


def _rows_for(encoder: str, batch: int, measured: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of one (encoder, batch) with each backend's speed-up over the eager row of this run."""
    rows = []
    latency = batch == 1
    reference = measured[REFERENCE]
    ort_fp32 = measured.get(ORT_FP32)
    for name, measurement in measured.items():
        row: dict[str, Any] = {"encoder": encoder, "backend": name, "batch": batch, "status": STATUS_OK,
                               "kind": "latency" if latency else "throughput"}
        if latency:
            row["latency_ms"] = measurement.latency_ms()
            row["speedup_vs_eager"] = ratio(reference.latency_ms()["p50"]["median"], row["latency_ms"]["p50"]["median"])
            if ort_fp32 is not None:
                row["speedup_vs_onnxruntime_fp32"] = ratio(ort_fp32.latency_ms()["p50"]["median"],
                                                           row["latency_ms"]["p50"]["median"])
        else:
            row["items_per_s"] = measurement.throughput()
            row["speedup_vs_eager"] = ratio(row["items_per_s"]["median"], reference.throughput()["median"])
            if ort_fp32 is not None:
                row["speedup_vs_onnxruntime_fp32"] = ratio(row["items_per_s"]["median"],
                                                           ort_fp32.throughput()["median"])
        rows.append(row)
    return rows


def run_encoder_benchmarks(bench: BenchModel, settings: EncoderBenchSettings, log: Log) -> dict[str, Any]:
    """Measure every encoder and the end-to-end query path on every backend available here.

    Args:
        bench: the model and bundle (:func:`prepare_model`).
        settings: batches, timing and threads.
        log: progress messages.

    Returns:
        The ``encoders`` section: ``rows`` (one per encoder x backend x batch, latency or throughput,
        with ``speedup_vs_eager``), ``backends`` (what ran, or why not) and the settings.
    """
    elapsed = stopwatch()
    tensorrt_reason = tensorrt_unavailable_reason()
    if tensorrt_reason is None:
        log("building TensorRT engines into the benchmark bundle")
        build_tensorrt_engines(bench, max(settings.batch_sizes), log)
    unavailable = _unavailable_backends(bench, tensorrt_reason)
    config = settings.config
    index = e2e_index(read_model_hash(bench.bundle), config.embed_dim, settings.e2e_gallery, settings.seed)
    backends = [_reference_backend(bench, index, settings.top_k)]
    backends += [_runtime_backend(bench, name, settings.threads, index, settings.top_k)
                 for name in BACKENDS[1:] if name not in unavailable]
    queries = synthetic_queries(bench.vocab, max(settings.batch_sizes), settings.text_length, settings.seed)
    rows: list[dict[str, Any]] = []
    try:
        for batch in (1, *settings.batch_sizes):
            feeds = _numpy_feeds(config, batch, settings.text_length, settings.seed)
            timing = settings.latency if batch == 1 else settings.throughput
            for encoder in ENCODER_NAMES:
                log(f"{encoder} at batch {batch}")
                measured = run_interleaved(_cases_for(backends, encoder, batch, feeds, queries), timing, log)
                rows.extend(_rows_for(encoder, batch, measured))
        profiles = [query_profile(b.name, b.encoders, index, queries[0], settings.top_k, settings.latency)
                    for b in backends if b.encoders is not None and b.name.startswith("onnxruntime")]
        log("galr-run startup, a whole process per call")
        startup = measure_startup(bench, index, queries[0], settings.startup_runs)
    finally:
        for backend in backends:
            backend.close()
    return {
        "status": STATUS_OK,
        "settings": settings.to_dict(),
        "model": "random weights (speed does not depend on them)",
        "e2e": f"{settings.text_length}-word queries -> tokeniser -> text encoder -> exact top-{settings.top_k} "
               f"search of {settings.e2e_gallery} fp32 embeddings (no MR)",
        "backends": [{"name": name, "label": BACKEND_LABELS[name],
                      **(not_run(unavailable[name]) if name in unavailable else {"status": STATUS_OK})}
                     for name in BACKENDS],
        "rows": rows,
        "query_profile": profiles,
        "startup": startup,
        "seconds": round(elapsed() + bench.setup_seconds, 1),
        "setup_seconds": round(bench.setup_seconds, 1),
    }


QUERY_STAGES: tuple[str, ...] = ("tokenise", "text encoder", "search", "other")


def query_profile(name: str, encoders: Any, index: Any, query: str, top_k: int,
                  timing: TimingSettings) -> dict[str, Any]:
    """One end-to-end query (as ``search_text`` runs it) split into stages, on one backend.

    Each call times the tokeniser (``encode_batch``, once, as ``encode_text`` runs it), the text
    graph (``encode_tokens``), the exact search, and the whole
    ``index.search(encoders.encode_text(...))``; ``other`` is the whole minus the three stages (query
    checks, warnings machinery, Python glue, result lists). Medians over every timed call, in ms.
    """
    def one() -> dict[str, float]:
        t0 = time_now()
        tokens = encoders.tokenizer.encode_batch([query], warn=False).tokens
        t1 = time_now()
        embedded = encoders.encode_tokens(tokens)
        t2 = time_now()
        index.search(embedded, k=top_k, device="cpu")
        t3 = time_now()
        index.search(encoders.encode_text([query]), k=top_k, device="cpu")
        t4 = time_now()
        return {"tokenise": t1 - t0, "text encoder": t2 - t1, "search": t3 - t2, "total": t4 - t3}

    for _ in range(max(1, timing.warmup)):
        one()
    calls = [one() for _ in range(max(timing.min_iterations, 10) * timing.repeats)]
    medians = {key: float(np.median([c[key] for c in calls])) * 1e3 for key in calls[0]}
    medians["other"] = max(0.0, medians["total"] - medians["tokenise"] - medians["text encoder"] - medians["search"])
    return {"backend": name, "calls": len(calls), "ms": medians}


def time_now() -> float:
    import time

    return time.perf_counter()


def measure_startup(bench: BenchModel, index: Any, query: str, runs: int) -> list[dict[str, Any]]:
    """Wall seconds of whole ``galr-run`` processes answering one query from the benchmark bundle.

    The gallery is ``index`` saved beside the bundle (no text bank, so ``--no-rerank``); each
    precision (``auto``, which picks ``int8-cpu`` on the CPU when the bundle has it, and ``fp32``)
    is run ``runs`` times, interleaved, as a user would start it (interpreter, imports, bundle,
    sessions, index, one query, the table). Returns one entry per precision with every time.
    """
    import os
    import subprocess
    import sys
    import tempfile
    import time

    if runs < 1:
        return []
    with tempfile.TemporaryDirectory(prefix="galr-startup-") as work:
        index_path, query_path = Path(work) / "gallery.gidx", Path(work) / "query.txt"
        index.save(index_path)
        query_path.write_text(query + "\n", encoding="utf-8")
        script = Path(sys.executable).parent / "galr-run"  # the installed command, as a user starts it
        command = [str(script)] if script.is_file() else [sys.executable, "-c",
                                                          "from galr.console import galr_run; galr_run()"]
        times: dict[str, list[float]] = {"auto": [], "fp32": []}
        chosen: dict[str, str] = {}
        for _ in range(runs):
            for precision in times:
                args = [*command, str(query_path), "--engine", str(bench.bundle), "--index", str(index_path),
                        "--no-rerank", "--backend", "onnxruntime", "--device", "cpu", "--precision", precision]
                start = time.perf_counter()
                done = subprocess.run(args, capture_output=True, text=True, env={**os.environ}, check=False)
                times[precision].append(time.perf_counter() - start)
                if done.returncode != 0:
                    return [{"precision": precision, "status": "failed",
                             "reason": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}]
                chosen[precision] = next((line for line in done.stdout.splitlines() if line.startswith("engine:")), "")[:200]
    return [{"precision": p, "status": STATUS_OK, "seconds": t, "median_s": float(np.median(t)), "runs": len(t),
             "info": chosen.get(p, "")} for p, t in times.items()]


def read_model_hash(bundle_path: Path) -> str:
    from galr.bundle import read_bundle

    return read_bundle(bundle_path).model_hash


__all__ = [
    "BACKENDS",
    "BACKEND_LABELS",
    "ORT_CPU_INT8",
    "ORT_FP32",
    "QUERY_STAGES",
    "ENCODER_NAMES",
    "END_TO_END",
    "REFERENCE",
    "BenchModel",
    "EncoderBenchSettings",
    "e2e_index",
    "measure_startup",
    "query_profile",
    "open_backend",
    "prepare_model",
    "random_inputs",
    "read_model_hash",
    "run_encoder_benchmarks",
    "synthetic_queries",
    "synthetic_vocabulary",
    "tensorrt_unavailable_reason",
]
