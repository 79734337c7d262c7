"""The backend registry: which backends exist, whether each can run here, and which one to use.

Every module in this package that defines a module-level ``BACKEND`` (a :class:`Backend`) is a
backend; :func:`backends` finds them, so adding one (OpenVINO, say) is one new file. Importing a
backend module must stay cheap: its library (``onnxruntime``, ``tensorrt``) is imported only by its
probe or when its runners are made.

A backend says:

* ``devices`` it can run on, preferred first, and its ``rank`` among backends (lower = preferred
  when the user says ``auto``);
* ``probe(device, environment)``: why it cannot run on that device here, or ``None`` when it can;
* ``make_runners(request)``: one activated :class:`~galr.runtime.backends.base.Runner` per graph,
  each entered into the request's ``ExitStack``, so a runner that fails to start closes the ones
  already started (GPU memory under TensorRT);
* ``fix``: what the user can do when it is missing.

:func:`resolve_backend` turns ``("auto" | name, "auto" | device)`` into a :class:`BackendChoice`
that says what runs and why, e.g. ``onnxruntime on CPU (tensorrt: TensorRT not installed)``.
"""

from __future__ import annotations

import importlib
import pkgutil
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable

from galr.errors import InputError
from galr.runtime.backends.base import BackendUnavailableError, Runner
from galr.runtime.backends.device import (
    GpuInfo,
    TensorRTInfo,
    probe_gpu,
    probe_tensorrt,
)

if TYPE_CHECKING:
    from galr.bundle import Bundle

AUTO = "auto"
DEVICES: tuple[str, ...] = ("cpu", "cuda")
REQUESTABLE_DEVICES: tuple[str, ...] = (AUTO, *DEVICES)
_NOT_BACKENDS = frozenset({"base", "device", "registry"})
_UNSET: Any = object()


class Environment:
    """What this machine offers to backends; each probe runs once, and only when a backend asks.

    Tests pass the answers in (``Environment(gpu=None, tensorrt=None, ...)``); anything not given is
    probed on first use.
    """

    def __init__(self, *, gpu: GpuInfo | None = _UNSET, tensorrt: TensorRTInfo | None = _UNSET,
                 cupy_available: bool = _UNSET, onnxruntime_providers: tuple[str, ...] | None = _UNSET) -> None:
        for name, value in (("gpu", gpu), ("tensorrt", tensorrt), ("cupy_available", cupy_available),
                            ("onnxruntime_providers", onnxruntime_providers)):
            if value is not _UNSET:
                self.__dict__[name] = value  # pre-fills the cached_property below

    @cached_property
    def gpu(self) -> GpuInfo | None:
        """The first visible CUDA GPU (CuPy, then nvidia-smi), or ``None``."""
        return probe_gpu()

    @cached_property
    def tensorrt(self) -> TensorRTInfo | None:
        """The importable TensorRT package, or ``None``."""
        return probe_tensorrt()

    @cached_property
    def cupy_available(self) -> bool:
        return _importable("cupy")

    @cached_property
    def onnxruntime_providers(self) -> tuple[str, ...] | None:
        """``onnxruntime.get_available_providers()``, or ``None`` when ONNX Runtime is not installed."""
        try:
            return tuple(importlib.import_module("onnxruntime").get_available_providers())
        except ImportError:
            return None


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class BackendOptions:
    """Base of each backend's typed options; :attr:`backend` names the backend they are for."""

    backend: ClassVar[str] = ""


@dataclass(frozen=True)
class RunnerRequest:
    """What ``make_runners`` gets: the bundle, the precision and device chosen, where runners are
    entered, and the backend's options (``None``: its defaults)."""

    bundle: "Bundle"
    precision: str
    device: str
    stack: ExitStack
    environment: Environment
    options: BackendOptions | None = None


@dataclass(frozen=True)
class Backend:
    """One inference backend (see the module docstring)."""

    name: str
    devices: tuple[str, ...]
    rank: int
    probe: Callable[[str, Environment], str | None]
    make_runners: Callable[[RunnerRequest], dict[str, Runner]]
    fix: str


@dataclass(frozen=True)
class BackendChoice:
    """What runs: backend, device, precision, why, and from which bundle (printed by the CLIs)."""

    backend: str
    device: str
    precision: str
    reason: str
    bundle: str

    def describe(self) -> str:
        return f"{self.backend} on {self.device.upper()} at {self.precision} ({self.reason})"


@lru_cache(maxsize=1)
def _discovered() -> tuple[Backend, ...]:
    package = importlib.import_module(__package__)
    found = []
    for module_info in pkgutil.iter_modules(package.__path__):
        if module_info.name in _NOT_BACKENDS or module_info.name.startswith("_"):
            continue
        backend = getattr(importlib.import_module(f"{__package__}.{module_info.name}"), "BACKEND", None)
        if isinstance(backend, Backend):
            found.append(backend)
    return tuple(sorted(found, key=lambda b: (b.rank, b.name)))


def backends() -> tuple[Backend, ...]:
    """Every registered backend, preferred first."""
    return _discovered()


def backend_names() -> tuple[str, ...]:
    """Names of the registered backends, preferred first (the CLIs' ``--backend`` choices, with ``auto``)."""
    return tuple(backend.name for backend in backends())


def get_backend(name: str) -> Backend:
    """The backend called ``name``.

    Raises:
        InputError: no such backend (the message lists the registered ones).
    """
    for backend in backends():
        if backend.name == name:
            return backend
    raise InputError(f"unknown backend {name!r}; valid backends: {[AUTO, *backend_names()]}")


def available_backends(environment: Environment | None = None) -> list[str]:
    """Backends that can run here on at least one device, preferred first."""
    environment = environment or Environment()
    return [b.name for b in backends() if any(b.probe(device, environment) is None for device in b.devices)]


def resolve_backend(requested: str = AUTO, device: str = AUTO, precision: str = AUTO, *, bundle: str = "",
                    environment: Environment | None = None) -> BackendChoice:
    """Choose the backend and device to run on (the precision is resolved by the caller).

    ``auto`` takes the first (backend, device) pair, in rank and device-preference order, whose probe
    passes; a named backend or device is refused when it cannot run, with what to install.

    Raises:
        InputError: an unknown backend or device name.
        BackendUnavailableError: the requested backend/device cannot run here, or nothing can.
    """
    if device not in REQUESTABLE_DEVICES:
        raise InputError(f"unknown device {device!r}; valid devices: {list(REQUESTABLE_DEVICES)}")
    environment = environment or Environment()
    candidates = list(backends()) if requested == AUTO else [get_backend(requested)]
    skipped: list[str] = []
    for backend in candidates:
        devices = backend.devices if device == AUTO else tuple(d for d in backend.devices if d == device)
        if not devices:
            if requested != AUTO:
                raise BackendUnavailableError(
                    f"backend '{backend.name}' runs only on {'/'.join(backend.devices)}, but device '{device}' was "
                    f"requested; choose another backend")
            continue
        for candidate in devices:
            problem = backend.probe(candidate, environment)
            if problem is None:
                why = "requested" if requested != AUTO else ("; ".join(skipped) if skipped else "best available")
                if candidate == "cuda" and environment.gpu is not None:
                    why = f"{environment.gpu.name} ({environment.gpu.compute_capability}); {why}"
                return BackendChoice(backend.name, candidate, precision, why, bundle)
            skipped.append(f"{backend.name} on {candidate}: {problem}")
        if requested != AUTO:
            raise BackendUnavailableError(f"backend '{backend.name}' cannot run here ({'; '.join(skipped)}); "
                                          f"{backend.fix}")
    raise BackendUnavailableError(f"no backend can run here ({'; '.join(skipped) or 'none registered'}); "
                                  "install ONNX Runtime: `pip install galr[cpu]` (CPU) or `pip install galr[gpu]` (CUDA)")


def make_runners(choice: BackendChoice, bundle: "Bundle", stack: ExitStack, environment: Environment,
                 options: Iterable[BackendOptions] = ()) -> dict[str, Runner]:
    """Start the chosen backend's runners for ``bundle`` inside ``stack`` (the caller owns closing them)."""
    backend = get_backend(choice.backend)
    chosen = next((o for o in options if o.backend == backend.name), None)
    return backend.make_runners(RunnerRequest(bundle, choice.precision, choice.device, stack, environment, chosen))


__all__ = [
    "AUTO",
    "DEVICES",
    "REQUESTABLE_DEVICES",
    "Backend",
    "BackendChoice",
    "BackendOptions",
    "Environment",
    "RunnerRequest",
    "available_backends",
    "backend_names",
    "backends",
    "get_backend",
    "make_runners",
    "resolve_backend",
]
