"""galr.console: every command goes through it, and its defaults reach the process before numpy."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from galr import console

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _scripts() -> dict[str, str]:
    return tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]


def test_every_command_goes_through_the_console_module_to_a_real_function():
    scripts = _scripts()
    assert len(scripts) == 9
    for command, target in scripts.items():
        module, name = target.split(":")
        assert module == "galr.console", f"{command} bypasses galr.console"
        entry = getattr(console, name)
        # The wrapped command exists (imported here only to check it; the entry imports it lazily).
        wrapped_module, wrapped_function = entry.__doc__.split("``")[1].rsplit(".", 1)
        assert callable(getattr(importlib.import_module(wrapped_module), wrapped_function)), command


@pytest.mark.parametrize("preset, expected", [(None, console.OPENBLAS_THREAD_TIMEOUT), ("28", "28")])
def test_defaults_keep_a_value_the_user_set(monkeypatch, preset, expected):
    if preset is None:
        monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", preset)
    console.set_process_defaults()
    assert console.os.environ["OPENBLAS_THREAD_TIMEOUT"] == expected


def test_the_defaults_are_set_before_the_command_loads_numpy(tmp_path):
    # A stand-in command module records what the environment held when it was imported, i.e.
    # when a real command module would import numpy.
    (tmp_path / "probe_command.py").write_text(
        "import os, sys\n"
        "SEEN = (os.environ.get('OPENBLAS_THREAD_TIMEOUT'), 'numpy' in sys.modules)\n"
        "def main():\n    return SEEN\n"
    )
    code = (
        "import os, sys\n"
        "os.environ.pop('OPENBLAS_THREAD_TIMEOUT', None)\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from galr import console\n"
        "print(console._command('probe_command', 'main')())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"('{console.OPENBLAS_THREAD_TIMEOUT}', False)"
