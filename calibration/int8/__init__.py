"""INT8 post-training quantisation: FP32 ONNX -> explicit Q/DQ ONNX that TensorRT 10/11 and ORT CPU accept.

TensorRT 11 removed implicit INT8 calibration; INT8 must be explicit ``QuantizeLinear`` /
``DequantizeLinear`` (Q/DQ) pairs in the ONNX (deployment notes §1.4). ONNX Runtime's
``quantize_static`` (QDQ format) produces them under TensorRT's rules:

* INT8 activations and weights, symmetric: every zero point is 0, which TensorRT's parser requires.
* Per-channel weights, biases left in FP32 (TensorRT quantises biases itself; an INT32 bias behind a
  ``DequantizeLinear`` is rejected by its parser).
* Q/DQ only on the inputs of compute ops (``Conv``, ``Gemm``, ``MatMul`` by default), never on
  element-wise ops, reductions and normalisations; the final L2-normalisation and numerically
  sensitive nodes stay FP32.

The package, by job:

* :mod:`.settings`: :class:`CalibrationSettings` and :class:`CalibrationError`;
* :mod:`.rules`: what may be quantised, the clean-up after ORT, and :func:`verify_qdq`, the proof
  that a graph follows TensorRT's rules;
* :mod:`.ranges`: collecting activation ranges with ORT's calibrators, and their cache;
* :mod:`.quantise`: one graph (:func:`quantize_graph`) and a bundle's INT8 set
  (:func:`quantize_bundle_graphs`) with its accuracy report.

The text graph's GRU is not quantised by TensorRT or by ORT's Q/DQ tools, so the INT8 set keeps the
FP32 text graph unless ``quantize_text`` is set (which then quantises only its output ``Gemm``).
"""

from galr.calibration.int8.quantise import (
    QUANTIZABLE_GRAPHS,
    QuantizedGraph,
    quantize_bundle_graphs,
    quantize_graph,
)
from galr.calibration.int8.ranges import Ranges, collect_ranges, range_cache_key
from galr.calibration.int8.rules import (
    QdqSummary,
    detach_non_compute_consumers,
    output_normalisation_nodes,
    sensitive_nodes,
    verify_qdq,
)
from galr.calibration.int8.settings import (
    COMPUTE_OPS,
    DEFAULT_OP_TYPES,
    METHODS,
    CalibrationError,
    CalibrationSettings,
)

__all__ = [
    "COMPUTE_OPS",
    "DEFAULT_OP_TYPES",
    "METHODS",
    "QUANTIZABLE_GRAPHS",
    "CalibrationError",
    "CalibrationSettings",
    "QdqSummary",
    "QuantizedGraph",
    "Ranges",
    "collect_ranges",
    "detach_non_compute_consumers",
    "output_normalisation_nodes",
    "quantize_bundle_graphs",
    "quantize_graph",
    "range_cache_key",
    "sensitive_nodes",
    "verify_qdq",
]
