"""What accelerator stack this machine has: GPU, driver, TensorRT. Torch-free and never raises.

The probes decide which backend can run and guard every TensorRT ``Builder``: constructing one without
a CUDA device fails with an opaque ``pybind11`` error or aborts the whole process (deployment notes
§1.7), so callers ask here first.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

NVIDIA_SMI_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class GpuInfo:
    """The first visible CUDA GPU.

    Attributes:
        name: marketing name, e.g. ``"NVIDIA H200"``.
        compute_capability: ``"sm_90"`` style, the key TensorRT engines are tied to.
        driver_version: NVIDIA driver release (``"570.86.15"``) when nvidia-smi answered, else ``None``.
        cuda_driver_version: highest CUDA version the driver supports (``"12.8"``) when CuPy answered.
        cuda_runtime_version: CUDA runtime CuPy was built against (``"12.4"``) when CuPy answered.
        count: number of visible GPUs.
        source: which probe answered, ``"cupy"`` or ``"nvidia-smi"``.
    """

    name: str
    compute_capability: str
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    cuda_runtime_version: str | None = None
    count: int = 1
    source: str = "cupy"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "compute_capability": self.compute_capability,
            "driver_version": self.driver_version,
            "cuda_driver_version": self.cuda_driver_version,
            "cuda_runtime_version": self.cuda_runtime_version,
            "count": self.count,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GpuInfo":
        return cls(
            name=str(data["name"]),
            compute_capability=str(data["compute_capability"]),
            driver_version=data.get("driver_version"),
            cuda_driver_version=data.get("cuda_driver_version"),
            cuda_runtime_version=data.get("cuda_runtime_version"),
            count=int(data.get("count", 1)),
            source=str(data.get("source", "cupy")),
        )


@dataclass(frozen=True)
class TensorRTInfo:
    """The importable TensorRT Python package.

    Attributes:
        version: ``tensorrt.__version__``, e.g. ``"10.16.1.11"``.
        major: its major version; 10 and 11 differ in how reduced precision is built.
    """

    version: str
    major: int


def compute_capability_tag(major: int, minor: int) -> str:
    """``(9, 0)`` -> ``"sm_90"``."""
    return f"sm_{int(major)}{int(minor)}"


def _cuda_version_string(encoded: int) -> str:
    """CUDA's integer encoding (``12040``) -> ``"12.4"``."""
    return f"{encoded // 1000}.{(encoded % 1000) // 10}"


def _probe_with_cupy() -> GpuInfo | None:
    try:
        cupy = importlib.import_module("cupy")
        runtime = cupy.cuda.runtime
        count = int(runtime.getDeviceCount())
        if count < 1:
            return None
        props = runtime.getDeviceProperties(0)
        name = props["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        driver = runtime.driverGetVersion()
        runtime_version = runtime.runtimeGetVersion()
    # Any failure (no cupy, no driver, CUDARuntimeError) means "this probe cannot tell".
    except Exception:
        return None
    return GpuInfo(
        name=name,
        compute_capability=compute_capability_tag(props["major"], props["minor"]),
        cuda_driver_version=_cuda_version_string(int(driver)) if driver else None,
        cuda_runtime_version=_cuda_version_string(int(runtime_version)) if runtime_version else None,
        count=count,
        source="cupy",
    )


def parse_nvidia_smi(output: str) -> GpuInfo | None:
    """Parse ``nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader`` output.

    Args:
        output: the command's stdout, one line per GPU.

    Returns:
        The first GPU, or ``None`` when no line parses (old drivers lack ``compute_cap``).
    """
    lines = [line for line in output.strip().splitlines() if line.strip()]
    if not lines:
        return None
    fields = [field.strip() for field in lines[0].split(",")]
    if len(fields) < 2:
        return None
    major, _, minor = fields[1].partition(".")
    if not (major.isdigit() and minor.isdigit()):
        return None
    driver = fields[2] if len(fields) > 2 and fields[2] else None
    return GpuInfo(
        name=fields[0],
        compute_capability=compute_capability_tag(int(major), int(minor)),
        driver_version=driver,
        count=len(lines),
        source="nvidia-smi",
    )


def _probe_with_nvidia_smi() -> GpuInfo | None:
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None
    try:
        completed = subprocess.run(
            [executable, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if completed.returncode != 0:
        return None
    return parse_nvidia_smi(completed.stdout)


def probe_gpu() -> GpuInfo | None:
    """Find the first CUDA GPU without torch: CuPy first, then ``nvidia-smi``.

    Returns:
        A :class:`GpuInfo`, or ``None`` when no GPU is visible (never raises).
    """
    return _probe_with_cupy() or _probe_with_nvidia_smi()


def probe_tensorrt() -> TensorRTInfo | None:
    """Report the importable TensorRT package without touching the GPU (no ``Builder`` is made).

    Returns:
        A :class:`TensorRTInfo`, or ``None`` when ``import tensorrt`` fails (not installed, or its shared
        libraries are missing, as with the PyPI bindings-only wheel).
    """
    try:
        trt = importlib.import_module("tensorrt")
        version = str(trt.__version__)
        major = int(version.split(".")[0])
    except Exception:
        return None
    return TensorRTInfo(version=version, major=major)


__all__ = [
    "GpuInfo",
    "TensorRTInfo",
    "compute_capability_tag",
    "parse_nvidia_smi",
    "probe_gpu",
    "probe_tensorrt",
]
