"""Console-script entry points: process-wide defaults first, then the command.

OpenBLAS, numpy's BLAS, reads its settings once, when numpy is first imported, and every command
imports numpy as its module loads. So the defaults are set here, in a module that imports nothing
heavy, and the command's module is imported only afterwards. A value already in the environment is
kept. Programs that embed :mod:`galr.runtime` set the same variable themselves (README, "Serving").
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable

#: OpenBLAS's idle worker threads spin for about 2**28 cycles (~0.1 s) after each call. A search's
#: matrix product leaves them spinning through the next ONNX Runtime call, which then shares its
#: cores with them: on 2 cores galr-bench's end-to-end query (text encoder + 10k search) took 112 ms
#: at p50 instead of 26 ms (BENCHMARKS.md). With 2**4 cycles they sleep at once; search times did
#: not change.
OPENBLAS_THREAD_TIMEOUT = "4"


def set_process_defaults() -> None:
    """Set the environment defaults above unless the user set them."""
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT)


def _command(module: str, function: str) -> Callable[[], Any]:
    def entry() -> Any:
        set_process_defaults()
        return getattr(importlib.import_module(module), function)()

    entry.__name__ = entry.__qualname__ = function
    entry.__doc__ = f"Run ``{module}.{function}`` after :func:`set_process_defaults`."
    return entry


galr_export = _command("galr.export.cli", "main")
galr_build = _command("galr.export.cli", "build_main")
galr_run = _command("galr.runtime.cli", "run_main")
galr_index = _command("galr.runtime.index_cli", "main")
galr_train = _command("galr.cli", "train_main")
galr_eval = _command("galr.cli", "eval_main")
galr_synth = _command("galr.cli", "synth_main")
galr_demo = _command("galr.cli", "demo_main")
galr_bench = _command("galr.bench.cli", "main")
