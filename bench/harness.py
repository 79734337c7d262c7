"""Timing harness and result schema shared by every benchmark section.

**Timing.** A *case* is one callable (e.g. "global encoder, ONNX Runtime INT8, batch 8"). Each case is
warmed up, then measured in ``repeats`` repeated runs; a run is ``iterations`` timed calls, where
``iterations`` is chosen once per case from the last warm-up call so that a run takes about
``target_seconds`` (between ``min_iterations`` and ``max_iterations``). Cases that are compared with
each other are measured *interleaved* (run 1 of every case, then run 2 of every case, ...), so a noisy
neighbour or a frequency change hits all of them alike and their ratios stay meaningful.

From the calls of one run come its p50/p95/p99 latency (``numpy.percentile``, linear interpolation)
and its throughput (items of all its calls / their summed time). A statistic is reported as
``min/median/max`` over the runs. With fewer than 100 calls in a run, p99 is close to that run's
slowest call; the number of calls per run is stored next to every figure so nobody has to guess.

**Results** are one JSON document (:func:`new_results`), written atomically by :func:`write_results`
and read back, with its schema checked, by :func:`load_results`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from galr.atomic import write_text_atomically
from galr.clock import utc_now
from galr.errors import InputError, NotFoundError

SCHEMA_NAME = "galr-bench"
SCHEMA_VERSION = 1
SECTION_NAMES: tuple[str, ...] = ("encoders", "gallery", "rerank", "accuracy", "limits", "bounds", "serve", "geo",
                                   "detector")
#: Sections added after result files were first written: an older file is read with them "not run".
LATER_SECTIONS: frozenset[str] = frozenset({"geo", "detector"})
STATUS_OK = "ok"
STATUS_NOT_RUN = "not run"

Log = Callable[[str], None]


@dataclass(frozen=True)
class TimingSettings:
    """How each case is timed.

    Attributes:
        warmup: untimed calls before the first run (allocations, kernel selection, caches).
        repeats: repeated runs; every figure is min/median/max over them.
        min_iterations: timed calls per run, at least.
        max_iterations: timed calls per run, at most.
        target_seconds: wall time aimed at per run; sets the calls per run from the warm-up's time.
    """

    warmup: int = 2
    repeats: int = 5
    min_iterations: int = 5
    max_iterations: int = 200
    target_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise InputError(f"TimingSettings.warmup must be >= 0, got {self.warmup}")
        if self.repeats < 1:
            raise InputError(f"TimingSettings.repeats must be >= 1, got {self.repeats}")
        if not 1 <= self.min_iterations <= self.max_iterations:
            raise InputError(f"TimingSettings needs 1 <= min_iterations ({self.min_iterations}) <= "
                             f"max_iterations ({self.max_iterations})")
        if self.target_seconds <= 0:
            raise InputError(f"TimingSettings.target_seconds must be positive, got {self.target_seconds}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TimingSettings":
        return cls(**dict(values))

    def with_iterations(self, min_iterations: int, max_iterations: int) -> "TimingSettings":
        """A copy with other bounds on the calls per run (e.g. 1..3 for multi-second batches)."""
        return dataclasses.replace(self, min_iterations=min_iterations, max_iterations=max_iterations)


@dataclass(frozen=True)
class Spread:
    """Minimum, median and maximum of one statistic over repeated runs."""

    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        """The spread of ``values``.

        Raises:
            ValueError: for an empty sequence.
        """
        if not len(values):
            raise InputError("Spread.of needs at least one value")
        return cls(float(min(values)), float(statistics.median(values)), float(max(values)))

    def scaled(self, factor: float) -> "Spread":
        return Spread(self.min * factor, self.median * factor, self.max * factor)

    def to_dict(self) -> dict[str, float]:
        return {"min": self.min, "median": self.median, "max": self.max}


@dataclass(frozen=True)
class Case:
    """One thing to time.

    Attributes:
        call: the work; its return value is ignored.
        items: items one call processes (images, captions, queries), for throughput.
    """

    call: Callable[[], Any]
    items: int = 1


@dataclass(frozen=True, eq=False)
class Measurement:
    """The timed calls of one case: ``runs[r]`` holds the seconds of each call of run ``r``."""

    runs: tuple[tuple[float, ...], ...]
    items: int

    @property
    def calls_per_run(self) -> int:
        return min(len(run) for run in self.runs)

    def latency_ms(self) -> dict[str, Any]:
        """p50/p95/p99 of the call time in milliseconds, each as min/median/max over the runs."""
        result: dict[str, Any] = {}
        for name, q in (("p50", 50), ("p95", 95), ("p99", 99)):
            result[name] = Spread.of([float(np.percentile(run, q)) * 1e3 for run in self.runs]).to_dict()
        result["calls_per_run"] = self.calls_per_run
        result["runs"] = len(self.runs)
        return result

    def throughput(self) -> dict[str, Any]:
        """Items per second, min/median/max over the runs."""
        rates = [self.items * len(run) / sum(run) for run in self.runs]
        return {**Spread.of(rates).to_dict(), "calls_per_run": self.calls_per_run, "runs": len(self.runs),
                "items_per_call": self.items}


def _iterations_for(seconds_per_call: float, settings: TimingSettings) -> int:
    wanted = settings.target_seconds / max(seconds_per_call, 1e-9)
    return int(min(settings.max_iterations, max(settings.min_iterations, math.ceil(wanted))))


def _timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def run_interleaved(cases: Mapping[str, Case], settings: TimingSettings, log: Log | None = None) -> dict[str, Measurement]:
    """Time several cases with their runs interleaved (see the module docstring).

    Args:
        cases: the cases by a unique key.
        settings: warm-up, repeats and calls per run.
        log: progress messages (one per case after its warm-up), or ``None``.

    Returns:
        A :class:`Measurement` per key.
    """
    iterations: dict[str, int] = {}
    for key, case in cases.items():
        last = _timed(case.call)  # the first call is always a warm-up: it also sizes the runs
        for _ in range(settings.warmup - 1):
            last = _timed(case.call)
        iterations[key] = _iterations_for(last, settings)
        if log is not None:
            log(f"  {key}: {last * 1e3:.1f} ms per call, {iterations[key]} calls x {settings.repeats} runs")
    runs: dict[str, list[tuple[float, ...]]] = {key: [] for key in cases}
    for _ in range(settings.repeats):
        for key, case in cases.items():
            runs[key].append(tuple(_timed(case.call) for _ in range(iterations[key])))
    return {key: Measurement(tuple(runs[key]), cases[key].items) for key in cases}


def measure(call: Callable[[], Any], settings: TimingSettings, items: int = 1) -> Measurement:
    """Time one case alone (see :func:`run_interleaved`)."""
    return run_interleaved({"case": Case(call, items)}, settings)["case"]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or ``None`` when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator) / float(denominator)


# ---------------------------------------------------------------------------------------------
# Machine description


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cache_sizes() -> dict[str, str]:
    """Cache sizes by level as the kernel reports them (e.g. ``{"L2": "2048K", "L3": "307200K"}``)."""
    sizes: dict[str, str] = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for entry in sorted(base.glob("index*")) if base.is_dir() else []:
        try:
            kind = (entry / "type").read_text().strip()
            level = (entry / "level").read_text().strip()
            if kind in ("Data", "Unified"):
                sizes[f"L{level}"] = (entry / "size").read_text().strip()
        except OSError:
            continue
    return sizes


def cache_bytes(level: str = "L3") -> int | None:
    """Size of one cache level in bytes (``None`` when the kernel does not say)."""
    text = _cache_sizes().get(level)
    if not text:
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    suffix = text[-1].upper()
    try:
        return int(text[:-1]) * units[suffix] if suffix in units else int(text)
    except ValueError:
        return None


def _version(module: str) -> str | None:
    try:
        return str(__import__(module).__version__)
    except ImportError:
        return None


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (``None`` where the OS has none)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def machine_description(threads: int) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, caches, versions, accelerators, load.

    Args:
        threads: the thread count every backend was set to.

    Returns:
        A JSON-safe dict.
    """
    from galr.runtime.backends.device import probe_gpu, probe_tensorrt

    gpu = probe_gpu()
    tensorrt = probe_tensorrt()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gib": _memory_total_gib(),
        "caches": _cache_sizes(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("galr", "numpy", "torch", "onnxruntime", "onnx")},
        "threads": threads,
        "gpu": gpu.to_dict() if gpu is not None else None,
        "tensorrt": tensorrt.version if tensorrt is not None else None,
        "load_average_start": load_average(),
    }


# ---------------------------------------------------------------------------------------------
# Result documents


def not_run(reason: str) -> dict[str, Any]:
    """A section (or row) that was not measured, with the reason shown in the report."""
    return {"status": STATUS_NOT_RUN, "reason": reason}


def new_results(mode: str, machine: Mapping[str, Any], settings: Mapping[str, Any], command: str) -> dict[str, Any]:
    """An empty result document; sections are filled in by the caller.

    Args:
        mode: ``"quick"`` or ``"full"``.
        machine: :func:`machine_description`.
        settings: the run's settings (JSON-safe).
        command: the command line that produced it.
    """
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "mode": mode,
        "started": utc_now(),
        "command": command,
        "machine": dict(machine),
        "settings": dict(settings),
        "sections": {name: not_run("not selected") for name in SECTION_NAMES},
    }


def plain(value: Any) -> Any:
    """A JSON-safe copy: numpy scalars and arrays become Python numbers and lists, NaN/inf become None."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(path: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    """Write the result document as JSON through the one atomic writer."""
    path = Path(path)
    write_text_atomically(path, json.dumps(plain(results), indent=2, sort_keys=False, allow_nan=False) + "\n")
    return path


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a result document written by :func:`write_results`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, not a galr-bench document, or a schema version this galr does not read.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"benchmark results not found: {path}; run galr-bench -o {path} first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); rerun galr-bench to rewrite it") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_NAME:
        schema = data.get("schema") if isinstance(data, dict) else None
        raise InputError(f"{path} is not a galr-bench result file (schema {schema!r})")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise InputError(f"{path} has schema version {data.get('schema_version')}; this galr reads version "
                         f"{SCHEMA_VERSION}; rerun galr-bench")
    sections = data.get("sections", {})
    for name in LATER_SECTIONS - set(sections):
        sections[name] = not_run("not in this result file (written before the section existed)")
    missing = [name for name in SECTION_NAMES if name not in sections]
    if missing:
        raise InputError(f"{path} lacks the sections {missing}; rerun galr-bench")
    return data


def _status_bytes(field: str, process: int | str = "self") -> int | None:
    """A ``/proc/<process>/status`` memory field (``VmRSS``, ``VmHWM``) in bytes, or ``None`` off Linux
    (or when the process is gone)."""
    try:
        for line in Path(f"/proc/{process}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def resident_parts() -> dict[str, int | None]:
    """This process's resident memory by kind: ``anon`` (its own) and ``file`` (mapped file pages the
    kernel may drop under pressure, e.g. a memory-mapped index member), in bytes."""
    return {"anon": _status_bytes("RssAnon"), "file": _status_bytes("RssFile")}


def resident_bytes(pid: int | None = None) -> int | None:
    """The resident memory now of this process (or of process ``pid``), in bytes (``None`` off Linux)."""
    return _status_bytes("VmRSS", "self" if pid is None else pid)


def peak_bytes() -> int:
    """This process's peak resident memory so far, in bytes."""
    # VmHWM belongs to this process's address space; getrusage's ru_maxrss can carry the parent's
    # peak over fork/exec, so it is only the fallback (macOS reports bytes, Linux KiB).
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def stopwatch() -> Callable[[], float]:
    """A function returning the seconds since this call (for section timings)."""
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "SECTION_NAMES",
    "STATUS_NOT_RUN",
    "STATUS_OK",
    "Case",
    "Measurement",
    "Spread",
    "TimingSettings",
    "cache_bytes",
    "load_average",
    "load_results",
    "machine_description",
    "measure",
    "new_results",
    "not_run",
    "plain",
    "ratio",
    "run_interleaved",
    "stopwatch",
    "write_results",
]
