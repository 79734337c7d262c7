"""FP32 ONNX -> mixed FP16 ONNX whose precision is in the graph (what TensorRT 11 requires).

TensorRT 11 removed the FP16 builder flag: a strongly typed network runs each layer in the type
the ONNX gives it. This pass puts the heavy compute (convolutions, matrix products, the GRU,
activations and data movement) in FP16 and keeps the numerically sensitive parts in FP32:
reductions (LayerNorm statistics, L2 norms), ``Pow``/``Sqrt``/``Div``/``Sub``, ``Softmax`` and
anything not listed. Graph inputs and outputs stay FP32, so callers never see FP16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from galr import graphs

# op type -> indices of inputs that carry the op's float data (the rest are shapes, scales, indices).
_FP16_OPS: dict[str, tuple[int, ...] | None] = {
    "Conv": None, "Gemm": None, "MatMul": None, "GRU": (0, 1, 2, 3, 5), "Relu": None, "Sigmoid": None,
    "MaxPool": None, "Resize": (0,), "Concat": None, "Flatten": None, "Reshape": (0,), "Transpose": None,
    "Squeeze": (0,), "Unsqueeze": (0,), "Slice": (0,), "Gather": (0,), "GatherElements": (0,),
    "Expand": (0,), "Add": None, "Mul": None,
}


@dataclass(frozen=True)
class Fp16Options:
    """Which ops run in FP16; ``keep_fp32_ops`` overrides the default list (e.g. ``("GRU",)``)."""

    keep_fp32_ops: tuple[str, ...] = ()


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = set()
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            floats.add(info.name)
    floats.update(i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.data_type == TensorProto.FLOAT:
            floats.add(node.output[0])
    return floats


def convert_to_fp16(model: onnx.ModelProto, options: Fp16Options = Fp16Options()) -> onnx.ModelProto:
    """Return a copy of an FP32 model with the compute ops in FP16 and FP32 inputs/outputs, stamped
    ``galr.precision = fp16``."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    floats = _float_tensors(model)
    initializers = {i.name: i for i in graph.initializer}
    dtype: dict[str, int] = {name: TensorProto.FLOAT for name in floats}
    casts: dict[tuple[str, int], str] = {}
    fp16_initializers: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            suffix = "fp16" if to == TensorProto.FLOAT16 else "fp32"
            out = f"{name}__{suffix}"
            new_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"Cast_{out}"))
            casts[key] = out
            dtype[out] = to
        return casts[key]

    def as_fp16(name: str) -> str:
        if name in initializers:  # convert weights once instead of casting at run time
            if name not in fp16_initializers:
                array = numpy_helper.to_array(initializers[name]).astype(np.float16)
                fp16_initializers[name] = f"{name}__fp16"
                graph.initializer.append(numpy_helper.from_array(array, fp16_initializers[name]))
                dtype[fp16_initializers[name]] = TensorProto.FLOAT16
            return fp16_initializers[name]
        return cast(name, TensorProto.FLOAT16)

    for node in graph.node:
        data_inputs = _FP16_OPS.get(node.op_type, ())
        run_fp16 = node.op_type in _FP16_OPS and node.op_type not in options.keep_fp32_ops
        target = TensorProto.FLOAT16 if run_fp16 else TensorProto.FLOAT
        for index, name in enumerate(node.input):
            if not name or name not in dtype:
                continue
            follows = data_inputs is None or index in data_inputs
            want = target if (run_fp16 and follows) else TensorProto.FLOAT
            if dtype[name] != want:
                node.input[index] = as_fp16(name) if want == TensorProto.FLOAT16 else cast(name, want)
        new_nodes.append(node)
        for name in node.output:
            if name in floats:
                dtype[name] = target

    # Graph outputs are promised as FP32: re-cast those produced in FP16.
    for output in graph.output:
        if dtype.get(output.name) == TensorProto.FLOAT16:
            inner = f"{output.name}__fp16_out"
            for node in new_nodes:
                node.output[:] = [inner if o == output.name else o for o in node.output]
                node.input[:] = [inner if i == output.name else i for i in node.input]
            new_nodes.append(helper.make_node("Cast", [inner], [output.name], to=TensorProto.FLOAT, name=f"Cast_{output.name}_out"))

    used = {i for node in new_nodes for i in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]  # stale float types; checkers and runtimes re-infer them
    graphs.stamp_metadata(model, {graphs.META_PRECISION: "fp16"})
    onnx.checker.check_model(model)
    return model
