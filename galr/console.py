"""Console entry points and the one place errors become messages and exit codes.

Two jobs, both for every ``galr-*`` command:

* **Process defaults before numpy loads.** OpenBLAS, numpy's BLAS, reads its settings once, when
  numpy is first imported, and every command imports numpy as its module loads. So the defaults
  are set here, in a module that imports nothing heavy, and the command's module is imported only
  afterwards. A value already in the environment is kept. Programs that embed :mod:`galr.runtime`
  set the same variable themselves (README, "Serving").
* **Errors.** Commands are :class:`GalrCommand`\\ s: a :class:`~galr.errors.GalrError` (or an
  ``OSError`` such as a full disk) ends the command with one line on stderr, ``<command>: <what
  went wrong and what to do>``, and the exit code of :mod:`galr.errors`' table, which ``--help``
  prints. Anything else is a bug in galr and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Any, Callable

import click

from galr.errors import EXIT_INTERRUPTED, GalrError, exit_code_for, exit_codes_help

#: OpenBLAS's idle worker threads spin for about 2**28 cycles after each call, through the next
#: ONNX Runtime call, which then shares its cores with them (BENCHMARKS.md, end-to-end query).
#: With 2**4 cycles they sleep at once.
OPENBLAS_THREAD_TIMEOUT = "4"

# C0 and C1 control characters (ESC starts CSI/OSC sequences), DEL, and the Unicode line and
# paragraph separators some terminals honour.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def process_defaults() -> dict[str, str]:
    """The environment defaults above, with the values the user set instead where they did: what
    worker processes galr starts elsewhere (Ray actors) are given, since numpy reads them at import."""
    return {"OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT)}


def set_process_defaults() -> None:
    """Set the environment defaults above unless the user set them."""
    for name, value in process_defaults().items():
        os.environ.setdefault(name, value)


def printable(text: object) -> str:
    """``text`` with control characters shown as escapes (``\\n``, ``\\x1b``), safe to print.

    File names, captions and queries come from users and archives: a newline in a file name would
    forge a table row, an escape sequence would reach the terminal (even through a pipe into
    ``less -R``). Everything galr prints that it did not write itself goes through here.
    """
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), str(text))


def error_message(error: BaseException) -> str:
    """One printable line for an error galr reports without a traceback."""
    if isinstance(error, OSError) and not isinstance(error, GalrError) and error.strerror:
        where = f" {error.filename!r}" if error.filename else ""
        return printable(f"{error.strerror}{where}; check the path, free space and permissions")
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return printable(" / ".join(lines) or type(error).__name__)


class GalrCommand(click.Command):
    """A click command that reports galr's errors as one line and its exit code.

    ``--help`` ends with the exit-code table, after the command's own epilog.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (GalrError, OSError, KeyboardInterrupt) as error:
            click.echo(f"{self.name}: {error_message(error)}", err=True)
            ctx.exit(EXIT_INTERRUPTED if isinstance(error, KeyboardInterrupt) else exit_code_for(error))

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        formatter.write_paragraph()
        formatter.write_text("\b\nExit codes:\n" + exit_codes_help())


def _command(module: str, function: str) -> Callable[[], Any]:
    def entry() -> Any:
        set_process_defaults()
        return getattr(importlib.import_module(module), function)()

    entry.__name__ = entry.__qualname__ = function
    entry.__doc__ = f"Run ``{module}.{function}`` after :func:`set_process_defaults`."
    return entry


galr_export = _command("galr.export.cli", "main")
galr_build = _command("galr.export.cli", "build_main")
galr_run = _command("galr.runtime.cli.run", "main")
galr_index = _command("galr.runtime.cli.index", "main")
galr_serve = _command("galr.runtime.cli.serve", "main")
galr_locate = _command("galr.runtime.cli.locate", "main")
galr_train = _command("galr.cli", "train_main")
galr_eval = _command("galr.cli", "eval_main")
galr_synth = _command("galr.cli", "synth_main")
galr_demo = _command("galr.cli", "demo_main")
galr_bench = _command("galr.bench.cli", "main")
