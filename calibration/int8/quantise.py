"""Quantise one graph (:func:`quantize_graph`) and a bundle's INT8 set (:func:`quantize_bundle_graphs`)."""

from __future__ import annotations

import inspect
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from galr import graphs
from galr.calibration.int8.ranges import (
    Ranges,
    cached_or_collected_ranges,
    quiet_onnxruntime_quantization,
)
from galr.calibration.int8.rules import (
    QdqSummary,
    detach_non_compute_consumers,
    output_normalisation_nodes,
    sensitive_nodes,
    verify_qdq,
)
from galr.calibration.int8.settings import (
    METHODS,
    CalibrationError,
    CalibrationSettings,
)
from galr.calibration.readers import (
    FeedReader,
    calibration_set_hash,
    graph_readers,
    load_calibration_inputs,
    run_graph,
    select_calibration_inputs,
)
from galr.preprocess.spec import PreprocessSpec
from galr.preprocess.text import Vocabulary
from galr.retrieval.evaluate import SplitInputs
from galr.retrieval.parity import compare

QUANTIZABLE_GRAPHS: tuple[str, ...] = (graphs.GLOBAL, graphs.LOCAL, graphs.FUSION)


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
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        TensorData,
        TensorsData,
        save_tensors_data,
    )

    method = CalibrationMethod[METHODS[settings.method]]
    tensors = TensorsData(method, {name: TensorData(lowest=np.float32(low), highest=np.float32(high))
                                   for name, (low, high) in ranges.items()})
    range_file = work_dir / "ranges.json"
    save_tensors_data(tensors, range_file)
    output = work_dir / "int8.onnx"
    with quiet_onnxruntime_quantization():
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
    _require_range_file_support()
    start = time.perf_counter()
    model = onnx.load_from_string(graph)
    excluded = tuple(dict.fromkeys([*output_normalisation_nodes(model), *sensitive_nodes(model, settings.op_types),
                                    *settings.exclude_nodes]))
    with tempfile.TemporaryDirectory(prefix="galr-int8-") as work:
        work_dir = Path(work)
        model_path = work_dir / "fp32.onnx"
        model_path.write_bytes(graph)
        ranges, cache_hit = cached_or_collected_ranges(graph, upstream, model_path, reader, settings, set_hash, name,
                                                       work_dir, log)
        quantized = _quantize_with_ranges(model_path, ranges, settings, excluded, work_dir)
    detach_non_compute_consumers(quantized, frozenset(settings.op_types))
    summary = verify_qdq(quantized, settings.op_types)
    if summary.quantized_nodes == 0:
        raise CalibrationError(f"nothing in the {name} graph was quantised: no {list(settings.op_types)} node "
                               "outside the excluded ones")
    graphs.stamp_metadata(quantized, {graphs.META_PRECISION: "int8", "galr.calibration.method": settings.method_tag,
                               "galr.calibration.set_hash": set_hash,
                               "galr.int8.op_types": ",".join(settings.op_types)})
    onnx.checker.check_model(quantized)
    seconds = time.perf_counter() - start
    log(f"int8 {name}: {summary.quantized_nodes} nodes quantised, {summary.activation_pairs} Q/DQ pairs, "
        f"{len(excluded)} nodes kept FP32, ranges {'from cache' if cache_hit else 'collected'} ({seconds:.1f} s)")
    return QuantizedGraph(quantized.SerializeToString(), summary, excluded, cache_hit, seconds)


def calibration_inputs(settings: CalibrationSettings, spec: PreprocessSpec, inputs: SplitInputs | None,
                       log: Callable[[str], None], graph_bytes_fp32: Mapping[str, bytes] | None = None
                       ) -> tuple[SplitInputs, str]:
    """The calibration inputs (given in memory, else read from ``settings.dataset``) and where they came
    from; refuses an empty set and, when given, FP32 graphs that are not all four.

    Raises:
        CalibrationError: missing graphs or data, or an empty calibration set.
    """
    if graph_bytes_fp32 is not None:
        missing = sorted(set(graphs.GRAPH_NAMES) - set(graph_bytes_fp32))
        if missing:
            raise CalibrationError(f"graph_bytes_fp32 lacks the graphs {missing}; pass all of "
                                   f"{list(graphs.GRAPH_NAMES)}")
    chosen, source = _read_calibration_inputs(settings, spec, inputs, log)
    if not len(chosen.image_names):
        raise CalibrationError(f"no calibration images in {source}: the calibration set is empty")
    return chosen, source


def _read_calibration_inputs(settings: CalibrationSettings, spec: PreprocessSpec, inputs: SplitInputs | None,
                             log: Callable[[str], None]) -> tuple[SplitInputs, str]:
    if inputs is not None:
        return select_calibration_inputs(inputs, settings.max_images, settings.seed), "inputs given in memory"
    if settings.dataset is None:
        raise CalibrationError("INT8 calibration needs data: set CalibrationSettings.dataset (images with "
                               "detections and captions) or pass inputs=")
    log(f"reading up to {settings.max_images} calibration images of the {settings.split} split of {settings.dataset}")
    try:
        chosen = load_calibration_inputs(settings.dataset, settings.split, settings.max_images, spec, settings.seed)
    except ValueError as error:
        raise CalibrationError(str(error)) from error
    return chosen, f"{settings.dataset} [{settings.split}]"


def quantize_bundle_graphs(graph_bytes_fp32: Mapping[str, bytes], vocab: Vocabulary, spec: PreprocessSpec,
                           settings: CalibrationSettings, log: Callable[[str], None] = print,
                           inputs: SplitInputs | None = None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The bundle's INT8 graph set: global, local and fusion (and text when asked) as Q/DQ ONNX.

    Graphs not quantised are the FP32 bytes unchanged (their metadata still says ``fp32``).

    Args:
        graph_bytes_fp32: the four FP32 graphs by name (:data:`galr.graphs.GRAPH_NAMES`).
        vocab: the model's vocabulary (text calibration).
        spec: the model's preprocessing (reading calibration images and their DREA inputs).
        settings: calibration settings; ``settings.dataset`` is read unless ``inputs`` is given.
        log: progress messages.
        inputs: in-memory calibration inputs (images, DREA matrices, captions) instead of a dataset.

    Returns:
        ``(graphs, report)``: INT8 graph bytes by name, and a JSON-safe report (method, images used,
        set hash, quantised graphs, Q/DQ counts, time, cosine vs FP32 per graph and end to end).

    Raises:
        CalibrationError: missing graphs or data, an empty calibration set, or an invalid INT8 graph.
    """
    import onnxruntime

    chosen, source = calibration_inputs(settings, spec, inputs, log, graph_bytes_fp32)
    set_hash = calibration_set_hash(chosen, settings.method_tag)
    names = QUANTIZABLE_GRAPHS + ((graphs.TEXT,) if settings.quantize_text else ())
    tokenizer = spec.tokenizer(vocab) if settings.quantize_text else None
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
        int8_outputs[name] = run_graph(result.graph, readers[name])
        per_graph[name] = {
            "qdq": result.summary.to_dict(), "excluded_nodes": list(result.excluded_nodes),
            "ranges_from_cache": result.cache_hit, "seconds": round(result.seconds, 3),
            "vs_fp32": compare(run_graph(graph_bytes_fp32[name], readers[name]), int8_outputs[name]).to_dict(),
        }
    # End to end, errors compound: INT8 fusion on INT8 encoder outputs vs the FP32 chain (the
    # fusion reader's feeds are the FP32 encoder outputs, so FP32 fusion on them is the FP32 chain).
    chained = run_graph(int8[graphs.FUSION], FeedReader([{graphs.GLOBAL_FEATURE: int8_outputs[graphs.GLOBAL],
                                                          graphs.LOCAL_FEATURE: int8_outputs[graphs.LOCAL]}]))
    end_to_end = compare(run_graph(graph_bytes_fp32[graphs.FUSION], readers[graphs.FUSION]), chained)

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


