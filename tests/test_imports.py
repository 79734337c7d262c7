"""The runtime side must not import torch (it targets edge machines without it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

TORCH_FREE = [
    "galr", "galr.runtime", "galr.runtime.backends", "galr.runtime.encoders", "galr.runtime.bundle", "galr.config",
    "galr.graphs", "galr.preprocess.text", "galr.preprocess.image", "galr.preprocess.detections", "galr.preprocess.drea",
    "galr.preprocess.local_file", "galr.retrieval.metrics", "galr.retrieval.rerank", "galr.retrieval.evaluate",
]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", f"importing {module} pulled in torch"


def test_runtime_imports_with_torch_blocked():
    # Stronger: make `import torch` fail outright, and the runtime must still import.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import galr.runtime, galr.runtime.backends\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
