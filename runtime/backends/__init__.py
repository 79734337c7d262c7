"""Inference backends: the runner interface (:mod:`.base`), machine probes (:mod:`.device`), the
registry and the choice between backends (:mod:`.registry`), one module per backend
(:mod:`.onnxruntime`, :mod:`.tensorrt`).

Importing this package is cheap and torch-free; ONNX Runtime, TensorRT and CuPy are imported only
when probed or used.
"""

from __future__ import annotations

from galr.runtime.backends.base import (
    BackendUnavailableError,
    Runner,
    RunnerError,
    TensorSpec,
)
from galr.runtime.backends.device import (
    GpuInfo,
    TensorRTInfo,
    probe_gpu,
    probe_tensorrt,
)
from galr.runtime.backends.registry import (
    AUTO,
    Backend,
    BackendChoice,
    BackendOptions,
    Environment,
    available_backends,
    backend_names,
    backends,
    get_backend,
    make_runners,
    resolve_backend,
)

__all__ = [
    "AUTO",
    "Backend",
    "BackendChoice",
    "BackendOptions",
    "BackendUnavailableError",
    "Environment",
    "GpuInfo",
    "Runner",
    "RunnerError",
    "TensorRTInfo",
    "TensorSpec",
    "available_backends",
    "backend_names",
    "backends",
    "get_backend",
    "make_runners",
    "probe_gpu",
    "probe_tensorrt",
    "resolve_backend",
]
