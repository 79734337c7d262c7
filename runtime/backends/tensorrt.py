"""TensorRT runner for a serialized engine (``.plan`` bytes), and the ``tensorrt`` backend.

Only the name-based I/O API of TensorRT 10 is used (``num_io_tensors``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``); TensorRT 11 keeps those names, so one code path serves
both. Device memory and the CUDA stream come from CuPy, so the runtime stays torch-free.

A plan only loads on the TensorRT build and GPU architecture that made it (deployment notes §1.5):
the backend picks the bundle's engine set whose :class:`~galr.bundle.EngineKey` fits this machine
(:func:`~galr.bundle.select_engine_entry`) before TensorRT would fail with an opaque assertion.
Nothing here has been executed on a real GPU in this project; it is tested against a fake
``tensorrt`` module.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Sequence

import numpy as np

from galr import graphs
from galr.bundle.engines import (
    REBUILD_COMMAND,
    EngineMismatchError,
    select_engine_entry,
)
from galr.errors import InputError
from galr.runtime.backends.base import (
    BackendUnavailableError,
    Runner,
    RunnerError,
    TensorSpec,
)
from galr.runtime.backends.device import GpuInfo, probe_gpu
from galr.runtime.backends.registry import (
    Backend,
    BackendOptions,
    Environment,
    RunnerRequest,
)

DEFAULT_MAX_CACHED_SHAPES = 4


def import_tensorrt() -> ModuleType:
    """Import ``tensorrt`` or explain how to get it.

    Raises:
        ImportError: naming the extra and the GPU requirement.
    """
    try:
        return importlib.import_module("tensorrt")
    except ImportError as error:
        raise ImportError(
            f"the tensorrt backend needs the TensorRT Python package ({error}): `pip install galr[tensorrt]` "
            "(downloads from NVIDIA's package index) on a machine with an NVIDIA GPU and driver; "
            "otherwise use the onnxruntime backend"
        ) from error


def import_cupy() -> ModuleType:
    """Import ``cupy`` (device memory and streams for the TensorRT runner).

    Raises:
        ImportError: naming the ``galr[gpu]`` extra.
    """
    try:
        return importlib.import_module("cupy")
    except ImportError as error:
        raise ImportError(
            "the tensorrt backend allocates GPU memory with CuPy: `pip install galr[tensorrt]` installs "
            "cupy-cuda13x (CUDA 13); for another CUDA major version install the matching cupy-cudaNNx wheel"
        ) from error


def tensorrt_major(trt: ModuleType) -> int:
    """Major version of a ``tensorrt`` module (``"10.16.1.11"`` -> 10).

    Raises:
        RuntimeError: when ``__version__`` is missing or malformed.
    """
    version = str(getattr(trt, "__version__", ""))
    head = version.split(".")[0]
    if not head.isdigit():
        raise RuntimeError(f"cannot read the TensorRT major version from __version__={version!r}")
    return int(head)


# ----------------------------------------------------------------------------------------------------
# Runner


@dataclass(frozen=True)
class ProfileRange:
    """Shapes an engine input accepts (optimization profile 0)."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(
            low <= size <= high for low, size, high in zip(self.min, shape, self.max)
        )

    def check(self, shape: Sequence[int]) -> None:
        """Raise :class:`RunnerError` naming the input, the shape and the accepted range."""
        if self.contains(shape):
            return
        rest_fits = len(shape) == len(self.min) and self.contains((self.min[0], *shape[1:]))
        if rest_fits and shape[0] > self.max[0]:
            advice = f"split the batch into chunks of at most {self.max[0]} rows"
        elif rest_fits:
            advice = f"send at least {self.min[0]} row(s)"
        else:
            advice = "rebuild the engine with a profile that covers it (`galr-build` with wider limits)"
        raise RunnerError(
            f"input '{self.name}' has shape {list(shape)}, outside the engine's optimization profile "
            f"(min {list(self.min)}, max {list(self.max)}); {advice}"
        )


def _dims(value: Any) -> tuple[int, ...]:
    return tuple(int(size) for size in value)


def _numpy_dtype(trt: ModuleType, name: str, trt_dtype: Any) -> np.dtype:
    try:
        return np.dtype(trt.nptype(trt_dtype))
    except TypeError as error:  # e.g. BF16 has no numpy type
        raise RunnerError(f"engine tensor '{name}' has TensorRT type {trt_dtype} with no numpy equivalent") from error


class TensorRTRunner(Runner):
    """Run a serialized TensorRT engine on the first CUDA GPU.

    Device buffers are allocated once per distinct combination of input shapes and reused; the most
    recent ``max_cached_shapes`` combinations are kept. Inputs outside the engine's optimization
    profile are refused with the accepted range; callers split batches to :attr:`max_batch_size`.

    Args:
        engine: the serialized plan.
        allow_host_code: set for engines built ``VERSION_COMPATIBLE`` (they embed a lean runtime).
        max_cached_shapes: how many shape combinations keep their device buffers.
        trt: the ``tensorrt`` module (tests inject a fake); imported when ``None``.
        cupy: the ``cupy`` module (tests inject a fake); imported when ``None``.
        gpu_probe: returns the visible GPU or ``None``; checked before any TensorRT object is made.

    Raises:
        ImportError: when TensorRT or CuPy is missing.
        BackendUnavailableError: when no GPU is visible.
        EngineMismatchError: when TensorRT cannot deserialize the plan (built elsewhere).
    """

    name = "tensorrt"
    thread_safe = False  # one execution context: concurrent enqueues would share its buffers

    def __init__(
        self,
        engine: bytes,
        *,
        allow_host_code: bool = False,
        max_cached_shapes: int = DEFAULT_MAX_CACHED_SHAPES,
        trt: ModuleType | None = None,
        cupy: ModuleType | None = None,
        gpu_probe: Callable[[], GpuInfo | None] = probe_gpu,
    ) -> None:
        if max_cached_shapes < 1:
            raise InputError(f"max_cached_shapes must be at least 1, got {max_cached_shapes}")
        self._trt = trt if trt is not None else import_tensorrt()
        self._cupy = cupy if cupy is not None else import_cupy()
        self.gpu = gpu_probe()
        if self.gpu is None:
            raise BackendUnavailableError(
                "the tensorrt backend needs a CUDA GPU and none is visible (checked with CuPy and nvidia-smi); "
                "use the onnxruntime backend on this machine"
            )
        self.max_cached_shapes = max_cached_shapes
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)
        runtime = self._trt.Runtime(self._logger)
        if allow_host_code:
            runtime.engine_host_code_allowed = True
        self._engine = runtime.deserialize_cuda_engine(bytes(engine))
        if self._engine is None:
            raise EngineMismatchError(
                f"TensorRT {self._trt.__version__} could not deserialize the engine ({len(engine)} bytes); "
                "plans only load on the TensorRT version and GPU architecture that built them. "
                f"Rebuild with `{REBUILD_COMMAND.format(bundle='<bundle>')}`"
            )
        inputs, outputs, self.profiles = self._read_io()
        super().__init__(inputs, outputs)
        self._context: Any = None
        self._stream: Any = None
        # Input-shape combination -> device arrays for every I/O tensor, least recently used first.
        self._buffers: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self._bound_key: tuple | None = None

    def _read_io(self) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, ProfileRange]]:
        trt, engine = self._trt, self._engine
        inputs, outputs, profiles = [], [], {}
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            dims = _dims(engine.get_tensor_shape(name))
            spec = TensorSpec(
                name,
                _numpy_dtype(trt, name, engine.get_tensor_dtype(name)).name,
                tuple(None if size < 0 else size for size in dims),
            )
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(spec)
                if any(size < 0 for size in dims):
                    low, opt, high = (_dims(shape) for shape in engine.get_tensor_profile_shape(name, 0))
                else:
                    low = opt = high = dims
                profiles[name] = ProfileRange(name, low, opt, high)
            else:
                outputs.append(spec)
        return inputs, outputs, profiles

    @property
    def max_batch_size(self) -> int | None:
        """Largest batch every input's profile accepts, or ``None`` when no input has a dynamic batch axis."""
        limits = [profile.max[0] for name, profile in self.profiles.items() if self.inputs[name].shape[:1] == (None,)]
        return min(limits) if limits else None

    @property
    def cached_shape_count(self) -> int:
        """How many input-shape combinations currently hold device buffers."""
        return len(self._buffers)

    def _activate(self) -> None:
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RunnerError("TensorRT could not create an execution context (out of GPU memory?)")
        self._stream = self._cupy.cuda.Stream(non_blocking=True)

    def _buffers_for(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
        """Device arrays for these input shapes, bound to the context (allocated on first sight)."""
        key = tuple(shapes.items())
        if key == self._bound_key:
            return self._buffers[key]
        self._bound_key = None  # the context's shapes change below; a failure must not leave a stale binding
        for name, shape in shapes.items():
            if self._context.set_input_shape(name, shape) is False:
                raise RunnerError(f"TensorRT rejected shape {list(shape)} for input '{name}'")
        cached = self._buffers.get(key)
        if cached is None:
            output_shapes = {name: _dims(self._context.get_tensor_shape(name)) for name in self.outputs}
            for name, shape in output_shapes.items():
                if any(size < 0 for size in shape):
                    raise RunnerError(f"output '{name}' has a data-dependent shape {list(shape)}; not supported")
            specs = {**self.inputs, **self.outputs}
            cached = {
                name: self._cupy.empty(shape, dtype=specs[name].dtype)
                for name, shape in {**shapes, **output_shapes}.items()
            }
            self._buffers[key] = cached
            while len(self._buffers) > self.max_cached_shapes:
                self._buffers.popitem(last=False)
        self._buffers.move_to_end(key)
        for name, array in cached.items():
            self._context.set_tensor_address(name, int(array.data.ptr))
        self._bound_key = key
        return cached

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = {name: tuple(feeds[name].shape) for name in self.inputs}
        for name, shape in shapes.items():
            self.profiles[name].check(shape)
        buffers = self._buffers_for(shapes)
        for name in self.inputs:
            buffers[name].set(feeds[name], stream=self._stream)
        if not self._context.execute_async_v3(self._stream.ptr):
            raise RunnerError(f"TensorRT refused to enqueue the engine for input shapes {shapes}")
        self._stream.synchronize()
        return {name: buffers[name].get(stream=self._stream) for name in self.outputs}

    def _close(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        self._buffers.clear()
        self._bound_key = None
        self._context = None
        self._stream = None


@dataclass(frozen=True)
class TensorRTOptions(BackendOptions):
    """Settings of the ``tensorrt`` backend.

    Attributes:
        allow_host_code: set for engines built ``VERSION_COMPATIBLE`` (they embed a lean runtime).
        max_cached_shapes: input-shape combinations that keep their device buffers, per graph.
        trt: the ``tensorrt`` module to use (tests inject a fake); imported when ``None``.
        cupy: the ``cupy`` module to use (tests inject a fake); imported when ``None``.
        gpu_probe: returns the visible GPU or ``None`` (tests inject one).
    """

    allow_host_code: bool = False
    max_cached_shapes: int = DEFAULT_MAX_CACHED_SHAPES
    trt: ModuleType | None = None
    cupy: ModuleType | None = None
    gpu_probe: Callable[[], GpuInfo | None] = probe_gpu

    backend = "tensorrt"


def _probe(device: str, environment: Environment) -> str | None:
    if environment.tensorrt is None:
        return "TensorRT not installed"
    if environment.gpu is None:
        return "no CUDA GPU visible"
    if not environment.cupy_available:
        return "CuPy not installed (the TensorRT runner's GPU memory)"
    return None


def _make_runners(request: RunnerRequest) -> dict[str, Runner]:
    options = request.options if isinstance(request.options, TensorRTOptions) else TensorRTOptions()
    gpu = options.gpu_probe() if options.trt is not None else request.environment.gpu
    version = str(options.trt.__version__) if options.trt is not None else request.environment.tensorrt.version
    if gpu is None:
        raise BackendUnavailableError("the tensorrt backend needs a CUDA GPU and none is visible; use onnxruntime")
    entry = select_engine_entry(request.bundle, request.precision, gpu.compute_capability, version)
    allow_host_code = options.allow_host_code or entry.version_compatible
    return {name: request.stack.enter_context(TensorRTRunner(
                request.bundle.read_member(entry.members[name]), allow_host_code=allow_host_code,
                max_cached_shapes=options.max_cached_shapes, trt=options.trt, cupy=options.cupy,
                gpu_probe=options.gpu_probe))
            for name in graphs.GRAPH_NAMES}


BACKEND = Backend(
    name="tensorrt", devices=("cuda",), rank=10, probe=_probe, make_runners=_make_runners,
    fix="install TensorRT and CuPy with `pip install galr[tensorrt]` on a machine whose NVIDIA GPU shows in "
        "nvidia-smi, build engines with `galr-build`, or choose backend 'onnxruntime'"
)


__all__ = [
    "BACKEND",
    "ProfileRange",
    "TensorRTOptions",
    "TensorRTRunner",
    "import_cupy",
    "import_tensorrt",
    "tensorrt_major",
]
