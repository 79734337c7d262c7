"""The runtime side must not import torch (it targets edge machines without it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

TORCH_FREE = [
    "galr", "galr.errors", "galr.console", "galr.container", "galr.bundle", "galr.config", "galr.graphs",
    "galr.runtime", "galr.runtime.backends", "galr.runtime.encoders", "galr.runtime.index", "galr.runtime.retriever",
    "galr.runtime.cli.run", "galr.runtime.cli.index", "galr.preprocess.text", "galr.preprocess.image",
    "galr.preprocess.detections", "galr.preprocess.drea", "galr.preprocess.local_file", "galr.preprocess.spec",
    "galr.preprocess.local_inputs", "galr.retrieval.metrics", "galr.retrieval.rerank", "galr.retrieval.evaluate",
    "galr.retrieval.parity",
]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", f"importing {module} pulled in torch"


def test_runtime_imports_with_torch_blocked():
    # Stronger: make `import torch` fail outright, and the runtime must still import.
    # Every module of galr.runtime and of the torch-free layers below it, walked, not listed.
    code = (
        "import sys, importlib, pkgutil; sys.modules['torch'] = None\n"
        "import galr.runtime, galr.bundle, galr.preprocess\n"
        "for package in (galr.runtime, galr.bundle, galr.preprocess):\n"
        "    for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
