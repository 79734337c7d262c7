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
    assert len(scripts) == 11
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


# ---------------------------------------------------------------------------------------------------
# One error taxonomy, one exit-code table


def _click_commands():
    for command, target in _scripts().items():
        entry = getattr(console, target.split(":")[1])
        module, function = entry.__doc__.split("``")[1].rsplit(".", 1)
        yield command, getattr(importlib.import_module(module), function)


def test_every_command_prints_the_one_exit_code_table():
    from click.testing import CliRunner

    from galr.errors import EXIT_CODES

    for name, command in _click_commands():
        assert isinstance(command, console.GalrCommand), name
        assert command.name == name
        text = CliRunner().invoke(command, ["--help"]).output
        assert "Exit codes:" in text, name
        for code, meaning in EXIT_CODES:
            assert f"{code}  {meaning.split(':')[0]}" in text, (name, code)


def test_errors_become_one_printable_line_and_their_code():
    import click
    from click.testing import CliRunner

    from galr import errors

    raised = {"input": errors.InputError("bad file x\nsecond line"), "unavailable": errors.UnavailableError("no GPU"),
              "gate": errors.GateError("gate failed"), "nothing": errors.NothingDoneError("no images"),
              "busy": errors.BusyError("locked"), "disk": OSError(28, "No space left on device", "out.json"),
              "escape": errors.InputError("name \x1b]0;pwned\x07 here")}

    @click.command("galr-probe", cls=console.GalrCommand)
    @click.argument("which")
    def probe(which):
        raise raised[which]

    expected = {"input": 2, "unavailable": 3, "gate": 4, "nothing": 1, "busy": 2, "disk": 2, "escape": 2}
    for which, code in expected.items():
        result = CliRunner().invoke(probe, [which])
        assert result.exit_code == code, (which, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("galr-probe: "), result.output
        assert "\x1b" not in result.output and "\x07" not in result.output
    assert "No space left on device 'out.json'" in CliRunner().invoke(probe, ["disk"]).output
    assert "bad file x / second line" in CliRunner().invoke(probe, ["input"]).output


def test_a_bug_keeps_its_traceback():
    import click
    from click.testing import CliRunner

    @click.command("galr-probe", cls=console.GalrCommand)
    def probe():
        raise ZeroDivisionError("a bug")

    result = CliRunner().invoke(probe, [])
    assert isinstance(result.exception, ZeroDivisionError)


def test_printable_escapes_control_characters():
    assert console.printable("a\nb\x1b[31mred\x9b\u2028") == "a\\nb\\x1b[31mred\\x9b\\u2028"
    assert console.printable("harbour, 港口 ok") == "harbour, 港口 ok"


def test_the_same_cause_exits_with_the_same_code_in_every_command(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from galr.export.cli import build_main
    from galr.runtime.cli.index import main as index_main
    from galr.runtime.cli.run import main as run_main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.txt").write_text("two planes\n", encoding="utf-8")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG")
    missing_bundle = {
        "galr-run": CliRunner().invoke(run_main, ["q.txt", "--engine", "none.plan"]),
        "galr-index": CliRunner().invoke(index_main, ["images", "--engine", "none.plan"]),
        "galr-build": CliRunner().invoke(build_main, ["none.plan"]),
    }
    for name, result in missing_bundle.items():
        assert result.exit_code == 2 and "none.plan" in result.output, (name, result.output)
