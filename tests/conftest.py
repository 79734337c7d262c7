"""Shared fixtures and the skip policy for the ``slow``, ``gpu`` and ``trt`` markers."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("GALR_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def _gpu_visible() -> bool:
    if importlib.util.find_spec("cupy") is not None:
        try:
            import cupy

            return cupy.cuda.runtime.getDeviceCount() > 0
        except Exception:
            return False
    if shutil.which("nvidia-smi"):
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    return False


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow test: run with --runslow")
    gpu = _gpu_visible() if any("gpu" in i.keywords or "trt" in i.keywords for i in items) else False
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU visible (cupy/nvidia-smi found none)")
    skip_trt = pytest.mark.skip(reason="TensorRT is not installed or no GPU is visible")
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not gpu:
            item.add_marker(skip_gpu)
        if "trt" in item.keywords and not (gpu and has_trt):
            item.add_marker(skip_trt)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The authors' public vocabularies and test captions; tests skip when they are absent."""
    if not (SHARED_DATA / "rsitmd" / "vocab.json").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set GALR_SHARED_DATA)")
    return SHARED_DATA
