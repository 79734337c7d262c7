"""Inference backends and the choice between them.

``resolve_backend("auto", "auto")`` picks the best backend this machine can run and says why, so the
CLI can print which one runs (e.g. ``"onnxruntime on CPU: TensorRT not installed"``). Importing this
package is cheap and torch-free: ONNX Runtime, TensorRT and CuPy are imported only when probed or used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from galr.runtime.backends.base import Runner, RunnerError, TensorSpec
from galr.runtime.backends.device import (
    BackendUnavailableError,
    GpuInfo,
    TensorRTInfo,
    probe_gpu,
    probe_tensorrt,
)

BACKENDS: tuple[str, ...] = ("tensorrt", "onnxruntime")
REQUESTABLE_BACKENDS: tuple[str, ...] = ("auto", *BACKENDS)
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")

_CUDA_PROVIDER = "CUDAExecutionProvider"
_LAZY_EXPORTS = {
    "OnnxRuntimeRunner": "galr.runtime.backends.onnxruntime",
    "OnnxRuntimeOptions": "galr.runtime.backends.onnxruntime",
    "TensorRTRunner": "galr.runtime.backends.tensorrt",
    "EngineKey": "galr.runtime.backends.tensorrt",
    "EngineMismatchError": "galr.runtime.backends.tensorrt",
}


def __getattr__(name: str) -> Any:
    # Runner classes load on first use so that `import galr.runtime.backends` stays cheap.
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class BackendEnvironment:
    """What this machine offers to the backends (one probe, reused for every decision).

    Attributes:
        gpu: the first visible CUDA GPU, or ``None``.
        tensorrt: the importable TensorRT package, or ``None``.
        cupy_available: whether CuPy imports (the TensorRT runner's device memory).
        onnxruntime_providers: ``onnxruntime.get_available_providers()``, or ``None`` when ONNX Runtime
            is not installed. onnxruntime-gpu lists its CUDA provider even without a GPU, so it only
            counts together with ``gpu``.
    """

    gpu: GpuInfo | None
    tensorrt: TensorRTInfo | None
    cupy_available: bool
    onnxruntime_providers: tuple[str, ...] | None

    def tensorrt_problem(self) -> str | None:
        """Why TensorRT cannot run here (``None`` when it can)."""
        if self.tensorrt is None:
            return "TensorRT not installed"
        if self.gpu is None:
            return "no CUDA GPU visible"
        if not self.cupy_available:
            return "CuPy not installed (the TensorRT runner's GPU memory)"
        return None

    def onnxruntime_cuda_problem(self) -> str | None:
        """Why ONNX Runtime cannot run on CUDA here (``None`` when it can)."""
        if self.onnxruntime_providers is None:
            return "onnxruntime not installed"
        if _CUDA_PROVIDER not in self.onnxruntime_providers:
            return "this onnxruntime has no CUDA provider (CPU build)"
        if self.gpu is None:
            return "no CUDA GPU visible"
        return None


def _onnxruntime_providers() -> tuple[str, ...] | None:
    try:
        return tuple(importlib.import_module("onnxruntime").get_available_providers())
    except ImportError:
        return None


def _cupy_available() -> bool:
    try:
        importlib.import_module("cupy")
    except ImportError:
        return False
    return True


def probe_environment() -> BackendEnvironment:
    """Probe GPU, TensorRT, CuPy and ONNX Runtime once (imports them; never raises)."""
    return BackendEnvironment(
        gpu=probe_gpu(),
        tensorrt=probe_tensorrt(),
        cupy_available=_cupy_available(),
        onnxruntime_providers=_onnxruntime_providers(),
    )


def available_backends(environment: BackendEnvironment | None = None) -> list[str]:
    """Backends that can run here, best first.

    Args:
        environment: a probe result; probed when ``None``.

    Returns:
        A subset of :data:`BACKENDS`: ``"tensorrt"`` when TensorRT, CuPy and a GPU are present,
        ``"onnxruntime"`` when ONNX Runtime imports.
    """
    environment = environment or probe_environment()
    found = []
    if environment.tensorrt_problem() is None:
        found.append("tensorrt")
    if environment.onnxruntime_providers is not None:
        found.append("onnxruntime")
    return found


def _gpu_label(gpu: GpuInfo | None) -> str:
    return f"{gpu.name} ({gpu.compute_capability})" if gpu else "GPU"


_TENSORRT_FIX = (
    "install TensorRT with `pip install galr[tensorrt]` and CuPy with `pip install galr[gpu]` on a machine whose "
    "NVIDIA GPU shows in nvidia-smi, or choose backend 'onnxruntime'"
)
_ORT_GPU_FIX = (
    "install `pip install galr[gpu]` (onnxruntime-gpu, replacing plain onnxruntime) with CUDA and cuDNN "
    "versions matching it, make sure nvidia-smi sees the GPU, or choose device 'cpu'"
)
_ORT_FIX = "install ONNX Runtime: `pip install galr[cpu]` (CPU) or `pip install galr[gpu]` (CUDA)"


def _resolve_onnxruntime(device: str, environment: BackendEnvironment, why: str) -> tuple[str, str, str]:
    if environment.onnxruntime_providers is None:
        raise BackendUnavailableError(f"backend 'onnxruntime' is not installed ({why}); {_ORT_FIX}")
    cuda_problem = environment.onnxruntime_cuda_problem()
    if device == "cuda":
        if cuda_problem is not None:
            raise BackendUnavailableError(f"onnxruntime on CUDA is unavailable: {cuda_problem}; {_ORT_GPU_FIX}")
        return "onnxruntime", "cuda", f"onnxruntime on CUDA ({_gpu_label(environment.gpu)}): {why}"
    if device == "cpu":
        return "onnxruntime", "cpu", f"onnxruntime on CPU: {why}"
    if cuda_problem is None:
        return "onnxruntime", "cuda", f"onnxruntime on CUDA ({_gpu_label(environment.gpu)}): {why}"
    return "onnxruntime", "cpu", f"onnxruntime on CPU: {why}; onnxruntime CUDA: {cuda_problem}"


def resolve_backend(
    requested: str = "auto",
    device: str = "auto",
    environment: BackendEnvironment | None = None,
) -> tuple[str, str, str]:
    """Choose the backend and device to run on.

    Args:
        requested: ``"auto" | "tensorrt" | "onnxruntime"``; ``"auto"`` prefers TensorRT, then ONNX Runtime
            on CUDA, then ONNX Runtime on CPU.
        device: ``"auto" | "cpu" | "cuda"``; TensorRT always runs on ``"cuda"``.
        environment: a probe result; probed when ``None``.

    Returns:
        ``(backend, device, reason)``, e.g. ``("onnxruntime", "cpu", "onnxruntime on CPU: TensorRT not installed")``.

    Raises:
        ValueError: for an unknown backend or device name (the message lists the valid ones).
        BackendUnavailableError: when an explicitly requested backend or device cannot run here, or nothing can.
    """
    if requested not in REQUESTABLE_BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; valid backends: {list(REQUESTABLE_BACKENDS)}")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; valid devices: {list(DEVICES)}")
    environment = environment or probe_environment()
    trt_problem = environment.tensorrt_problem()

    if requested == "tensorrt":
        if device == "cpu":
            raise BackendUnavailableError(
                "backend 'tensorrt' runs only on CUDA GPUs, but device 'cpu' was requested; "
                "use backend 'onnxruntime' for the CPU"
            )
        if trt_problem is not None:
            raise BackendUnavailableError(f"backend 'tensorrt' is unavailable: {trt_problem}; {_TENSORRT_FIX}")
        return "tensorrt", "cuda", f"tensorrt on {_gpu_label(environment.gpu)}: requested"

    if requested == "onnxruntime":
        return _resolve_onnxruntime(device, environment, "requested")

    if device != "cpu" and trt_problem is None:
        version = environment.tensorrt.version if environment.tensorrt else "?"
        return "tensorrt", "cuda", f"tensorrt on {_gpu_label(environment.gpu)}: TensorRT {version} and a GPU found"
    why = "device 'cpu' requested" if device == "cpu" else str(trt_problem)
    if environment.onnxruntime_providers is None:
        raise BackendUnavailableError(f"no backend can run here: {why}, and onnxruntime is not installed; {_ORT_FIX}")
    return _resolve_onnxruntime(device, environment, why)


__all__ = [
    "BACKENDS",
    "DEVICES",
    "BackendEnvironment",
    "BackendUnavailableError",
    "EngineKey",
    "EngineMismatchError",
    "GpuInfo",
    "OnnxRuntimeOptions",
    "OnnxRuntimeRunner",
    "Runner",
    "RunnerError",
    "TensorRTInfo",
    "TensorRTRunner",
    "TensorSpec",
    "available_backends",
    "probe_environment",
    "probe_gpu",
    "probe_tensorrt",
    "resolve_backend",
]
