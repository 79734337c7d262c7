"""A fake ``tensorrt`` module that records calls, for testing build and runner logic without a GPU.

It mimics the parts of TensorRT's Python API that galr uses, with the values of the real enums:

* ``NetworkDefinitionCreationFlag``: on 10.x ``EXPLICIT_BATCH = 0`` (deprecated, implicit) and
  ``STRONGLY_TYPED = 1``, so a strongly typed network is created with ``1 << 1``; 11.x keeps
  ``STRONGLY_TYPED = 1`` (accepted, ignored: every network is strongly typed) and drops EXPLICIT_BATCH.
* ``BuilderFlag``: on 11.x it has no precision members (FP16/INT8 were removed).
* ``nptype`` maps FLOAT, HALF, INT8, INT32, INT64, UINT8 and BOOL; BF16 has no numpy type.
* The ONNX parser reads network inputs from the real ONNX bytes (via ``onnx``), so profile checks
  run against the graph the test built, and, like TensorRT's, rejects a node it has no importer for
  (a custom domain, or an op type outside :data:`KNOWN_OPS`), naming it.
* ``Runtime.deserialize_cuda_engine`` returns the engine registered for those exact plan bytes
  (``engines``), else ``None`` as for a plan from another TensorRT version.

Every call lands in ``module.calls`` as ``(what, details...)`` tuples so tests can assert what the
code under test did.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

V10 = "10.16.1"
V11 = "11.4.0"


class _Enum:
    """A tiny enum value: prints like TensorRT's (``DataType.FLOAT``) and converts to int."""

    def __init__(self, owner: str, name: str, value: int) -> None:
        self.owner, self.name, self.value = owner, name, value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"{self.owner}.{self.name}"

    __str__ = __repr__


class _RecordingNamespace:
    """Enum-like namespace whose member lookups are recorded; unknown members raise AttributeError."""

    def __init__(self, owner: str, names: Sequence[str], calls: list) -> None:
        self._owner, self._calls = owner, calls
        self._members = {name: _Enum(owner, name, index) for index, name in enumerate(names)}

    def __getattr__(self, name: str) -> _Enum:
        if name.startswith("_"):
            raise AttributeError(name)
        self._calls.append((self._owner, name))
        try:
            return self._members[name]
        except KeyError:
            raise AttributeError(f"type object '{self._owner}' has no attribute '{name}'") from None


def _namespace(owner: str, names: Sequence[str]) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name: _Enum(owner, name, index) for index, name in enumerate(names)})


#: Op types the fake parser imports (the standard ops galr's graphs and the tests' graphs use).
KNOWN_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Tanh", "Conv", "Gemm", "MatMul", "MaxPool", "Concat", "Reshape",
    "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "GatherElements", "Expand", "Shape", "Cast", "Constant",
    "ReduceSum", "ReduceMean", "ReduceL2", "Pow", "Sqrt", "Softmax", "GRU", "Flatten", "Identity", "Greater",
    "Equal", "Where", "Clip", "Max", "Min", "QuantizeLinear", "DequantizeLinear", "Resize", "Range", "Not",
    "ConstantOfShape", "LayerNormalization", "Erf", "Neg", "Exp", "ScatterND", "NonZero", "TopK", "Less",
})


def _unknown_ops(onnx_bytes: bytes) -> list[str]:
    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    return [f"No importer registered for op: {node.op_type} (domain {node.domain!r}, node {node.name!r})"
            for node in graph.node if node.domain not in ("", "ai.onnx") or node.op_type not in KNOWN_OPS]


def _onnx_inputs(onnx_bytes: bytes) -> list[tuple[str, tuple[int, ...]]]:
    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = []
    for value in graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        inputs.append((value.name, tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)))
    return inputs


# ----------------------------------------------------------------------------------------------------
# Builder side


@dataclass
class FakeTensor:
    name: str
    shape: tuple[int, ...]


@dataclass
class FakeNetwork:
    flags: int
    inputs: list[FakeTensor] = field(default_factory=list)

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> FakeTensor:
        return self.inputs[index]


class FakeParserError:
    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


class FakeOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, min: Sequence[int], opt: Sequence[int], max: Sequence[int]) -> None:
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class FakeTimingCache:
    """Serialises as ``b"TIMING:<n>"`` where n counts the builds that used it."""

    def __init__(self, previous: bytes) -> None:
        text = bytes(previous).decode() if previous else "TIMING:0"
        self.builds = int(text.split(":")[1])

    def serialize(self) -> bytes:
        return f"TIMING:{self.builds}".encode()


class FakeBuilderConfig:
    def __init__(self, module: types.ModuleType) -> None:
        self._module = module
        self.flags: list[str] = []
        self.memory_limits: dict[str, int] = {}
        self.profiles: list[FakeOptimizationProfile] = []
        self.timing_cache: FakeTimingCache | None = None
        self.builder_optimization_level = 3

    def set_memory_pool_limit(self, pool: _Enum, size: int) -> None:
        self.memory_limits[pool.name] = size

    def set_flag(self, flag: _Enum) -> None:
        self.flags.append(flag.name)

    def add_optimization_profile(self, profile: FakeOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, previous: bytes) -> FakeTimingCache:
        self._module.calls.append(("create_timing_cache", bytes(previous)))
        return FakeTimingCache(previous)

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        accepted = not (self._module.reject_timing_cache and cache.builds > 0)
        if accepted:
            self.timing_cache = cache
        return accepted

    def get_timing_cache(self) -> FakeTimingCache | None:
        return self.timing_cache


class FakeBuilder:
    def __init__(self, module: types.ModuleType, logger: Any) -> None:
        self._module = module
        module.calls.append(("Builder",))
        module.builders.append(self)
        self.network: FakeNetwork | None = None
        self.config: FakeBuilderConfig | None = None

    def create_network(self, flags: int = 0) -> FakeNetwork:
        self._module.calls.append(("create_network", flags))
        self.network = FakeNetwork(flags)
        return self.network

    def create_builder_config(self) -> FakeBuilderConfig:
        self.config = FakeBuilderConfig(self._module)
        return self.config

    def create_optimization_profile(self) -> FakeOptimizationProfile:
        return FakeOptimizationProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeBuilderConfig) -> bytes | None:
        self._module.calls.append(("build_serialized_network",))
        if config.timing_cache is not None:
            config.timing_cache.builds += 1
        result = self._module.build_result
        return result(network) if callable(result) else result


class FakeOnnxParser:
    def __init__(self, module: types.ModuleType, network: FakeNetwork, logger: Any) -> None:
        self._module, self._network = module, network
        self._errors: list[FakeParserError] = []

    def parse(self, model: bytes, path: str | None = None) -> bool:
        self._module.calls.append(("parse", len(model)))
        messages = list(self._module.parse_errors) or _unknown_ops(bytes(model))
        self._errors = [FakeParserError(text) for text in messages]
        if self._errors:
            return False
        self._network.inputs = [FakeTensor(name, shape) for name, shape in _onnx_inputs(model)]
        return True

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> FakeParserError:
        return self._errors[index]


# ----------------------------------------------------------------------------------------------------
# Runtime side


@dataclass
class IOTensor:
    """One engine I/O tensor; ``profile`` is (min, opt, max) for dynamic inputs."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    is_input: bool
    profile: tuple | None = None


class FakeExecutionContext:
    """Records shapes and addresses; ``execute_async_v3`` runs the engine's ``compute`` on ``memory``."""

    def __init__(self, engine: "FakeEngine") -> None:
        self.engine = engine
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.executions = 0

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
        self.engine.module.calls.append(("set_input_shape", name, tuple(shape)))
        self.input_shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        tensor = self.engine.tensors[name]
        if tensor.is_input:
            return self.input_shapes.get(name, tensor.shape)
        # Outputs here are [batch, ...]: the batch comes from the first input.
        batch = next(iter(self.input_shapes.values()))[0] if self.input_shapes else -1
        return tuple(batch if size < 0 else size for size in tensor.shape)

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.engine.module.calls.append(("set_tensor_address", name))
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.engine.module.calls.append(("execute_async_v3", stream_handle))
        self.executions += 1
        engine = self.engine
        if engine.compute is None or engine.memory is None:
            return engine.module.execute_result
        feeds = {name: engine.memory[self.addresses[name]] for name, t in engine.tensors.items() if t.is_input}
        for name, value in engine.compute(feeds).items():
            engine.memory[self.addresses[name]][...] = value
        return engine.module.execute_result


class FakeEngine:
    def __init__(
        self,
        module: types.ModuleType,
        tensors: Sequence[IOTensor],
        compute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None,
        memory: dict[int, np.ndarray] | None,
    ) -> None:
        self.module = module
        self.tensors = {tensor.name: tensor for tensor in tensors}
        self.compute, self.memory = compute, memory

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, index: int) -> str:
        return list(self.tensors)[index]

    def get_tensor_mode(self, name: str) -> _Enum:
        modes = self.module.TensorIOMode
        return modes.INPUT if self.tensors[name].is_input else modes.OUTPUT

    def get_tensor_dtype(self, name: str) -> _Enum:
        return getattr(self.module.DataType, _TRT_TYPE_BY_NUMPY[self.tensors[name].dtype])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> tuple:
        assert profile_index == 0
        profile = self.tensors[name].profile
        if profile is None:
            raise RuntimeError(f"fake engine: no profile for '{name}'")
        return profile

    def create_execution_context(self) -> FakeExecutionContext:
        self.module.calls.append(("create_execution_context",))
        context = FakeExecutionContext(self)
        self.module.contexts.append(context)
        return context


class FakeRuntime:
    def __init__(self, module: types.ModuleType, logger: Any) -> None:
        self._module = module
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, plan: bytes) -> FakeEngine | None:
        self._module.calls.append(("deserialize_cuda_engine", self.engine_host_code_allowed))
        return self._module.engines.get(bytes(plan))


_TRT_TYPE_BY_NUMPY = {"float32": "FLOAT", "float16": "HALF", "int8": "INT8", "int32": "INT32", "int64": "INT64",
                      "uint8": "UINT8", "bool": "BOOL"}
_NUMPY_BY_TRT_TYPE = {trt_name: np_name for np_name, trt_name in _TRT_TYPE_BY_NUMPY.items()}


# ----------------------------------------------------------------------------------------------------
# The module


def make_fake_tensorrt(
    version: str = V10,
    *,
    parse_errors: Sequence[str] = (),
    build_result: bytes | None | Callable[[FakeNetwork], bytes | None] = b"FAKE-PLAN",
    reject_timing_cache: bool = False,
    io_tensors: Sequence[IOTensor] = (),
    engine_plan: bytes = b"FAKE-PLAN",
    compute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    memory: dict[int, np.ndarray] | None = None,
    execute_result: bool = True,
) -> types.ModuleType:
    """Build a fake ``tensorrt`` module.

    Args:
        version: ``__version__``; the major decides whether ``BuilderFlag`` has precision members.
        parse_errors: messages the ONNX parser reports (parse fails when non-empty).
        build_result: what ``build_serialized_network`` returns (``None`` = failed build), or a function
            of the network that returns it.
        reject_timing_cache: ``set_timing_cache`` refuses a non-empty cache (as for another GPU).
        io_tensors: the engine that ``Runtime.deserialize_cuda_engine`` returns for ``engine_plan``.
        engine_plan: bytes that deserialize; anything else gives ``None`` (version mismatch).
        compute: optional function the fake context runs on input arrays to fill outputs.
        memory: device-pointer -> host array registry shared with a fake CuPy, used with ``compute``.
        execute_result: what ``execute_async_v3`` returns.
    """
    module = types.ModuleType("tensorrt")
    module.__version__ = version
    module.calls = []
    module.builders = []
    module.contexts = []
    module.parse_errors = tuple(parse_errors)
    module.build_result = build_result
    module.reject_timing_cache = reject_timing_cache
    module.engine_plan = engine_plan
    module.execute_result = execute_result

    module.Logger = type("Logger", (), {"WARNING": 2, "INFO": 3, "ERROR": 1, "VERBOSE": 4,
                                        "__init__": lambda self, severity=2: None})
    major = int(version.split(".")[0])
    creation_flags = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if major < 11 else {"STRONGLY_TYPED": 1}
    module.NetworkDefinitionCreationFlag = types.SimpleNamespace(
        **{name: _Enum("NetworkDefinitionCreationFlag", name, value) for name, value in creation_flags.items()})
    flags = ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"]
    if major < 11:
        flags = ["FP16", "BF16", "INT8", *flags]
    module.BuilderFlag = _RecordingNamespace("BuilderFlag", flags, module.calls)
    module.MemoryPoolType = _namespace("MemoryPoolType", ["WORKSPACE"])
    module.TensorIOMode = _namespace("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    module.DataType = _namespace("DataType", list(_NUMPY_BY_TRT_TYPE) + ["BF16"])

    def nptype(trt_type: _Enum) -> type:
        if trt_type.name not in _NUMPY_BY_TRT_TYPE:
            raise TypeError(f"could not resolve {trt_type} to a numpy type")
        return np.dtype(_NUMPY_BY_TRT_TYPE[trt_type.name]).type

    module.nptype = nptype
    module.Builder = lambda logger: FakeBuilder(module, logger)
    module.OnnxParser = lambda network, logger: FakeOnnxParser(module, network, logger)
    module.Runtime = lambda logger: FakeRuntime(module, logger)
    module.engine = FakeEngine(module, io_tensors, compute, memory)
    module.engines = {engine_plan: module.engine}
    return module


def add_engine(module: types.ModuleType, plan: bytes, io_tensors: Sequence[IOTensor],
               compute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
               memory: dict[int, np.ndarray] | None = None) -> FakeEngine:
    """Register another engine that ``deserialize_cuda_engine`` returns for exactly ``plan``."""
    engine = FakeEngine(module, io_tensors, compute, memory)
    module.engines[bytes(plan)] = engine
    return engine


def called(module: types.ModuleType, what: str) -> list[tuple]:
    """The recorded calls named ``what``."""
    return [call for call in module.calls if call[0] == what]
