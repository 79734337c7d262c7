"""Build TensorRT engines from ONNX bytes, for TensorRT 10 and 11.

TensorRT 11 removed weak typing: there is no ``BuilderFlag.FP16``/``INT8`` and no INT8 calibrator;
every network is strongly typed, so reduced precision must already be in the ONNX (an FP16 graph, or
explicit INT8 Q/DQ nodes from galr's calibration). TensorRT 10 builds the same strongly typed networks;
only an FP32 graph built as FP16 takes the legacy ``BuilderFlag.FP16`` path there (deployment notes §0,
§1.2, §1.4). Implicit INT8 calibration is not supported on either version.

The ``tensorrt`` module is a parameter of :func:`build_engine` so the whole build logic is tested with a
fake; a real build needs an NVIDIA GPU, and no ``Builder`` is constructed unless one is visible.
Nothing here has been executed with a real TensorRT in this project.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

from galr.atomic import write_bytes_atomically
from galr.bundle import ENGINE_PRECISIONS
from galr.config import GaLRConfig
from galr.errors import InputError, UnavailableError
from galr.graphs import BATCH_AXIS, GRAPH_NAMES, TEXT_AXIS, graph_io
from galr.runtime.backends.device import GpuInfo, probe_gpu
from galr.runtime.backends.tensorrt import import_tensorrt, tensorrt_major
from galr.serialization import fields_from_dict

LOG = logging.getLogger(__name__)

DEFAULT_WORKSPACE_BYTES = 2 << 30
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
CALIBRATION_HINT = (
    "produce an explicit-quantization (Q/DQ) ONNX with galr's calibration (galr.calibration) and build that "
    "with precision='int8'"
)

Shape = tuple[int, ...]
ProfileShapes = tuple[Shape, Shape, Shape]


class TensorRTBuildError(UnavailableError):
    """An engine cannot be built here; the message says why and what to change."""


# ----------------------------------------------------------------------------------------------------
# Configuration


def _normalise_profile(name: str, shapes: Sequence[Sequence[int]]) -> ProfileShapes:
    if len(shapes) != 3:
        raise InputError(f"profile for input '{name}' must be (min, opt, max) shapes, got {len(shapes)} entries")
    low, opt, high = (tuple(int(size) for size in shape) for shape in shapes)
    if not len(low) == len(opt) == len(high):
        raise InputError(f"profile for input '{name}': min/opt/max ranks differ: {low}, {opt}, {high}")
    for axis, (a, b, c) in enumerate(zip(low, opt, high)):
        if not 1 <= a <= b <= c:
            raise InputError(
                f"profile for input '{name}' axis {axis} needs 1 <= min <= opt <= max, got {a}, {b}, {c}"
            )
    return low, opt, high


@dataclass(frozen=True)
class TensorRTBuildConfig:
    """How to build one engine.

    Attributes:
        precision: ``"fp32" | "fp16" | "int8"``; must match the precision the ONNX carries, except that an
            FP32 ONNX may be built as FP16 on TensorRT 10 (legacy weak typing).
        workspace_bytes: builder scratch memory limit (default 2 GiB).
        profiles: input name -> (min, opt, max) shapes; every dynamic input needs one.
        timing_cache: file to load the timing cache from and save it to; key it by GPU and TensorRT
            version, since a cache from another device is rejected.
        builder_optimization_level: 0-5 (TensorRT default 3); higher builds slower, may run faster.
        version_compatible: build a plan that later TensorRT runtimes can load (embeds a lean runtime,
            may run slower; load with ``allow_host_code=True``).
    """

    precision: str = "fp32"
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    # Left out of the hash (dicts are unhashable); equality still compares it.
    profiles: Mapping[str, ProfileShapes] = field(default_factory=dict, hash=False)
    timing_cache: str | None = None
    builder_optimization_level: int | None = None
    version_compatible: bool = False

    def __post_init__(self) -> None:
        if self.precision not in ENGINE_PRECISIONS:
            raise InputError(f"precision must be one of {list(ENGINE_PRECISIONS)}, got {self.precision!r}")
        if self.workspace_bytes <= 0:
            raise InputError(f"workspace_bytes must be positive, got {self.workspace_bytes}")
        if self.builder_optimization_level is not None and not 0 <= self.builder_optimization_level <= 5:
            raise InputError(f"builder_optimization_level must be 0-5, got {self.builder_optimization_level}")
        profiles = {str(name): _normalise_profile(str(name), shapes) for name, shapes in self.profiles.items()}
        object.__setattr__(self, "profiles", profiles)

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "workspace_bytes": self.workspace_bytes,
            "profiles": {name: [list(shape) for shape in shapes] for name, shapes in self.profiles.items()},
            "timing_cache": self.timing_cache,
            "builder_optimization_level": self.builder_optimization_level,
            "version_compatible": self.version_compatible,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TensorRTBuildConfig":
        return cls(**fields_from_dict(cls, data, lists_to_tuples=False))


def default_profiles(
    graph_name: str,
    config: GaLRConfig,
    max_text_length: int,
    max_batch: int = 32,
    opt_batch: int = 8,
    opt_text_length: int = 32,
) -> dict[str, ProfileShapes]:
    """Optimization profiles for one of the four GaLR graphs.

    Batch runs 1..``max_batch`` (optimised for ``opt_batch``); the text graph's token axis runs
    1..``max_text_length`` (optimised for ``opt_text_length``); every other axis is fixed by ``config``.

    Args:
        graph_name: ``"global" | "local" | "fusion" | "text"``.
        config: the model dimensions.
        max_text_length: longest token sequence: the model's ``PreprocessSpec.max_text_length``.
        max_batch: largest batch the engine accepts; the runtime splits larger batches.
        opt_batch: batch TensorRT tunes kernels for (clipped to ``max_batch``).
        opt_text_length: token length TensorRT tunes for (clipped to ``max_text_length``).

    Returns:
        Input name -> (min, opt, max) shapes.

    Raises:
        ValueError: for an unknown graph or non-positive limits.
    """
    if graph_name not in GRAPH_NAMES:
        raise InputError(f"unknown graph {graph_name!r}; valid graphs: {list(GRAPH_NAMES)}")
    if max_batch < 1 or max_text_length < 1:
        raise InputError(f"max_batch and max_text_length must be >= 1, got {max_batch}, {max_text_length}")
    ranges = {
        BATCH_AXIS: (1, min(max(opt_batch, 1), max_batch), max_batch),
        TEXT_AXIS: (1, min(max(opt_text_length, 1), max_text_length), max_text_length),
    }
    profiles = {}
    for name, _, shape in graph_io(config)[graph_name].inputs:
        low, opt, high = (
            tuple(ranges[dim][which] if isinstance(dim, str) else int(dim) for dim in shape) for which in range(3)
        )
        profiles[name] = (low, opt, high)
    return profiles


# ----------------------------------------------------------------------------------------------------
# What the ONNX carries, and how to build it


def _import_onnx() -> ModuleType:
    try:
        import onnx
    except ImportError as error:
        raise ImportError(
            "detecting an ONNX graph's precision needs the onnx package: `pip install galr[export]`, "
            "or pass source_precision= to build_engine"
        ) from error
    return onnx


def _subgraphs(onnx: ModuleType, node: Any) -> list[Any]:
    graphs = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            graphs.append(attribute.g)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attribute.graphs)
    return graphs


def _graph_precision(onnx: ModuleType, graph: Any) -> str:
    float16 = onnx.TensorProto.FLOAT16
    has_fp16 = any(tensor.data_type == float16 for tensor in graph.initializer)
    for value in (*graph.input, *graph.output, *graph.value_info):
        has_fp16 = has_fp16 or value.type.tensor_type.elem_type == float16
    for node in graph.node:
        if node.op_type in QDQ_OPS:
            return "int8"
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == float16:
                has_fp16 = True
            if node.op_type == "Constant" and attribute.type == onnx.AttributeProto.TENSOR:
                has_fp16 = has_fp16 or attribute.t.data_type == float16
        for subgraph in _subgraphs(onnx, node):
            inner = _graph_precision(onnx, subgraph)
            if inner == "int8":
                return inner
            has_fp16 = has_fp16 or inner == "fp16"
    return "fp16" if has_fp16 else "fp32"


def onnx_precision(onnx_bytes: bytes) -> str:
    """The precision an ONNX graph carries in itself.

    Args:
        onnx_bytes: the serialized model.

    Returns:
        ``"int8"`` if any ``QuantizeLinear``/``DequantizeLinear`` node is present (explicit quantization),
        else ``"fp16"`` if any FP16 initializer, constant, cast or tensor type is present, else ``"fp32"``.

    Raises:
        ImportError: when the ``onnx`` package is missing.
        TensorRTBuildError: when the bytes are not an ONNX model.
    """
    onnx = _import_onnx()
    try:
        model = onnx.load_from_string(bytes(onnx_bytes))
    except Exception as error:  # protobuf raises DecodeError and friends
        raise TensorRTBuildError(f"the {len(onnx_bytes)} bytes given are not a readable ONNX model: {error}") from error
    return _graph_precision(onnx, model.graph)


@dataclass(frozen=True)
class TypingPlan:
    """How the network is created: strongly typed, or weakly typed with ``BuilderFlag.FP16`` (TRT 10 only)."""

    strongly_typed: bool
    legacy_fp16_flag: bool


def plan_typing(trt_major: int, precision: str, source_precision: str) -> TypingPlan:
    """Decide strong vs weak typing from the TensorRT major, the requested and the ONNX precision.

    Raises:
        TensorRTBuildError: when the combination cannot be built, with what to do instead.
    """
    if trt_major < 10:
        raise TensorRTBuildError(f"TensorRT {trt_major}.x is not supported; install TensorRT 10 or 11")
    if precision == "int8" and source_precision != "int8":
        raise TensorRTBuildError(
            f"precision 'int8' needs an ONNX with Q/DQ nodes, but this graph is {source_precision}. galr does "
            f"not support implicit INT8 calibration (deprecated in TensorRT 10, removed in 11): {CALIBRATION_HINT}"
        )
    if precision == source_precision:
        return TypingPlan(strongly_typed=True, legacy_fp16_flag=False)
    if precision == "fp16" and source_precision == "fp32":
        if trt_major >= 11:
            raise TensorRTBuildError(
                "TensorRT 11 has no FP16 builder flag (networks are always strongly typed): export an FP16 ONNX "
                "first (galr's FP16 conversion / ModelOpt AutoCast) and build that, or build this graph as fp32"
            )
        LOG.warning("building FP16 with the legacy BuilderFlag.FP16 (weak typing; removed in TensorRT 11)")
        return TypingPlan(strongly_typed=False, legacy_fp16_flag=True)
    raise TensorRTBuildError(
        f"precision {precision!r} was requested but the ONNX graph carries {source_precision}; the network is "
        f"strongly typed, so build it with precision={source_precision!r} or give the {precision} ONNX"
    )


# ----------------------------------------------------------------------------------------------------
# Build


def _network_flags(trt: ModuleType, strongly_typed: bool) -> int:
    if not strongly_typed:
        return 0
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    # TensorRT 11 keeps the flag for compatibility and ignores it; a later release may drop it.
    return 0 if flag is None else 1 << int(flag)


def _parse(trt: ModuleType, network: Any, logger: Any, onnx_bytes: bytes) -> Any:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(bytes(onnx_bytes)):
        errors = [str(parser.get_error(index)) for index in range(parser.num_errors)]
        details = "\n  ".join(errors) or "(the parser gave no details)"
        raise TensorRTBuildError(f"TensorRT's ONNX parser rejected the graph ({len(errors)} error(s)):\n  {details}")
    return parser


def _add_profile(builder: Any, network: Any, build_config: Any, profiles: Mapping[str, ProfileShapes]) -> None:
    """Add optimization profile 0; every dynamic input must have one and every profile must name an input."""
    inputs = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        inputs[tensor.name] = tuple(int(size) for size in tensor.shape)
    unknown = sorted(set(profiles) - set(inputs))
    if unknown:
        raise TensorRTBuildError(f"profiles given for {unknown}, which are not network inputs {sorted(inputs)}")
    dynamic = [name for name, shape in inputs.items() if any(size < 0 for size in shape)]
    missing = sorted(set(dynamic) - set(profiles))
    if missing:
        raise TensorRTBuildError(
            f"dynamic inputs {missing} need an optimization profile (min, opt, max); see default_profiles()"
        )
    if not profiles:
        return
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profiles.items():
        shape = inputs[name]
        fixed_ok = len(shape) == len(low) and all(size < 0 or size == low[axis] == high[axis]
                                                    for axis, size in enumerate(shape))
        if not fixed_ok:
            raise TensorRTBuildError(
                f"profile for input '{name}' (min {list(low)}, max {list(high)}) does not fit its network shape "
                f"{list(shape)} (-1 = dynamic)"
            )
        profile.set_shape(name, low, opt, high)
    build_config.add_optimization_profile(profile)


def _load_timing_cache(build_config: Any, path: Path) -> Any:
    previous = path.read_bytes() if path.is_file() else b""
    cache = build_config.create_timing_cache(previous)
    if not build_config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another GPU/TensorRT is useless here; start afresh rather than fail the build.
        LOG.warning("timing cache %s was made on another device or TensorRT version; starting a new one", path)
        cache = build_config.create_timing_cache(b"")
        build_config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def build_engine(
    onnx_bytes: bytes,
    config: TensorRTBuildConfig,
    trt: ModuleType | None = None,
    *,
    source_precision: str | None = None,
    gpu_probe: Callable[[], GpuInfo | None] = probe_gpu,
) -> bytes:
    """Compile ONNX bytes into a serialized TensorRT engine (plan).

    Args:
        onnx_bytes: the serialized ONNX graph (external data is not supported).
        config: precision, workspace, profiles, timing cache.
        trt: the ``tensorrt`` module; imported when ``None`` (tests inject a fake).
        source_precision: the precision the ONNX carries, if known (e.g. from the bundle manifest);
            detected with :func:`onnx_precision` when ``None``.
        gpu_probe: returns the visible GPU or ``None``; no ``Builder`` is made without a GPU.

    Returns:
        The plan bytes, loadable by :class:`galr.runtime.backends.tensorrt.TensorRTRunner`.

    Raises:
        ImportError: when TensorRT (or onnx, for detection) is missing.
        TensorRTBuildError: for an unbuildable precision combination, no GPU, parser errors, bad profiles,
            or a failed build.
    """
    trt = trt if trt is not None else import_tensorrt()
    major = tensorrt_major(trt)
    if source_precision is None:
        source_precision = onnx_precision(onnx_bytes)
    elif source_precision not in ENGINE_PRECISIONS:
        raise InputError(f"source_precision must be one of {list(ENGINE_PRECISIONS)}, got {source_precision!r}")
    typing = plan_typing(major, config.precision, source_precision)
    if gpu_probe() is None:
        # Constructing a Builder without CUDA fails opaquely or aborts the process (deployment notes §1.7).
        raise TensorRTBuildError(
            "building a TensorRT engine needs an NVIDIA GPU with a working driver, and none is visible "
            "(checked with CuPy and nvidia-smi); build on the target GPU machine"
        )

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, typing.strongly_typed))
    _parse(trt, network, logger, onnx_bytes)

    build_config = builder.create_builder_config()
    build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    if typing.legacy_fp16_flag:
        build_config.set_flag(trt.BuilderFlag.FP16)
    if config.version_compatible:
        build_config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if config.builder_optimization_level is not None:
        build_config.builder_optimization_level = config.builder_optimization_level
    _add_profile(builder, network, build_config, config.profiles)
    cache_path = Path(config.timing_cache) if config.timing_cache else None
    cache = _load_timing_cache(build_config, cache_path) if cache_path else None

    plan = builder.build_serialized_network(network, build_config)
    if plan is None:
        raise TensorRTBuildError(
            "TensorRT returned no engine; its log above says why (typical causes: too little workspace, an "
            "unsupported layer for this precision, or a profile the graph cannot satisfy)"
        )
    if cache_path is not None:
        updated = build_config.get_timing_cache() or cache
        write_bytes_atomically(cache_path, bytes(updated.serialize()))
    return bytes(plan)


__all__ = [
    "DEFAULT_WORKSPACE_BYTES",
    "TensorRTBuildConfig",
    "TensorRTBuildError",
    "TypingPlan",
    "build_engine",
    "default_profiles",
    "onnx_precision",
    "plan_typing",
]
