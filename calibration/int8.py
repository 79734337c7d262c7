"""INT8 post-training quantisation: FP32 ONNX -> explicit Q/DQ ONNX that TensorRT 10/11 and ORT CPU accept.

TensorRT 11 removed implicit INT8 calibration; INT8 must be explicit ``QuantizeLinear`` /
``DequantizeLinear`` (Q/DQ) pairs in the ONNX (deployment notes §1.4). This module produces them
with ONNX Runtime's ``quantize_static`` (QDQ format) under TensorRT's rules:

* INT8 activations and weights, symmetric (``ActivationSymmetric``/``WeightSymmetric``): every zero
  point is 0, which TensorRT's parser requires ("Non-zero zero point is not supported").
* Per-channel weights (``per_channel``), biases left in FP32 (TensorRT quantises biases itself;
  an INT32 bias behind a ``DequantizeLinear`` is rejected by its parser).
* Q/DQ only on the inputs of compute ops (``Conv``, ``Gemm``, ``MatMul`` by default), never on their
  outputs or on element-wise ops, reductions and normalisations (ORT places them far more liberally,
  §2.4). A pass after ``quantize_static`` re-attaches non-compute consumers of a quantised tensor to the
  FP32 tensor, and :func:`verify_qdq` proves the result: zero points 0, INT8 types, positive scales,
  ``Q -> DQ -> compute op`` only.
* Excluded: the final L2-normalisation of every graph (found by walking back from the graph output)
  and the numerically sensitive nodes listed in :func:`sensitive_nodes`.

Calibration ranges are collected once per (graph, calibration set, method) with ORT's calibrators and
cached as JSON under ``cache_dir``; ``quantize_static`` then always reads them from a range file
(``calibration_cache_path``), so it never re-runs calibration itself. ``quant_pre_process`` is not
used: the exported graphs are already constant-folded and simplified (onnxslim), and its ORT graph
rewrites would rename nodes without helping TensorRT.

The text graph's GRU is not quantised by TensorRT or by ORT's Q/DQ tools, so the INT8 set keeps the
FP32 text graph unless ``quantize_text`` is set (which then quantises only its output ``Gemm``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from galr import graphs
from galr.calibration.readers import (
    FeedReader,
    calibration_set_hash,
    graph_readers,
    load_calibration_inputs,
    select_calibration_inputs,
)
from galr.export.parity import compare
from galr.retrieval.evaluate import SplitInputs
from galr.atomic import write_bytes_atomically
from galr.serialization import fields_from_dict

if TYPE_CHECKING:
    from galr.model.checkpoint import LoadedCheckpoint

# Our names -> ORT's CalibrationMethod members.
METHODS: dict[str, str] = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
# Ops TensorRT runs in INT8 from explicit Q/DQ and that carry the model's compute.
COMPUTE_OPS: frozenset[str] = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
DEFAULT_OP_TYPES: tuple[str, ...] = ("Conv", "Gemm", "MatMul")
QUANTIZABLE_GRAPHS: tuple[str, ...] = (graphs.GLOBAL, graphs.LOCAL, graphs.FUSION)

_CACHE_FORMAT = "galr-int8-ranges"
_CACHE_VERSION = 1
# Batches per ORT collect_data call: bounds the intermediate tensors it keeps in memory.
_BATCHES_PER_COLLECT = 4
_LATENCY_BATCH = 8
# Ops an output L2-normalisation is built from (x / max(||x||, eps), or x / (||x|| + eps)).
_NORMALISATION_OPS = frozenset({"Div", "Pow", "Mul", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Sqrt", "Add",
                                "Clip", "Max", "Expand", "Reciprocal", "Unsqueeze"})


class CalibrationError(ValueError):
    """INT8 calibration cannot run (bad settings, no data, old ONNX Runtime) or made a graph TensorRT rejects."""


@dataclass(frozen=True)
class CalibrationSettings:
    """How INT8 graphs are calibrated and quantised.

    Attributes:
        dataset: dataset root (original layout) to calibrate on; ``None`` when inputs are given in memory.
        split: the split calibrated on ("train": never calibrate on the split the accuracy gates score).
        method: ``"percentile"`` | ``"minmax"`` | ``"entropy"``. ORT's entropy search clips
            post-ReLU tensors hard (their zeros sit in the centre bin of its symmetric histogram:
            a half-normal is cut at 2.5 sigma, 0.6% of values), which cost cosine on the random
            full-size global graph (0.984 vs 0.9998 for percentile and minmax); hence the default.
        percentile: the percentile of ``|x|`` kept by the ``percentile`` method.
        histogram_bins: histogram bins of the ``entropy`` and ``percentile`` methods. ORT's entropy
            search is quadratic in it (about 0.15 / 0.6 / 1.7 s per tensor at 256 / 1024 / 2048 bins).
        max_images: at most this many images (a seeded choice when the split has more).
        batch_size: images (or captions) per calibration batch.
        seed: seed of the image choice.
        quantize_text: also quantise the text graph (only its ``Gemm``: the GRU stays FP32 in every tool);
            by default the INT8 set carries the FP32 text graph.
        per_channel: per-output-channel weight scales.
        op_types: op types that get Q/DQ on their inputs (a subset of :data:`COMPUTE_OPS`).
        exclude_nodes: more node names to keep in FP32.
        cache_dir: where calibration ranges are cached; ``None`` = no cache.
        evaluation_split: the split the accuracy gates score; calibrating on it is refused.
        latency_runs: timed runs per graph for the report's ORT CPU latency (0 = not measured).
    """

    dataset: Path | None = None
    split: str = "train"
    method: str = "percentile"
    percentile: float = 99.99
    histogram_bins: int = 1024
    max_images: int = 128
    batch_size: int = 8
    seed: int = 0
    quantize_text: bool = False
    per_channel: bool = True
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    exclude_nodes: tuple[str, ...] = ()
    cache_dir: Path | None = None
    evaluation_split: str = "test"
    latency_runs: int = 5

    def __post_init__(self) -> None:
        for name in ("dataset", "cache_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "op_types", tuple(self.op_types))
        object.__setattr__(self, "exclude_nodes", tuple(self.exclude_nodes))
        if self.method not in METHODS:
            raise CalibrationError(f"unknown calibration method {self.method!r}; use one of {sorted(METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise CalibrationError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.histogram_bins < 256:
            raise CalibrationError(f"histogram_bins must be at least 256 (2 x the 128 INT8 levels), got {self.histogram_bins}")
        if self.max_images < 1 or self.batch_size < 1:
            raise CalibrationError(f"max_images ({self.max_images}) and batch_size ({self.batch_size}) must be at least 1")
        bad_ops = sorted(set(self.op_types) - COMPUTE_OPS)
        if not self.op_types or bad_ops:
            raise CalibrationError(f"op_types must be a non-empty subset of {sorted(COMPUTE_OPS)} "
                                   f"(Q/DQ belongs on compute ops only), got {list(self.op_types)}")
        if self.split == self.evaluation_split:
            raise CalibrationError(f"refusing to calibrate on {self.split!r}: it is the split the accuracy gates "
                                   "score; calibrate on a training split (e.g. --calibration-split train)")
        if self.latency_runs < 0:
            raise CalibrationError(f"latency_runs must be >= 0, got {self.latency_runs}")

    @property
    def method_tag(self) -> str:
        """The method with what changes its ranges, as it enters hashes, caches and metadata."""
        if self.method == "percentile":
            return f"percentile({self.percentile:g}, bins={self.histogram_bins})"
        if self.method == "entropy":
            return f"entropy(bins={self.histogram_bins})"
        return self.method

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        for name in ("dataset", "cache_dir"):
            values[name] = None if values[name] is None else str(values[name])
        values["op_types"] = list(self.op_types)
        values["exclude_nodes"] = list(self.exclude_nodes)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CalibrationSettings":
        """Inverse of :meth:`to_dict`; unknown keys are an error so a newer file is never half-read."""
        try:
            return cls(**fields_from_dict(cls, values))
        except ValueError as error:
            raise CalibrationError(str(error)) from None


@dataclass(frozen=True)
class QdqSummary:
    """What :func:`verify_qdq` counted in a checked graph."""

    activation_pairs: int
    weight_dequantizers: int
    quantized_nodes: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Graph analysis: what to exclude, how to clean up, how to verify
# ---------------------------------------------------------------------------------------------


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output if output}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
    return consumers


def _ancestors(tensor: str, producers: Mapping[str, onnx.NodeProto], allowed: frozenset[str] | None = None,
               stop: str | None = None) -> dict[str, onnx.NodeProto]:
    """Nodes upstream of ``tensor`` (by name), not crossing ``stop`` nor nodes outside ``allowed`` op types."""
    found: dict[str, onnx.NodeProto] = {}
    pending = [tensor]
    while pending:
        name = pending.pop()
        node = producers.get(name)
        if name == stop or node is None or node.name in found or (allowed is not None and node.op_type not in allowed):
            continue
        found[node.name] = node
        pending.extend(node.input)
    return found


def output_normalisation_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes of each graph output's L2-normalisation, found by walking back from the output.

    For ``y = x / d(x)`` (``d`` = norm, clamp, eps...) these are the ``Div`` and every node between
    ``x`` and the divisor; an output made by ``LpNormalization`` is that node. Outputs not computed
    that way contribute nothing.
    """
    graph = model.graph
    producers = _producers(graph)
    names: list[str] = []
    for output in graph.output:
        node = producers.get(output.name)
        if node is None:
            continue
        if node.op_type == "LpNormalization":
            names.append(node.name)
        elif node.op_type == "Div" and len(node.input) == 2:
            numerator, divisor = node.input
            # The divisor's chain, stopping at the numerator: Pow/ReduceSum/Sqrt/Add(eps) or ReduceL2/Clip/Expand.
            chain = _ancestors(divisor, producers, allowed=_NORMALISATION_OPS, stop=numerator)
            reaches_numerator = any(numerator in n.input for n in chain.values())
            if reaches_numerator:
                names.append(node.name)
                names.extend(n for n in chain if n not in names)
    return names


def sensitive_nodes(model: onnx.ModelProto, op_types: Sequence[str]) -> list[str]:
    """Compute nodes kept in FP32 because INT8 inputs there hurt accuracy more than they save time.

    * Products of two activations (``MatMul`` without a constant operand): the GCN's adjacency
      product, whose inputs are small, skewed graph weights that one symmetric INT8 scale resolves
      badly, and attention-score products that feed a ``Softmax``.
    * Compute nodes whose output reaches a ``Softmax`` through element-wise ops only: softmax
      logits (MIDF's dynamic fusion weights) decide the mix of the two branches.
    """
    graph = model.graph
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    consumers = _consumers(graph)
    passthrough = {"Add", "Sub", "Mul", "Div", "Reshape", "Transpose", "Squeeze", "Unsqueeze"}

    def feeds_softmax(tensor: str, depth: int = 0) -> bool:
        for consumer in consumers.get(tensor, []):
            if consumer.op_type == "Softmax":
                return True
            if consumer.op_type in passthrough and depth < 4 and any(feeds_softmax(o, depth + 1) for o in consumer.output):
                return True
        return False

    names = []
    for node in graph.node:
        if node.op_type not in op_types:
            continue
        two_activations = node.op_type == "MatMul" and not any(i in constants for i in node.input)
        if two_activations or feeds_softmax(node.output[0]):
            names.append(node.name)
    return names


def _constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    tensors = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = node.attribute[0].t
    return tensors


def _detach_non_compute_consumers(model: onnx.ModelProto, allowed: frozenset[str]) -> int:
    """Feed the FP32 tensor, not its dequantised copy, to every consumer that is not an allowed op.

    ORT's QDQ pass routes *all* consumers of a quantised tensor through its DQ (e.g. the residual
    ``Add`` in a ResNet block next to the ``Conv`` that wanted INT8). Returns the number of
    rewired inputs; Q/DQ pairs left without consumers are removed.
    """
    graph = model.graph
    producers = _producers(graph)
    outputs = {o.name for o in graph.output}
    rewired = 0
    for node in graph.node:
        if node.op_type in allowed or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for index, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[index] = q.input[0]
                rewired += 1
    # Drop Q/DQ nodes nobody reads any more (a DQ first, then its Q).
    while True:
        consumers = _consumers(graph)
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in consumers or o in outputs for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return rewired


def verify_qdq(model: onnx.ModelProto, allowed_ops: Sequence[str]) -> QdqSummary:
    """Check a Q/DQ graph against TensorRT's explicit-INT8 rules and the placement policy.

    * standard-domain ops (not ORT's ``com.microsoft`` contrib Q/DQ);
    * every zero point is 0 and INT8 (a ``QuantizeLinear`` must have one, or it would output UINT8);
    * every scale is finite and positive;
    * a ``QuantizeLinear`` feeds ``DequantizeLinear`` nodes only;
    * a ``DequantizeLinear`` reads a ``QuantizeLinear`` or an INT8 weight, and feeds only ``allowed_ops``
      (never a graph output).

    Returns:
        Counts of activation Q/DQ pairs, weight dequantisers and quantised compute nodes.

    Raises:
        CalibrationError: naming each offending node.
    """
    graph = model.graph
    constants = _constant_tensors(graph)
    consumers = _consumers(graph)
    producers = _producers(graph)
    outputs = {o.name for o in graph.output}
    allowed = set(allowed_ops)
    problems: list[str] = []
    pairs = weights = 0
    quantized: set[str] = set()
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        label = f"{node.op_type} {node.name!r}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{label} is in domain {node.domain!r}; TensorRT parses only standard ONNX Q/DQ")
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if zero_point is None:
            if node.op_type == "QuantizeLinear":
                problems.append(f"{label} has no zero point (its output would be UINT8)")
        elif zero_point not in constants:
            problems.append(f"{label}: zero point {zero_point!r} is not a constant")
        else:
            tensor = constants[zero_point]
            if tensor.data_type != TensorProto.INT8:
                problems.append(f"{label}: zero point type {TensorProto.DataType.Name(tensor.data_type)}, not INT8")
            if np.any(numpy_helper.to_array(tensor) != 0):
                problems.append(f"{label}: non-zero zero point (TensorRT rejects it)")
        scale = constants.get(node.input[1])
        if scale is None:
            problems.append(f"{label}: scale {node.input[1]!r} is not a constant")
        else:
            values = numpy_helper.to_array(scale)
            if not (np.all(np.isfinite(values)) and np.all(values > 0)):
                problems.append(f"{label}: scale must be finite and positive")
        readers = consumers.get(node.output[0], [])
        if node.op_type == "QuantizeLinear":
            if not readers or any(r.op_type != "DequantizeLinear" for r in readers):
                problems.append(f"{label} feeds {[r.op_type for r in readers]} instead of DequantizeLinear only")
            pairs += sum(r.op_type == "DequantizeLinear" for r in readers)
            continue
        source = producers.get(node.input[0])
        if source is None:
            weight = constants.get(node.input[0])
            if weight is None or weight.data_type != TensorProto.INT8:
                problems.append(f"{label} reads {node.input[0]!r}, neither a QuantizeLinear nor an INT8 weight")
            weights += 1
        elif source.op_type != "QuantizeLinear":
            problems.append(f"{label} reads a {source.op_type}, not a QuantizeLinear")
        if node.output[0] in outputs:
            problems.append(f"{label} produces the graph output {node.output[0]!r}")
        for reader in readers:
            if reader.op_type not in allowed:
                problems.append(f"{label} feeds {reader.op_type} {reader.name!r}; Q/DQ may only feed {sorted(allowed)}")
            quantized.add(reader.name)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems) - 8} more)" if len(problems) > 8 else "")
        raise CalibrationError(f"the INT8 graph breaks TensorRT's Q/DQ rules: {shown}")
    return QdqSummary(pairs, weights, len(quantized))


# ---------------------------------------------------------------------------------------------
# Calibration ranges: collection and cache
# ---------------------------------------------------------------------------------------------

Ranges = dict[str, tuple[float, float]]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def range_cache_key(graph_sha256: str, set_hash: str, settings: CalibrationSettings) -> dict[str, Any]:
    """What cached ranges depend on: the graph (with its upstream graphs), the calibration set, the method."""
    return {"graph_sha256": graph_sha256, "calibration_set": set_hash, "method": settings.method_tag,
            "op_types": sorted(settings.op_types), "symmetric": True}


def _cache_file(cache_dir: Path, graph_name: str, key: Mapping[str, Any]) -> Path:
    digest = _sha256(json.dumps(key, sort_keys=True).encode("utf-8"))
    return cache_dir / f"int8-ranges-{graph_name}-{digest[:32]}.json"


def _read_cached_ranges(path: Path, key: Mapping[str, Any], log: Callable[[str], None]) -> Ranges | None:
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload.get("format") != _CACHE_FORMAT or payload.get("version") != _CACHE_VERSION or payload.get("key") != dict(key):
            raise ValueError("written by another galr version or for another key")
        return {name: (float(low), float(high)) for name, (low, high) in payload["ranges"].items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        log(f"ignoring calibration cache {path}: {error}; collecting ranges again")
        return None


def _write_cached_ranges(path: Path, key: Mapping[str, Any], ranges: Ranges) -> None:
    """Atomic write: a crash never leaves a half-written cache that a later run would trust."""
    payload = {"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "key": dict(key),
               "ranges": {name: [low, high] for name, (low, high) in sorted(ranges.items())}}
    write_bytes_atomically(path, json.dumps(payload).encode("utf-8"))


@contextlib.contextmanager
def _quiet_onnxruntime_quantization() -> Iterator[None]:
    """Silence ORT's stdout prints (percentile statistics) and its "run pre-processing" advice."""

    def drop_preprocess_advice(record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop_preprocess_advice)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(drop_preprocess_advice)


def collect_ranges(model_path: Path, reader: FeedReader, settings: CalibrationSettings, work_dir: Path) -> Ranges:
    """Run ORT's calibrator for ``settings.method`` over ``reader``; symmetric (min, max) per calibrated tensor.

    Raises:
        CalibrationError: the reader is empty.
    """
    from onnxruntime.quantization import calibrate

    if not len(reader):
        raise CalibrationError("no calibration batches: the calibration set is empty")
    calibrator = calibrate.create_calibrator(
        Path(model_path), list(settings.op_types), augmented_model_path=str(work_dir / "augmented.onnx"),
        calibrate_method=calibrate.CalibrationMethod[METHODS[settings.method]],
        # ORT's default entropy histogram (128 bins -> 128 levels) leaves no threshold to choose but
        # the maximum, i.e. entropy silently becomes minmax; hence histogram_bins (>= 256).
        extra_options={"symmetric": True, "percentile": settings.percentile, "num_bins": settings.histogram_bins,
                       "num_quantized_bins": 128},
    )
    with _quiet_onnxruntime_quantization():
        for chunk in reader.chunks(_BATCHES_PER_COLLECT):
            calibrator.collect_data(chunk)
        tensors = calibrator.compute_data()
    # Ranges come back as 0-d or 1-element arrays depending on the calibrator.
    return {name: (float(np.min(data.range_value[0])), float(np.max(data.range_value[1])))
            for name, data in tensors.data.items()}


# ---------------------------------------------------------------------------------------------
# Quantisation of one graph
# ---------------------------------------------------------------------------------------------


def _extra_options(settings: CalibrationSettings) -> dict[str, Any]:
    return {
        "ActivationSymmetric": True,  # zero point 0 for activations (default False!)
        "WeightSymmetric": True,
        "QuantizeBias": False,  # FP32 bias: TensorRT folds it; INT32 bias behind a DQ fails its parser
        "OpTypesToExcludeOutputQuantization": list(settings.op_types),  # Q/DQ on compute inputs only
        "DedicatedQDQPair": True,  # one pair per consuming node, as ORT advises for TensorRT
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # weight [K, N]: one scale per output column
    }


def _require_range_file_support() -> None:
    from onnxruntime.quantization import quantize_static

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        import onnxruntime

        raise CalibrationError(
            f"onnxruntime {onnxruntime.__version__} is too old for galr's INT8 pass: it needs "
            "quantize_static(calibration_cache_path=...) (onnxruntime >= 1.30); upgrade onnxruntime"
        )


def _quantize_with_ranges(model_path: Path, ranges: Ranges, settings: CalibrationSettings,
                          nodes_to_exclude: Sequence[str], work_dir: Path) -> onnx.ModelProto:
    """``quantize_static`` from precomputed ranges: it loads them from a range file and runs no calibration."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

    method = CalibrationMethod[METHODS[settings.method]]
    tensors = TensorsData(method, {name: TensorData(lowest=np.float32(low), highest=np.float32(high))
                                   for name, (low, high) in ranges.items()})
    range_file = work_dir / "ranges.json"
    save_tensors_data(tensors, range_file)
    output = work_dir / "int8.onnx"
    with _quiet_onnxruntime_quantization():
        quantize_static(
            model_path, output, calibration_data_reader=None, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(settings.op_types), per_channel=settings.per_channel, reduce_range=False,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=list(nodes_to_exclude),
            calibrate_method=method, extra_options=_extra_options(settings), calibration_cache_path=range_file,
        )
    return onnx.load(str(output))


@dataclass(frozen=True)
class QuantizedGraph:
    """One INT8 graph and how it was made."""

    graph: bytes
    summary: QdqSummary
    excluded_nodes: tuple[str, ...]
    cache_hit: bool
    seconds: float


def quantize_graph(graph: bytes, reader: FeedReader, settings: CalibrationSettings, set_hash: str,
                   name: str = "graph", upstream: bytes = b"", log: Callable[[str], None] = print) -> QuantizedGraph:
    """Calibrate (or reuse cached ranges), quantise to Q/DQ, clean up, verify and stamp one FP32 graph.

    Args:
        graph: the FP32 ONNX graph (serialized).
        reader: its calibration feeds.
        settings: calibration settings.
        set_hash: :func:`~galr.calibration.readers.calibration_set_hash` of the calibration set.
        name: graph name (for messages, cache files and metadata).
        upstream: bytes of graphs that produced the reader's feeds (the fusion graph's encoders), so
            cached ranges follow them too.
        log: progress messages.

    Returns:
        The INT8 graph with its Q/DQ counts.

    Raises:
        CalibrationError: empty calibration data, too old ONNX Runtime, nothing quantisable, or a
            graph that breaks TensorRT's Q/DQ rules.
    """
    from galr.export.onnx_export import stamp_metadata  # torch-heavy module: import on use

    _require_range_file_support()
    start = time.perf_counter()
    model = onnx.load_from_string(graph)
    excluded = tuple(dict.fromkeys([*output_normalisation_nodes(model), *sensitive_nodes(model, settings.op_types),
                                    *settings.exclude_nodes]))
    key = range_cache_key(_sha256(graph + upstream), set_hash, settings)
    cache_file = _cache_file(settings.cache_dir, name, key) if settings.cache_dir is not None else None
    ranges = _read_cached_ranges(cache_file, key, log) if cache_file is not None else None
    cache_hit = ranges is not None
    with tempfile.TemporaryDirectory(prefix="galr-int8-") as work:
        work_dir = Path(work)
        model_path = work_dir / "fp32.onnx"
        model_path.write_bytes(graph)
        if ranges is None:
            ranges = collect_ranges(model_path, reader, settings, work_dir)
            if cache_file is not None:
                _write_cached_ranges(cache_file, key, ranges)
        quantized = _quantize_with_ranges(model_path, ranges, settings, excluded, work_dir)
    _detach_non_compute_consumers(quantized, frozenset(settings.op_types))
    summary = verify_qdq(quantized, settings.op_types)
    if summary.quantized_nodes == 0:
        raise CalibrationError(f"nothing in the {name} graph was quantised: no {list(settings.op_types)} node "
                               "outside the excluded ones")
    stamp_metadata(quantized, {"galr.precision": "int8", "galr.calibration.method": settings.method_tag,
                               "galr.calibration.set_hash": set_hash,
                               "galr.int8.op_types": ",".join(settings.op_types)})
    onnx.checker.check_model(quantized)
    seconds = time.perf_counter() - start
    log(f"int8 {name}: {summary.quantized_nodes} nodes quantised, {summary.activation_pairs} Q/DQ pairs, "
        f"{len(excluded)} nodes kept FP32, ranges {'from cache' if cache_hit else 'collected'} ({seconds:.1f} s)")
    return QuantizedGraph(quantized.SerializeToString(), summary, excluded, cache_hit, seconds)


# ---------------------------------------------------------------------------------------------
# The bundle's INT8 set and its report
# ---------------------------------------------------------------------------------------------


def _session(graph: bytes) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(graph, providers=["CPUExecutionProvider"])


def _outputs(graph: bytes, reader: FeedReader) -> np.ndarray:
    session = _session(graph)
    output = session.get_outputs()[0].name
    return np.concatenate([session.run([output], feeds)[0] for feeds in reader])


def _latency_ms(graph: bytes, feeds: Mapping[str, np.ndarray], runs: int) -> float:
    session = _session(graph)
    session.run(None, dict(feeds))  # warm-up: allocations and kernel selection
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, dict(feeds))
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _latency_feeds(reader: FeedReader, batch: int) -> dict[str, np.ndarray]:
    """The reader's first batch, rows repeated or cut to ``batch``."""
    first = next(iter(reader))
    rows = np.arange(batch) % len(next(iter(first.values())))
    return {name: array[rows] for name, array in first.items()}


def _calibration_inputs(settings: CalibrationSettings, loaded: "LoadedCheckpoint", inputs: SplitInputs | None,
                        log: Callable[[str], None]) -> tuple[SplitInputs, str]:
    if inputs is not None:
        return select_calibration_inputs(inputs, settings.max_images, settings.seed), "inputs given in memory"
    if settings.dataset is None:
        raise CalibrationError("INT8 calibration needs data: set CalibrationSettings.dataset (images with "
                               "detections and captions) or pass inputs=")
    image_config, drea_config = loaded.image_config(), loaded.drea_config()
    log(f"reading up to {settings.max_images} calibration images of the {settings.split} split of {settings.dataset}")
    try:
        chosen = load_calibration_inputs(settings.dataset, settings.split, settings.max_images, settings.seed,
                                         image_config, drea_config)
    except ValueError as error:
        raise CalibrationError(str(error)) from error
    return chosen, f"{settings.dataset} [{settings.split}]"


def quantize_bundle_graphs(graph_bytes_fp32: Mapping[str, bytes], loaded: "LoadedCheckpoint",
                           settings: CalibrationSettings, log: Callable[[str], None] = print,
                           inputs: SplitInputs | None = None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The bundle's INT8 graph set: global, local and fusion (and text when asked) as Q/DQ ONNX.

    Graphs not quantised are the FP32 bytes unchanged (their metadata still says ``fp32``).

    Args:
        graph_bytes_fp32: the four FP32 graphs by name (:data:`galr.graphs.GRAPH_NAMES`).
        loaded: the checkpoint (vocabulary for text calibration, preprocessing and DREA settings).
        settings: calibration settings; ``settings.dataset`` is read unless ``inputs`` is given.
        log: progress messages.
        inputs: in-memory calibration inputs (images, DREA matrices, captions) instead of a dataset.

    Returns:
        ``(graphs, report)``: INT8 graph bytes by name, and a JSON-safe report (method, images used,
        set hash, quantised graphs, Q/DQ counts, time, cosine vs FP32 per graph and end to end,
        ORT CPU latency FP32 vs INT8 per graph at batch 8).

    Raises:
        CalibrationError: missing graphs or data, an empty calibration set, or an invalid INT8 graph.
    """
    import onnxruntime

    missing = sorted(set(graphs.GRAPH_NAMES) - set(graph_bytes_fp32))
    if missing:
        raise CalibrationError(f"graph_bytes_fp32 lacks the graphs {missing}; pass all of {list(graphs.GRAPH_NAMES)}")
    chosen, source = _calibration_inputs(settings, loaded, inputs, log)
    if not len(chosen.image_names):
        raise CalibrationError(f"no calibration images in {source}: the calibration set is empty")
    set_hash = calibration_set_hash(chosen, settings.method_tag)
    names = QUANTIZABLE_GRAPHS + ((graphs.TEXT,) if settings.quantize_text else ())
    tokenizer = None
    if settings.quantize_text:
        from galr.preprocess.text import Tokenizer

        tokenizer = Tokenizer(loaded.vocab)
    readers = graph_readers(chosen, graph_bytes_fp32, settings.batch_size, tokenizer, names)
    log(f"INT8 calibration ({settings.method_tag}) on {len(chosen.image_names)} images from {source}, set {set_hash[:12]}")

    upstream = {graphs.FUSION: graph_bytes_fp32[graphs.GLOBAL] + graph_bytes_fp32[graphs.LOCAL]}
    int8: dict[str, bytes] = dict(graph_bytes_fp32)
    per_graph: dict[str, dict[str, Any]] = {}
    int8_outputs: dict[str, np.ndarray] = {}
    for name in names:
        result = quantize_graph(graph_bytes_fp32[name], readers[name], settings, set_hash, name,
                                upstream.get(name, b""), log)
        int8[name] = result.graph
        int8_outputs[name] = _outputs(result.graph, readers[name])
        per_graph[name] = {
            "qdq": result.summary.to_dict(), "excluded_nodes": list(result.excluded_nodes),
            "ranges_from_cache": result.cache_hit, "seconds": round(result.seconds, 3),
            "vs_fp32": compare(_outputs(graph_bytes_fp32[name], readers[name]), int8_outputs[name]).to_dict(),
        }
        if settings.latency_runs:
            feeds = _latency_feeds(readers[name], _LATENCY_BATCH)
            per_graph[name]["latency_ms_batch8_ort_cpu"] = {
                precision: round(_latency_ms(data, feeds, settings.latency_runs), 3)
                for precision, data in (("fp32", graph_bytes_fp32[name]), ("int8", result.graph))}
    # End to end, errors compound: INT8 fusion on INT8 encoder outputs vs the FP32 chain (the
    # fusion reader's feeds are the FP32 encoder outputs, so FP32 fusion on them is the FP32 chain).
    chained = _session(int8[graphs.FUSION]).run([graphs.IMAGE_EMBEDDING], {
        graphs.GLOBAL_FEATURE: int8_outputs[graphs.GLOBAL], graphs.LOCAL_FEATURE: int8_outputs[graphs.LOCAL]})[0]
    end_to_end = compare(_outputs(graph_bytes_fp32[graphs.FUSION], readers[graphs.FUSION]), chained)

    report: dict[str, Any] = {
        "method": settings.method_tag,
        "settings": settings.to_dict(),
        "source": source,
        "images": len(chosen.image_names),
        "captions": len(chosen.captions) if settings.quantize_text else 0,
        "calibration_set_hash": set_hash,
        "quantized_graphs": list(names),
        "fp32_graphs": [n for n in graphs.GRAPH_NAMES if n not in names],
        "graphs": per_graph,
        "image_end_to_end_vs_fp32": end_to_end.to_dict(),
        "seconds": round(sum(entry["seconds"] for entry in per_graph.values()), 3),
        "onnxruntime": onnxruntime.__version__,
        "notes": [] if settings.quantize_text else [
            "text graph kept FP32 in the int8 set: TensorRT and ONNX Runtime's Q/DQ tools do not quantise GRU "
            "internals (set quantize_text to quantise its output Gemm only)"],
    }
    return int8, report

