"""The ``int8-cpu`` graph set: INT8 made for ONNX Runtime's CPU provider, not for TensorRT.

The ``int8`` set (:mod:`.quantise`) follows TensorRT's rules: symmetric INT8 activations with zero
points 0, Q/DQ on compute inputs only, FP32 between them. On ONNX Runtime's CPU provider that layout
is *slower* than FP32: MLAS's integer GEMMs (AVX2 / AVX-512 VNNI) want unsigned 8-bit activations
with signed 8-bit weights, and the graph optimiser only fuses a DequantizeLinear -> op ->
QuantizeLinear group into one integer kernel (``QLinearConv``, ``QLinearAdd``, ``QGemm``, ...) when
the op's output is quantised too. The CPU set therefore uses:

* image graphs (:data:`CpuInt8Settings.image_graphs`, the global encoder by default): ORT's static
  QDQ quantisation with **u8 asymmetric activations, s8 per-channel weights**, every op type ORT can
  quantise (so residual ``Add``, pooling, ``Concat``, ``Resize`` stay in INT8 between convolutions),
  ranges from ORT's calibrator on the calibration split;
* the text graph: the GRU rebuilt as a ``Loop`` over INT8 weight products (:mod:`.cpu_text`);
* every other graph: the FP32 bytes unchanged.

:func:`optimised_op_counts` runs ORT's optimiser on a graph and counts the op types that result,
which is how the report (and the tests) say which kernels really run.
"""

from __future__ import annotations

import collections
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import onnx

from galr import graphs
from galr.calibration.int8.cpu_text import CpuTextSettings, build_cpu_text_graph
from galr.calibration.int8.quantise import calibration_inputs
from galr.calibration.int8.ranges import quiet_onnxruntime_quantization
from galr.calibration.int8.rules import output_normalisation_nodes
from galr.calibration.int8.settings import METHODS, CalibrationError, CalibrationSettings
from galr.calibration.readers import FeedReader, calibration_set_hash, graph_readers, run_graph
from galr.preprocess.spec import PreprocessSpec
from galr.preprocess.text import Vocabulary
from galr.retrieval.evaluate import SplitInputs
from galr.retrieval.parity import compare

#: The bundle's name for this set (``onnx/int8-cpu/<graph>.onnx``).
CPU_INT8 = "int8-cpu"
#: Op types whose presence after ORT's optimiser shows integer kernels run.
INTEGER_OPS: frozenset[str] = frozenset({
    "QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "MatMulNBits", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearSigmoid",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearLeakyRelu",
})
_IMAGE_GRAPHS = (graphs.GLOBAL, graphs.LOCAL, graphs.FUSION)


@dataclass(frozen=True)
class CpuInt8Settings:
    """What goes into the ``int8-cpu`` set.

    Attributes:
        image_graphs: image graphs statically quantised for the CPU (others stay FP32). The global
            encoder carries almost all of the image FLOPs; the local GCN and the fusion MLPs are
            small and stay FP32 by default.
        method: ORT calibrator for the activation ranges (``minmax`` | ``percentile`` | ``entropy``).
        per_channel: per-output-channel weight scales.
        text: how the text graph is rebuilt; ``None`` keeps the FP32 text graph.
    """

    image_graphs: tuple[str, ...] = (graphs.GLOBAL,)
    method: str = "minmax"
    per_channel: bool = True
    text: CpuTextSettings | None = field(default_factory=CpuTextSettings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_graphs", tuple(self.image_graphs))
        unknown = sorted(set(self.image_graphs) - set(_IMAGE_GRAPHS))
        if unknown:
            raise CalibrationError(f"CpuInt8Settings.image_graphs: unknown graphs {unknown}; use some of "
                                   f"{list(_IMAGE_GRAPHS)}")
        if self.method not in METHODS:
            raise CalibrationError(f"CpuInt8Settings.method must be one of {sorted(METHODS)}, got {self.method!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"image_graphs": list(self.image_graphs), "method": self.method, "per_channel": self.per_channel,
                "text": None if self.text is None else self.text.to_dict()}


def optimised_op_counts(graph: bytes, threads: int = 1) -> dict[str, int]:
    """Op types (and how many of each) in the graph ONNX Runtime's CPU provider runs after its
    optimiser (``ORT_ENABLE_ALL``); a ``Loop``'s body is counted too."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="galr-ort-opt-") as work:
        path = Path(work) / "optimised.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(path)
        options.log_severity_level = 3  # ORT warns that the file is hardware specific: it is only read here
        ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        optimised = onnx.load(str(path))
    counts: collections.Counter[str] = collections.Counter()

    def walk(graph_proto: onnx.GraphProto) -> None:
        for node in graph_proto.node:
            counts[node.op_type] += 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    walk(attribute.g)

    walk(optimised.graph)
    return dict(sorted(counts.items()))


def integer_kernels(counts: Mapping[str, int]) -> dict[str, int]:
    """The integer kernels among :func:`optimised_op_counts`."""
    return {op: n for op, n in counts.items() if op in INTEGER_OPS}


def quantize_cpu_image_graph(graph: bytes, reader: FeedReader, settings: CpuInt8Settings,
                             name: str = "graph") -> bytes:
    """One image graph as u8/s8 QDQ ONNX that ORT's CPU optimiser fuses into integer kernels.

    The output L2-normalisation stays FP32 (as in the TensorRT set): it is cheap and sensitive.

    Raises:
        CalibrationError: the reader is empty, or nothing was quantised.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not len(reader):
        raise CalibrationError(f"no calibration batches for the {name} graph: the calibration set is empty")
    model = onnx.load_from_string(graph)
    excluded = output_normalisation_nodes(model)
    reader.rewind()
    with tempfile.TemporaryDirectory(prefix="galr-int8-cpu-") as work:
        source, target = Path(work) / "fp32.onnx", Path(work) / "int8-cpu.onnx"
        source.write_bytes(graph)
        with quiet_onnxruntime_quantization():
            quantize_static(
                source, target, calibration_data_reader=reader, quant_format=QuantFormat.QDQ,
                per_channel=settings.per_channel, reduce_range=False,
                # u8 activations (asymmetric: post-ReLU tensors use all 256 levels) and s8 weights:
                # the pair MLAS's u8s8 GEMM / VNNI kernels take.
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded, calibrate_method=CalibrationMethod[METHODS[settings.method]],
                extra_options={"CalibTensorRangeSymmetric": False, "WeightSymmetric": True},
                calibration_providers=["CPUExecutionProvider"],
            )
        quantized = onnx.load(str(target))
    if not any(node.op_type == "QuantizeLinear" for node in quantized.graph.node):
        raise CalibrationError(f"nothing in the {name} graph was quantised for the CPU")
    graphs.stamp_metadata(quantized, {graphs.META_PRECISION: CPU_INT8, "galr.calibration.method": settings.method,
                                      "galr.int8.flavour": "cpu: u8 activations, s8 per-channel weights (QDQ)"})
    return quantized.SerializeToString()


def build_cpu_int8_graphs(graph_bytes_fp32: Mapping[str, bytes], vocab: Vocabulary, spec: PreprocessSpec,
                          calibration: CalibrationSettings, settings: CpuInt8Settings = CpuInt8Settings(),
                          log: Callable[[str], None] = print,
                          inputs: SplitInputs | None = None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The bundle's ``int8-cpu`` set and its report.

    Args:
        graph_bytes_fp32: the four FP32 graphs by name.
        vocab: the model's vocabulary (text captions for the text graph's comparison).
        spec: the model's preprocessing.
        calibration: where the calibration images come from (dataset, split, count, seed); its
            ``method`` is not used here (``settings.method`` is).
        settings: what is quantised and how.
        log: progress messages.
        inputs: in-memory calibration inputs instead of ``calibration.dataset``.

    Returns:
        ``(graphs, report)``: graph bytes by name, and a JSON-safe report: settings, per graph the
        cosine against FP32 on the calibration inputs, and the op types ORT runs after optimisation.

    Raises:
        CalibrationError: missing graphs or data, or a graph that cannot be quantised.
    """
    import onnxruntime

    chosen, source = calibration_inputs(calibration, spec, inputs, log, graph_bytes_fp32)
    names = (*settings.image_graphs, *((graphs.TEXT,) if settings.text is not None else ()))
    readers = graph_readers(chosen, graph_bytes_fp32, calibration.batch_size, spec.tokenizer(vocab), names)
    log(f"int8-cpu: {len(chosen.image_names)} calibration images from {source} ({settings.method} ranges)")
    out: dict[str, bytes] = dict(graph_bytes_fp32)
    per_graph: dict[str, dict[str, Any]] = {}
    for name in names:
        start = time.perf_counter()
        if name == graphs.TEXT:
            assert settings.text is not None
            out[name] = _stamped_text(build_cpu_text_graph(graph_bytes_fp32[name], settings.text), settings.text)
        else:
            out[name] = quantize_cpu_image_graph(graph_bytes_fp32[name], readers[name], settings, name)
        seconds = time.perf_counter() - start
        stats = compare(run_graph(graph_bytes_fp32[name], readers[name]), run_graph(out[name], readers[name]))
        kernels = optimised_op_counts(out[name])
        per_graph[name] = {"vs_fp32": stats.to_dict(), "seconds": round(seconds, 3),
                           "integer_kernels": integer_kernels(kernels), "optimised_ops": kernels}
        log(f"int8-cpu {name}: min cosine {stats.min_cosine:.6f} vs FP32 on the calibration set, integer kernels "
            f"{integer_kernels(kernels)} ({seconds:.1f} s)")
    report = {
        "flavour": CPU_INT8,
        "settings": settings.to_dict(),
        "source": source,
        "images": len(chosen.image_names),
        "calibration_set_hash": calibration_set_hash(chosen, f"int8-cpu {settings.method}"),
        "quantized_graphs": list(names),
        "fp32_graphs": [n for n in graphs.GRAPH_NAMES if n not in names],
        "graphs": per_graph,
        "onnxruntime": onnxruntime.__version__,
    }
    return out, report


def _stamped_text(graph: bytes, settings: CpuTextSettings) -> bytes:
    model = onnx.load_from_string(graph)
    graphs.stamp_metadata(model, {graphs.META_PRECISION: CPU_INT8,
                                  "galr.int8.flavour": f"cpu: GRU as a Loop over INT8 weights ({settings.kernel})"})
    return model.SerializeToString()


__all__ = [
    "CPU_INT8",
    "INTEGER_OPS",
    "CpuInt8Settings",
    "build_cpu_int8_graphs",
    "integer_kernels",
    "optimised_op_counts",
    "quantize_cpu_image_graph",
]
