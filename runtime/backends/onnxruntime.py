"""ONNX Runtime runner: CPU, CUDA or TensorRT execution provider, with no silent fallback.

``onnxruntime-gpu`` quietly returns a CPU session when CUDA, cuDNN or TensorRT libraries are missing,
even when only ``CUDAExecutionProvider`` was asked for (deployment notes §2.5). This runner compares the
providers the session really has with the ones requested and raises
:class:`~galr.runtime.backends.base.BackendUnavailableError` instead of running slowly on the CPU.

``BACKEND`` registers it (:mod:`galr.runtime.backends.registry`) for the CPU and CUDA devices.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

import numpy as np

from galr import graphs
from galr.errors import InputError
from galr.runtime.backends.base import (
    BackendUnavailableError,
    Runner,
    RunnerError,
    TensorSpec,
)
from galr.runtime.backends.registry import (
    Backend,
    BackendOptions,
    Environment,
    RunnerRequest,
)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"

ORT_DEVICES = ("cpu", "cuda", "tensorrt")
PROVIDERS_BY_DEVICE: dict[str, tuple[str, ...]] = {
    "cpu": (CPU_PROVIDER,),
    "cuda": (CUDA_PROVIDER, CPU_PROVIDER),
    "tensorrt": (TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER),
}

ORT_TYPE_TO_DTYPE: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}

GRAPH_OPTIMIZATION_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def import_onnxruntime() -> ModuleType:
    """Import ``onnxruntime`` or explain which extra provides it.

    Raises:
        ImportError: when neither ``onnxruntime`` nor ``onnxruntime-gpu`` is installed.
    """
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as error:
        raise ImportError(
            "the onnxruntime backend needs ONNX Runtime: `pip install galr[cpu]` (CPU) or "
            "`pip install galr[gpu]` (CUDA/TensorRT); install only one of the two, they clash"
        ) from error


@dataclass(frozen=True)
class OnnxRuntimeOptions(BackendOptions):
    """Session and execution-provider settings.

    Attributes:
        intra_op_threads: threads inside one operator; 0 lets ONNX Runtime choose (all cores).
        graph_optimization: ``"disable" | "basic" | "extended" | "all"``.
        device_id: CUDA device index for the CUDA and TensorRT providers.
        trt_fp16: let the TensorRT provider pick FP16 kernels (weak typing, so only a provider built on
            TensorRT 10 honours it; with TensorRT 11 give an FP16 ONNX instead).
        trt_engine_cache_dir: where the TensorRT provider keeps built engines; ``None`` disables the cache.
            Key this directory by GPU and TensorRT version, the provider does not.
        trt_timing_cache_dir: where the TensorRT provider keeps its timing cache; ``None`` disables it.
        trt_max_workspace_bytes: TensorRT builder workspace; ``None`` keeps the provider default.
        allow_spinning: whether ONNX Runtime's intra-op threads spin after their work (``None``: ONNX
            Runtime's default, on). On an idle 2-core box spinning is faster (the int8-cpu text
            graph: 4.6 vs 6.6 ms per query); on a box shared with other busy processes it steals their
            cores and turning it off was faster (13 vs 24 ms), so it is the deployer's choice.
    """

    intra_op_threads: int = 0
    graph_optimization: str = "all"
    device_id: int = 0
    trt_fp16: bool = False
    trt_engine_cache_dir: str | None = None
    trt_timing_cache_dir: str | None = None
    trt_max_workspace_bytes: int | None = None
    allow_spinning: bool | None = None

    backend = "onnxruntime"

    def __post_init__(self) -> None:
        if self.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise InputError(
                f"graph_optimization must be one of {sorted(GRAPH_OPTIMIZATION_LEVELS)}, "
                f"got {self.graph_optimization!r}"
            )
        if self.intra_op_threads < 0:
            raise InputError(f"intra_op_threads must be >= 0, got {self.intra_op_threads}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "OnnxRuntimeOptions":
        return cls(**dict(data))

    def tensorrt_provider_options(self) -> dict[str, Any]:
        """Options for ``TensorrtExecutionProvider`` (names as in onnxruntime-gpu 1.31)."""
        options: dict[str, Any] = {"device_id": self.device_id, "trt_fp16_enable": self.trt_fp16}
        if self.trt_engine_cache_dir is not None:
            options["trt_engine_cache_enable"] = True
            options["trt_engine_cache_path"] = str(self.trt_engine_cache_dir)
        if self.trt_timing_cache_dir is not None:
            options["trt_timing_cache_enable"] = True
            options["trt_timing_cache_path"] = str(self.trt_timing_cache_dir)
        if self.trt_max_workspace_bytes is not None:
            options["trt_max_workspace_size"] = int(self.trt_max_workspace_bytes)
        return options


def provider_list(device: str, options: OnnxRuntimeOptions) -> list[tuple[str, dict[str, Any]]]:
    """The ``(provider, options)`` list handed to ``InferenceSession`` for a device.

    Raises:
        ValueError: for a device outside ``ORT_DEVICES``.
    """
    if device not in PROVIDERS_BY_DEVICE:
        raise InputError(f"onnxruntime device must be one of {list(ORT_DEVICES)}, got {device!r}")
    per_provider = {
        CPU_PROVIDER: {},
        CUDA_PROVIDER: {"device_id": options.device_id},
        TENSORRT_PROVIDER: options.tensorrt_provider_options(),
    }
    return [(name, per_provider[name]) for name in PROVIDERS_BY_DEVICE[device]]


def _gpu_fix_hint() -> str:
    return (
        "install the GPU build with `pip install galr[gpu]` (onnxruntime-gpu; uninstall plain onnxruntime "
        "first), and check that its CUDA and cuDNN versions match the installed libraries and driver "
        "(onnxruntime-gpu 1.31 needs CUDA 13 and cuDNN 9; the TensorRT provider needs TensorRT 10 libraries); "
        "or run on the CPU with device='cpu'"
    )


def check_providers(device: str, requested: list[str], active: list[str]) -> None:
    """Fail loudly when ONNX Runtime fell back from the provider that ``device`` needs.

    Args:
        device: the device asked for (``"cpu"``, ``"cuda"`` or ``"tensorrt"``).
        requested: provider names passed to the session, preferred first.
        active: ``session.get_providers()``.

    Raises:
        BackendUnavailableError: when the first requested provider is not active.
    """
    wanted = requested[0]
    if wanted in active:
        return
    raise BackendUnavailableError(
        f"onnxruntime device '{device}' asked for providers {requested} but the session runs on {active}: "
        f"{wanted} could not be loaded (ONNX Runtime falls back silently; its log above names the missing "
        f"library). Fix: {_gpu_fix_hint()}"
    )


def _check_available(ort: ModuleType, device: str, requested: list[str]) -> None:
    available = list(ort.get_available_providers())
    if requested[0] not in available:
        raise BackendUnavailableError(
            f"onnxruntime device '{device}' needs {requested[0]}, but this ONNX Runtime build only has "
            f"{available}. Fix: {_gpu_fix_hint()}"
        )


def _session_options(ort: ModuleType, options: OnnxRuntimeOptions) -> Any:
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = options.intra_op_threads
    level_name = GRAPH_OPTIMIZATION_LEVELS[options.graph_optimization]
    session_options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level_name)
    if options.allow_spinning is not None:
        session_options.add_session_config_entry("session.intra_op.allow_spinning",
                                                 "1" if options.allow_spinning else "0")
    return session_options


def create_session(
    model: bytes | str | os.PathLike[str],
    device: str = "cpu",
    options: OnnxRuntimeOptions | None = None,
) -> Any:
    """Create an ``InferenceSession`` on ``device`` and verify it really runs there.

    Args:
        model: serialized ONNX bytes (as a bundle hands them) or a path to an ``.onnx`` file.
        device: ``"cpu"``, ``"cuda"`` or ``"tensorrt"`` (ONNX Runtime's TensorRT execution provider).
        options: session and provider settings; defaults to :class:`OnnxRuntimeOptions()`.

    Returns:
        The ``onnxruntime.InferenceSession``.

    Raises:
        ImportError: when ONNX Runtime is not installed.
        ValueError: for an unknown device.
        FileNotFoundError: when ``model`` is a path that does not exist.
        BackendUnavailableError: when the provider for ``device`` is missing or was silently dropped.
        RunnerError: when ONNX Runtime rejects the model.
    """
    options = options or OnnxRuntimeOptions()
    providers = provider_list(device, options)
    ort = import_onnxruntime()
    requested = [name for name, _ in providers]
    _check_available(ort, device, requested)
    if isinstance(model, (bytes, bytearray, memoryview)):
        source: bytes | str = bytes(model)
        label = f"<{len(source)} bytes of ONNX>"
    else:
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model file not found: {path}")
        source, label = str(path), str(path)
    try:
        session = ort.InferenceSession(source, sess_options=_session_options(ort, options), providers=providers)
    except Exception as error:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise RunnerError(f"onnxruntime could not load {label}: {error}") from error
    check_providers(device, requested, list(session.get_providers()))
    return session


def tensor_specs(node_args: list[Any]) -> list[TensorSpec]:
    """ONNX Runtime ``NodeArg`` metadata -> :class:`TensorSpec` (dynamic dims keep their name or ``None``).

    Raises:
        RunnerError: for an element type the runtime does not handle.
    """
    specs = []
    for arg in node_args:
        dtype = ORT_TYPE_TO_DTYPE.get(arg.type)
        if dtype is None:
            raise RunnerError(
                f"tensor '{arg.name}' has ONNX type {arg.type}; supported: {sorted(ORT_TYPE_TO_DTYPE)}"
            )
        shape = tuple(dim if isinstance(dim, (int, str)) else None for dim in arg.shape)
        specs.append(TensorSpec(arg.name, dtype, shape))
    return specs


class OnnxRuntimeRunner(Runner):
    """Run one ONNX graph with ONNX Runtime.

    The session is created (and its providers verified) in the constructor, so a missing GPU provider
    fails when the runner is made, not at the first query. ``close()`` drops the session;
    ``activate()`` re-creates it.

    Example:
        >>> with OnnxRuntimeRunner(onnx_bytes, device="cpu") as runner:   # doctest: +SKIP
        ...     out = runner.infer({"tokens": tokens})["text_embedding"]
    """

    name = "onnxruntime"

    def __init__(
        self,
        model: bytes | str | os.PathLike[str],
        device: str = "cpu",
        options: OnnxRuntimeOptions | None = None,
    ) -> None:
        """Create the session.

        Args:
            model: serialized ONNX bytes or a path to an ``.onnx`` file.
            device: ``"cpu"``, ``"cuda"`` or ``"tensorrt"``.
            options: session and provider settings.

        Raises:
            ImportError, ValueError, FileNotFoundError, BackendUnavailableError, RunnerError: as
            :func:`create_session`.
        """
        self.device = device
        self.options = options or OnnxRuntimeOptions()
        self._model = model
        self._session: Any = create_session(model, device, self.options)
        super().__init__(tensor_specs(self._session.get_inputs()), tensor_specs(self._session.get_outputs()))

    @property
    def session(self) -> Any:
        """The live ``InferenceSession`` (e.g. for IO binding), or ``None`` after :meth:`close`."""
        return self._session

    @property
    def providers(self) -> list[str]:
        """Execution providers the live session uses, preferred first (empty when closed)."""
        return list(self._session.get_providers()) if self._session is not None else []

    def _activate(self) -> None:
        if self._session is None:
            self._session = create_session(self._model, self.device, self.options)

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = list(self.outputs)
        try:
            values = self._session.run(names, feeds)
        except Exception as error:  # shape errors inside the graph surface as ORT exceptions
            raise RunnerError(f"onnxruntime failed on inputs {self._describe(feeds)}: {error}") from error
        return dict(zip(names, values))

    @staticmethod
    def _describe(feeds: Mapping[str, np.ndarray]) -> str:
        return ", ".join(f"{name} {value.dtype}{list(value.shape)}" for name, value in feeds.items())

    def _close(self) -> None:
        self._session = None


def _probe(device: str, environment: Environment) -> str | None:
    if environment.onnxruntime_providers is None:
        return "onnxruntime not installed"
    if device == "cuda":
        if CUDA_PROVIDER not in environment.onnxruntime_providers:
            return "this onnxruntime has no CUDA provider (CPU build)"
        if environment.gpu is None:
            return "no CUDA GPU visible"
    return None


def _make_runners(request: RunnerRequest) -> dict[str, Runner]:
    options = request.options if isinstance(request.options, OnnxRuntimeOptions) else None
    return {name: request.stack.enter_context(
                OnnxRuntimeRunner(request.bundle.onnx_bytes(name, request.precision), request.device, options))
            for name in graphs.GRAPH_NAMES}


BACKEND = Backend(
    name="onnxruntime", devices=("cuda", "cpu"), rank=20, probe=_probe, make_runners=_make_runners,
    fix="install ONNX Runtime: `pip install galr[cpu]` (CPU) or `pip install galr[gpu]` (onnxruntime-gpu, CUDA; "
        "replaces plain onnxruntime) with CUDA and cuDNN versions matching it"
)


__all__ = [
    "BACKEND",
    "OnnxRuntimeOptions",
    "OnnxRuntimeRunner",
    "check_providers",
    "create_session",
    "import_onnxruntime",
    "provider_list",
    "tensor_specs",
]
