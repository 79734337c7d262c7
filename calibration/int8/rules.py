"""What INT8 may touch in a graph, the clean-up after ONNX Runtime's Q/DQ pass, and the proof
(:func:`verify_qdq`) that the result follows TensorRT's explicit-quantization rules."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from galr.calibration.int8.settings import CalibrationError

# Ops an output L2-normalisation is built from (x / max(||x||, eps), or x / (||x|| + eps)).
_NORMALISATION_OPS = frozenset({"Div", "Pow", "Mul", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Sqrt", "Add",
                                "Clip", "Max", "Expand", "Reciprocal", "Unsqueeze"})


@dataclass(frozen=True)
class QdqSummary:
    """What :func:`verify_qdq` counted in a checked graph."""

    activation_pairs: int
    weight_dequantizers: int
    quantized_nodes: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


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


def detach_non_compute_consumers(model: onnx.ModelProto, allowed: frozenset[str]) -> int:
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
