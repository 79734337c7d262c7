"""The text graph for ONNX Runtime's CPU provider: the GRU as a ``Loop`` over INT8 matrix products.

Why: at batch 1 the FP32 text encoder is bound by reading the GRU's recurrent matrix ``R`` (3H x H,
69 MB at H=2400) once per token, since every step needs the previous one. ONNX's ``GRU`` op has no
integer form in ONNX Runtime, so this module rebuilds the same cell from ordinary ops:

* ``Gather`` of the word embeddings, then the input projection of **all** steps at once
  (``x W_ih^T``, one matrix product over ``[B, T, E]``);
* a ``Loop`` over the steps whose body multiplies the hidden state by ``R`` stored as 8-bit integers
  (:data:`RECURRENT_KERNELS`), then the GRU gate arithmetic in FP32 (gate order z, r, h and
  ``linear_before_reset=1``, as the exported ``GRU`` node);
* the loop runs only up to the longest real row (padding steps after every row's last token are
  skipped) and keeps, per row, the hidden state at that row's last real token (the FP32 graph's
  quirk: a row with no token keeps the last step);
* the FP32 graph's head (``Gemm`` + ``ReLU`` + L2 norm) unchanged, its ``Gemm`` optionally INT8.

Weights come from the FP32 ONNX text graph (no torch): :func:`build_cpu_text_graph`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from galr import graphs
from galr.calibration.int8.settings import CalibrationError

MS_DOMAIN = "com.microsoft"
#: How the recurrent (and input / output) products are stored and run:
#: ``matmulnbits``: ``com.microsoft.MatMulNBits`` with ``bits=8`` (block-wise symmetric INT8 weights;
#: ``accuracy_level=4`` quantises the activations to INT8 per block and runs integer dot products);
#: ``dynamic``: ``com.microsoft.DynamicQuantizeMatMul`` (per-column INT8 weights, the activation
#: quantised to UINT8 per call: MLAS's u8s8 GEMM); ``fp32``: plain ``MatMul`` (the same loop, no
#: quantisation: isolates the loop's own cost).
RECURRENT_KERNELS: tuple[str, ...] = ("matmulnbits", "dynamic", "fp32")


@dataclass(frozen=True)
class CpuTextSettings:
    """How the CPU text graph is built.

    Attributes:
        kernel: one of :data:`RECURRENT_KERNELS`, used for the recurrent product.
        block_size: ``MatMulNBits`` block along K (a power of two, >= 16).
        quantize_input: also store the input projection ``W_ih`` in INT8 (read once per call).
        quantize_output: also store the output ``Gemm`` weight in INT8 (read once per call).
        large_batch_kernel: the kernel for batches of ``large_batch_from`` rows or more (an ``If`` on
            the batch size picks one of two loops; the weights are stored once per kernel), or
            ``None`` (the default) for one loop with ``kernel`` at every batch. ``MatMulNBits`` is the
            fastest at batch 1-2 (the query path) but not at larger batches, where
            ``DynamicQuantizeMatMul``'s u8 x s8 GEMM is (batch 32, 16 tokens: 88 ms with the ``If``
            vs 108 ms with one ``MatMulNBits`` loop, FP32 161 ms); but the ``If`` cost the batch-1
            query 1-6 ms (8.5-12.9 vs 6.2-7.8 ms, three interleaved runs), so it is not the default.
        large_batch_from: the smallest batch that runs ``large_batch_kernel``.
    """

    kernel: str = "matmulnbits"
    block_size: int = 128
    quantize_input: bool = True
    quantize_output: bool = False
    large_batch_kernel: str | None = None
    large_batch_from: int = 4

    def __post_init__(self) -> None:
        for name in ("kernel", "large_batch_kernel"):
            value = getattr(self, name)
            if value not in RECURRENT_KERNELS and not (name == "large_batch_kernel" and value is None):
                raise CalibrationError(f"CpuTextSettings.{name} must be one of {list(RECURRENT_KERNELS)}, got {value!r}")
        if self.large_batch_from < 2:
            raise CalibrationError(f"CpuTextSettings.large_batch_from must be at least 2, got {self.large_batch_from}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise CalibrationError(f"CpuTextSettings.block_size must be a power of two >= 16, got {self.block_size}")

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "block_size": self.block_size, "quantize_input": self.quantize_input,
                "quantize_output": self.quantize_output, "large_batch_kernel": self.large_batch_kernel,
                "large_batch_from": self.large_batch_from}


@dataclass(frozen=True)
class _TextWeights:
    embedding: np.ndarray  # [V + 1, E]
    w: np.ndarray  # [3H, E], gates z, r, h
    r: np.ndarray  # [3H, H]
    bias: np.ndarray  # [6H]: Wb (z, r, h) then Rb (z, r, h)
    gemm: onnx.NodeProto
    hidden: int


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _only(model: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    found = [node for node in model.graph.node if node.op_type == op_type]
    if len(found) != 1:
        raise CalibrationError(f"the FP32 text graph should have exactly one {op_type} node, it has {len(found)}; "
                               "was it exported by galr-export?")
    return found[0]


def _text_weights(model: onnx.ModelProto) -> _TextWeights:
    """The embedding, GRU and output weights of the FP32 text graph, checked against its GRU's attributes."""
    values = _initializers(model)
    gru = _only(model, "GRU")
    attributes = {a.name: helper.get_attribute_value(a) for a in gru.attribute}
    direction = attributes.get("direction", b"forward")
    if attributes.get("linear_before_reset") != 1 or direction not in (b"forward", "forward") \
            or attributes.get("layout", 0) != 0:
        raise CalibrationError(f"the text graph's GRU has attributes {attributes}; the CPU text graph rebuilds "
                               "only the forward, linear_before_reset=1 GRU that galr exports")
    hidden = int(attributes["hidden_size"])
    w, r, b = (values.get(name) for name in gru.input[1:4])
    if w is None or r is None or b is None:
        raise CalibrationError("the text graph's GRU weights are not initializers; re-export with galr-export")
    gathers = [node for node in model.graph.node if node.op_type == "Gather" and node.input[1] == graphs.TOKENS]
    if len(gathers) != 1 or gathers[0].input[0] not in values:
        raise CalibrationError("the text graph has no word-embedding Gather over 'tokens'; re-export with galr-export")
    gemm = _only(model, "Gemm")
    return _TextWeights(values[gathers[0].input[0]], w[0], r[0], b[0], gemm, hidden)


def _nbits_weights(weight_kn: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``MatMulNBits`` (bits=8) tensors of a ``[K, N]`` weight: uint8 blobs ``[N, blocks, block]`` and
    scales ``[N * blocks]``. Symmetric per block: ``q = round(w / s) + 128``, ``s = max|w| / 127``
    (128 is the operator's default zero point for 8 bits, so no zero-point input is needed)."""
    k, n = weight_kn.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = weight_kn
    per_block = padded.T.reshape(n, blocks, block_size)
    scales = np.abs(per_block).max(axis=2) / 127.0
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    q = np.clip(np.rint(per_block / scales[:, :, None]), -127, 127).astype(np.int16) + 128
    return q.astype(np.uint8), scales.reshape(-1)


def _per_column_int8(weight_kn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-column INT8 of a ``[K, N]`` weight: ``(int8 [K, N], scale [N])``."""
    scales = np.abs(weight_kn).max(axis=0) / 127.0
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    return np.clip(np.rint(weight_kn / scales), -127, 127).astype(np.int8), scales


class _Builder:
    """Collects nodes and initializers of one graph (or loop body) with unique names."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int = 1,
           domain: str = "", **attributes: Any) -> Any:
        names = [self.name(hint or op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=names[0], domain=domain or None,
                                           **attributes))
        return names[0] if outputs == 1 else names


def _matmul(builder: _Builder, x: str, weight_kn: np.ndarray, kernel: str, block_size: int, hint: str,
            bias: np.ndarray | None = None) -> str:
    """``x @ weight_kn (+ bias)`` with the weight stored as ``kernel`` says."""
    k, n = weight_kn.shape
    if kernel == "fp32":
        out = builder.op("MatMul", [x, builder.const(f"{hint}_w", weight_kn.astype(np.float32))], hint)
    elif kernel == "dynamic":
        q, scales = _per_column_int8(weight_kn)
        inputs = [x, builder.const(f"{hint}_wq", q), builder.const(f"{hint}_ws", scales),
                  builder.const(f"{hint}_wzp", np.zeros(n, np.int8))]
        if bias is not None:  # the op's own bias input: one node less per call
            return builder.op("DynamicQuantizeMatMul", [*inputs, builder.const(f"{hint}_b", bias.astype(np.float32))],
                              hint, domain=MS_DOMAIN)
        return builder.op("DynamicQuantizeMatMul", inputs, hint, domain=MS_DOMAIN)
    else:
        q, scales = _nbits_weights(weight_kn, block_size)
        inputs = [x, builder.const(f"{hint}_wq", q), builder.const(f"{hint}_ws", scales)]
        if bias is not None:  # inputs 3 and 4 (zero points, g_idx) absent; 5 is the bias
            inputs += ["", "", builder.const(f"{hint}_b", bias.astype(np.float32))]
        return builder.op("MatMulNBits", inputs, hint, domain=MS_DOMAIN, K=k, N=n, bits=8, block_size=block_size,
                          accuracy_level=4)
    if bias is None:
        return out
    return builder.op("Add", [out, builder.const(f"{hint}_b", bias.astype(np.float32))], f"{hint}_bias")


def _loop_body(weights: _TextWeights, kernel: str, block_size: int, projected: str) -> onnx.GraphProto:
    """One GRU step: ``(i, cond, h) -> (cond, h', h')``, the last a scan output (every step's state).

    Few nodes on purpose: at batch 1 each node costs a few microseconds of dispatch, 16 times a query.
    """
    h = weights.hidden
    body = _Builder("step")
    x_t = body.op("Gather", [projected, "i"], "x_t", axis=0)  # [B, 3H], outer-scope value
    # linear_before_reset: the h gate's recurrent bias is added before the reset gate multiplies it,
    # so it rides in the recurrent product's bias ([0, 0, b_hn]; the z and r ones are in x_t).
    recurrent_bias = np.zeros(3 * h, np.float32)
    recurrent_bias[2 * h:] = weights.bias[5 * h:6 * h]
    recurrent = _matmul(body, "h", weights.r.T.copy(), kernel, block_size, "recurrent", recurrent_bias)
    split = body.const("split", np.array([h, h, h], np.int64))
    # One sigmoid over all three gates (the h third is unused): fewer nodes than slicing first.
    z, r, _ = body.op("Split", [body.op("Sigmoid", [body.op("Add", [x_t, recurrent])])], "gates", outputs=3, axis=1)
    _, _, h_h = body.op("Split", [recurrent, split], "h_split", outputs=3, axis=1)
    _, _, x_h = body.op("Split", [x_t, split], "x_split", outputs=3, axis=1)
    candidate = body.op("Tanh", [body.op("Add", [x_h, body.op("Mul", [r, h_h])])], "n")
    # h' = (1 - z) * n + z * h = n + z * (h - n)
    new_h = body.op("Add", [candidate, body.op("Mul", [z, body.op("Sub", ["h", candidate])])], "h_next")
    state_out = body.op("Identity", [new_h], "h_out")
    cond_out = body.op("Identity", ["cond"], "cond_out")
    float_bh = ["batch", h]
    return helper.make_graph(
        body.nodes, "gru_step",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, float_bh)],
        [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
         helper.make_tensor_value_info(state_out, TensorProto.FLOAT, float_bh),
         helper.make_tensor_value_info(new_h, TensorProto.FLOAT, float_bh)],
        initializer=body.initializers)


def _head(model: onnx.ModelProto, gemm: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The nodes from the output ``Gemm`` on (ReLU, L2 norm), in graph order."""
    produced = set(gemm.output)
    head = []
    for node in model.graph.node:
        if node is gemm or any(name in produced for name in node.input):
            head.append(node)
            produced.update(node.output)
    return head


def _recurrence(g: _Builder, weights: _TextWeights, kernel: str, settings: CpuTextSettings, embedded: str,
                trips: str, h0: str) -> str:
    """Input projection and the step loop with ``kernel``: every step's state ``[steps, B, H]``."""
    h = weights.hidden
    input_kernel = kernel if settings.quantize_input else "fp32"
    # Input bias, plus the recurrent biases of the z and r gates (added outside the reset product).
    bias = weights.bias[:3 * h].copy()
    bias[:2 * h] += weights.bias[3 * h:5 * h]
    projected = _matmul(g, embedded, weights.w.T.copy(), input_kernel, settings.block_size, "input", bias)
    steps_first = g.op("Transpose", [projected], "steps_first", perm=[1, 0, 2])  # [T, B, 3H]
    body = _loop_body(weights, kernel, settings.block_size, steps_first)
    _, states = g.op("Loop", [trips, g.const("cond", np.array(True)), h0], "gru", outputs=2, body=body)
    return states


def _branch(weights: _TextWeights, kernel: str, settings: CpuTextSettings, embedded: str, trips: str, h0: str,
            name: str) -> onnx.GraphProto:
    """An ``If`` branch holding one :func:`_recurrence` (its weights are the branch's initializers)."""
    branch = _Builder(name)
    states = _recurrence(branch, weights, kernel, settings, embedded, trips, h0)
    out = branch.op("Identity", [states], "states")
    return helper.make_graph(branch.nodes, name, [],
                             [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["steps", "batch", weights.hidden])],
                             initializer=branch.initializers)


def build_cpu_text_graph(fp32_text: bytes, settings: CpuTextSettings = CpuTextSettings()) -> bytes:
    """The CPU text graph (module docstring) from the FP32 ONNX text graph's weights.

    Same inputs and outputs as the FP32 graph (``tokens`` int64 ``[B, T]`` -> ``text_embedding``).

    Raises:
        CalibrationError: the FP32 graph is not the one galr exports (no single GRU / Gemm / embedding).
    """
    model = onnx.load_from_string(fp32_text)
    weights = _text_weights(model)
    h = weights.hidden
    g = _Builder("cpu_text")
    tokens = graphs.TOKENS
    embedded = g.op("Gather", [g.const("embedding", weights.embedding.astype(np.float32)), tokens], "embedded")

    zero, one = g.const("zero", np.array(0, np.int64)), g.const("one", np.array(1, np.int64))
    lengths = g.op("ReduceSum", [g.op("Cast", [g.op("Not", [g.op("Equal", [tokens, zero])])], to=TensorProto.INT64),
                                 g.const("axis1", np.array([1], np.int64))], "lengths", keepdims=0)
    shape = g.op("Shape", [tokens])
    width = g.op("Gather", [shape, one], axis=0)
    # QUIRK kept from the FP32 graph: a row without tokens takes the last step.
    last = g.op("Where", [g.op("Greater", [lengths, zero]), g.op("Sub", [lengths, one]), g.op("Sub", [width, one])],
                "last")
    # Steps after every row's last real token change nothing that is kept: stop there.
    trips = g.op("Add", [g.op("ReduceMax", [last], keepdims=0), one], "trips")
    batch = g.op("Gather", [shape, g.const("axis0", np.array([0], np.int64))], axis=0)
    batch_scalar = g.op("Gather", [shape, zero], axis=0)
    axis1 = g.const("axis1", np.array([1], np.int64))
    state_shape = g.op("Concat", [batch, g.const("hidden", np.array([h], np.int64))], axis=0)
    h0 = g.op("ConstantOfShape", [state_shape], "h0", value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    if settings.large_batch_kernel is None:
        states = _recurrence(g, weights, settings.kernel, settings, embedded, trips, h0)  # [steps, B, H]
    else:
        small = g.op("Less", [batch_scalar, g.const("large_batch_from", np.array(settings.large_batch_from, np.int64))])
        states = g.op("If", [small], "gru_by_batch",
                      then_branch=_branch(weights, settings.kernel, settings, embedded, trips, h0, "small_batch"),
                      else_branch=_branch(weights, settings.large_batch_kernel, settings, embedded, trips, h0,
                                          "large_batch"))
    # Each row's state at its last real token: states[last[b], b, :].
    rows = g.op("Range", [zero, batch_scalar, one], "rows")
    picked = g.op("GatherND", [states, g.op("Concat", [g.op("Unsqueeze", [last, axis1]),
                                                       g.op("Unsqueeze", [rows, axis1])], axis=1)], "picked")

    head = _head(model, weights.gemm)
    gemm_input = weights.gemm.input[0]
    rename = {gemm_input: picked}
    values = _initializers(model)
    nodes = list(g.nodes)
    needed: set[str] = set()
    for node in head:
        inputs = [rename.get(name, name) for name in node.input]
        if node is weights.gemm and settings.quantize_output:
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            weight = values[node.input[1]]
            weight_kn = weight.T if attributes.get("transB", 0) else weight
            out = _matmul(g, picked, np.ascontiguousarray(weight_kn, np.float32), settings.kernel, settings.block_size,
                          "output")
            nodes = list(g.nodes)
            nodes.append(helper.make_node("Add", [out, node.input[2]], list(node.output), name="output_bias"))
            needed.add(node.input[2])
            continue
        nodes.append(helper.make_node(node.op_type, inputs, list(node.output), name=node.name or None,
                                      domain=node.domain or None))
        nodes[-1].attribute.extend(node.attribute)
        needed.update(name for name in node.input if name in values)
    kept = [init for init in model.graph.initializer if init.name in needed]
    graph = helper.make_graph(nodes, "galr_text_cpu_int8", list(model.graph.input), list(model.graph.output),
                              initializer=[*g.initializers, *kept])
    opsets = [helper.make_opsetid("", max(17, next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17))),
              helper.make_opsetid(MS_DOMAIN, 1)]
    out_model = helper.make_model(graph, opset_imports=opsets, producer_name="galr")
    out_model.ir_version = model.ir_version
    for prop in model.metadata_props:
        out_model.metadata_props.add(key=prop.key, value=prop.value)
    return out_model.SerializeToString()


__all__ = ["MS_DOMAIN", "RECURRENT_KERNELS", "CpuTextSettings", "build_cpu_text_graph"]
