"""Serving: text-search throughput and latency of ``galr-serve`` under concurrent clients, on loopback.

A ``galr-serve`` process is started on 127.0.0.1 (a free port) over the benchmark bundle and an
index of ``gallery`` random embeddings with a text bank. For each client count, that many threads
each send ``requests_per_client`` searches of one query (top 10, MR as set), one after the other on
a kept-alive connection (a minimal HTTP client: the generator shares the cores it measures); every
request has a timeout and the load stops by itself. Reported per
client count: queries/s over the wall time, latency p50/p95/p99 and p99/p50, errors, and the mean
encoder batch the service formed (from its ``/metrics``); each step runs ``repeats`` times and the
run of median throughput is reported (with every run's). The service runs with its defaults; the
fewest and the most clients are run again against ``galr-serve --spin`` (ONNX Runtime's threads
spinning after their work, its own default) for comparison.

The reference is the text encoder's own throughput at batch ``reference_batch`` in this process
(``Encoders.encode_text``, no HTTP, no search), measured before the server starts and again after it
stopped (the mean of the two), so the two never share the cores. Dynamic batching works when the
service at many clients gets close to it.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from galr.bench.harness import STATUS_OK, Log, not_run, resident_bytes, stopwatch


@dataclass(frozen=True)
class ServeBenchSettings:
    """Sizes of the serving benchmark (see the module docstring)."""

    clients: tuple[int, ...] = (1, 8, 32)
    requests_per_client: int = 80
    repeats: int = 3
    gallery: int = 10_000
    text_bank: int = 1_000
    rerank: bool = False
    reference_batch: int = 32
    max_wait_ms: float = 20.0
    timeout_s: float = 30.0
    ray_replicas: int = 2
    compare_spinning: bool = True
    soak_minutes: float = 0.0
    soak_clients: int = 8
    soak_sample_s: float = 10.0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SERVE = ("import sys; sys.argv = ['galr-serve', *sys.argv[1:]]\n"
          "from galr.console import galr_serve\ngalr_serve()\n")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _wait_ready(port: int, process: subprocess.Popen, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"galr-serve exited with {process.returncode}")
        try:
            if _get(port, "/readyz", 1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"galr-serve was not ready within {limit_s:.0f} s")


def _batch_stats(port: int) -> tuple[float, float]:
    """(sum, count) of the service's encoder batch sizes so far."""
    text = _get(port, "/metrics")[1].decode()
    values = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(("galr_batch_queries_sum", "galr_batch_queries_count"))}
    return values.get("galr_batch_queries_sum", 0.0), values.get("galr_batch_queries_count", 0.0)


class _Connection:
    """A minimal keep-alive HTTP/1.1 client for the load generator.

    The generator shares the machine's cores with the service it measures, so its own cost per request
    is kept small: the request bytes are built once per query, and the response is read by its
    ``Content-Length`` alone (the status line and that one header are all it parses), about a
    tenth of ``http.client``'s work per request.
    """

    def __init__(self, port: int, timeout: float) -> None:
        self._address, self._timeout = ("127.0.0.1", port), timeout
        self._socket: socket.socket | None = None
        self._buffer = b""

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
        self._socket, self._buffer = None, b""

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """One request; the status and body of its response (OSError when the connection fails)."""
        if self._socket is None:
            self._socket = socket.create_connection(self._address, timeout=self._timeout)
            self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            self._receive()
        head, self._buffer = self._buffer[:end], self._buffer[end + 4:]
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        lengths = [int(value) for name, _, value in (line.partition(b":") for line in lines[1:])
                   if name.strip().lower() == b"content-length"]
        if not lengths:
            raise OSError("a response without Content-Length")
        length = lengths[0]
        while len(self._buffer) < length:
            self._receive()
        answer, self._buffer = self._buffer[:length], self._buffer[length:]
        return status, answer

    def _receive(self) -> None:
        chunk = self._socket.recv(65536)
        if not chunk:
            raise OSError("the service closed the connection")
        self._buffer += chunk


def _client(port: int, queries: list[str], settings: ServeBenchSettings, latencies: list[float],
            errors: list[str]) -> None:
    connection = _Connection(port, settings.timeout_s)
    bodies = [json.dumps({"queries": [query], "top_k": 10, "rerank": settings.rerank}).encode() for query in queries]
    try:
        for body in bodies:
            began = time.perf_counter()
            try:
                status, _ = connection.post("/v1/search/text", body)
            except (OSError, ValueError) as exc:
                errors.append(str(exc) or type(exc).__name__)
                connection.close()
                continue
            if status != 200:
                errors.append(f"HTTP {status}")
                continue
            latencies.append((time.perf_counter() - began) * 1e3)
    finally:
        connection.close()


class QueryPool:
    """Benchmark queries, each handed out once: the service remembers recent queries' tokens, so a
    query sent again would skip its tokenisation and flatter the run that repeats it."""

    def __init__(self, queries: list[str]) -> None:
        self._queries, self._next = queries, 0

    def take(self, count: int) -> list[str]:
        if self._next + count > len(self._queries):
            raise ValueError(f"the pool of {len(self._queries)} benchmark queries is used up")
        self._next += count
        return self._queries[self._next - count:self._next]


def measure_repeated(port: int, clients: int, pool: QueryPool, settings: ServeBenchSettings) -> dict[str, Any]:
    """:func:`measure_clients` ``repeats`` times in a row with fresh queries: the run of median
    throughput, with every run's queries/s in ``runs_queries_per_s`` (this machine's speed drifts)."""
    runs = [measure_clients(port, clients, pool.take(clients * settings.requests_per_client), settings)
            for _ in range(max(1, settings.repeats))]
    ranked = sorted(runs, key=lambda run: run["queries_per_s"] or 0.0)
    return {**ranked[(len(ranked) - 1) // 2], "runs_queries_per_s": [run["queries_per_s"] for run in runs]}


def measure_clients(port: int, clients: int, queries: list[str], settings: ServeBenchSettings) -> dict[str, Any]:
    """One load step: ``clients`` threads, ``requests_per_client`` searches each."""
    before_sum, before_count = _batch_stats(port)
    latencies: list[float] = []
    errors: list[str] = []
    per_client = settings.requests_per_client
    threads = [threading.Thread(target=_client, args=(port, queries[i * per_client:(i + 1) * per_client], settings,
                                                      latencies, errors))
               for i in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    after_sum, after_count = _batch_stats(port)
    p50, p95, p99 = (float(np.percentile(latencies, q)) if latencies else None for q in (50, 95, 99))
    return {"clients": clients, "requests": clients * per_client, "ok": len(latencies), "errors": len(errors),
            "error_examples": sorted(set(errors))[:3], "wall_s": round(wall, 2),
            "queries_per_s": len(latencies) / wall if wall else None, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
            "p99_over_p50": (p99 / p50) if p50 else None,
            "mean_batch": ((after_sum - before_sum) / (after_count - before_count)) if after_count > before_count
            else None}


def reference_throughput(bench: Any, queries: list[str], batch: int, runs: int = 15) -> float:
    """The text encoder's own queries/s at ``batch`` (median of ``runs`` batches of different queries),
    in this process."""
    from galr.runtime.encoders import load_engine

    with load_engine(bench.bundle, backend="onnxruntime", device="cpu", precision="fp32") as encoders:
        encoders.encode_text(queries[:batch])  # warm-up
        rates = []
        for number in range(runs):
            block = [queries[(number * batch + i) % len(queries)] for i in range(batch)]
            began = time.perf_counter()
            encoders.encode_text(block)
            rates.append(len(block) / (time.perf_counter() - began))
    return float(np.median(rates))


def measure_soak(port: int, pid: int, queries: list[str], settings: ServeBenchSettings, log: Log) -> dict[str, Any]:
    """Steady load for ``soak_minutes``: ``soak_clients`` clients searching back to back; the server's
    resident memory sampled every ``soak_sample_s``. Memory is flat when the fitted slope after the first
    minute (warm-up: allocator pools, caches) stays within noise."""
    deadline = time.monotonic() + settings.soak_minutes * 60
    latencies: list[float] = []
    errors: list[str] = []
    samples: list[tuple[float, int]] = []
    began = time.monotonic()

    def client(offset: int) -> None:
        mine = queries[offset:] + queries[:offset]
        while time.monotonic() < deadline:
            _client(port, mine[:20], settings, latencies, errors)

    threads = [threading.Thread(target=client, args=(n * 7,)) for n in range(settings.soak_clients)]
    for thread in threads:
        thread.start()
    while time.monotonic() < deadline:
        resident = resident_bytes(pid)
        if resident is not None:
            samples.append((time.monotonic() - began, resident))
        time.sleep(min(settings.soak_sample_s, max(0.0, deadline - time.monotonic())))
    for thread in threads:
        thread.join()
    wall = time.monotonic() - began
    warm = [(t, rss) for t, rss in samples if t >= min(60.0, wall / 3)]
    slope = None
    if len(warm) >= 3:
        times, sizes = np.array([t for t, _ in warm]), np.array([rss for _, rss in warm], float)
        slope = float(np.polyfit(times / 60, sizes / 2**20, 1)[0])  # MiB per minute
    sizes = [rss for _, rss in samples]
    log(f"serve: soak done, {len(latencies)} searches, {len(errors)} errors")
    return {"minutes": round(wall / 60, 2), "clients": settings.soak_clients, "requests": len(latencies) + len(errors),
            "errors": len(errors), "error_examples": sorted(set(errors))[:3],
            "queries_per_s": len(latencies) / wall if wall else None,
            "p50_ms": float(np.percentile(latencies, 50)) if latencies else None,
            "p99_ms": float(np.percentile(latencies, 99)) if latencies else None,
            "rss_start_bytes": sizes[0] if sizes else None, "rss_end_bytes": sizes[-1] if sizes else None,
            "rss_max_bytes": max(sizes) if sizes else None,
            "rss_after_warmup_bytes": warm[0][1] if warm else None, "slope_mib_per_min": slope,
            "samples": [[round(t, 1), rss] for t, rss in samples]}


def _stop(process: subprocess.Popen, interrupt: bool = False) -> None:
    import signal

    if interrupt:
        process.send_signal(signal.SIGINT)  # galr-serve --ray then stops Serve and Ray itself
    else:
        process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _start_service(bench: Any, index: Path, settings: ServeBenchSettings, *flags: str) -> tuple[subprocess.Popen, int]:
    """A ``galr-serve`` process on a free loopback port (FP32 ONNX Runtime on the CPU) and its port."""
    port = _free_port()
    command = [sys.executable, "-c", _SERVE, "--engine", str(bench.bundle), "--index", str(index), "--port", str(port),
               "--backend", "onnxruntime", "--device", "cpu", "--precision", "fp32", "--max-batch",
               str(settings.reference_batch), "--max-wait-ms", str(settings.max_wait_ms), *flags]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), port


def _stderr_tail(process: subprocess.Popen) -> str:
    return (process.stderr.read() if process.poll() is not None else "")[-300:]


def measure_spinning(bench: Any, index: Path, pool: QueryPool, settings: ServeBenchSettings, log: Log
                     ) -> dict[str, Any]:
    """The fewest and the most clients against ``galr-serve --spin`` (ONNX Runtime's threads spinning
    after their work, its own default), to compare with the service's default (not spinning)."""
    if not settings.compare_spinning:
        return not_run("not asked for (compare_spinning is off)")
    process, port = _start_service(bench, index, settings, "--spin")
    try:
        _wait_ready(port, process)
        rows = []
        for clients in sorted({min(settings.clients), max(settings.clients)}):
            log(f"serve: {clients} client(s) x {settings.requests_per_client} requests, ONNX Runtime spinning")
            rows.append(measure_repeated(port, clients, pool, settings))
    except RuntimeError as exc:
        return not_run(f"{exc}: {_stderr_tail(process)}")
    finally:
        _stop(process)
    return {"status": STATUS_OK, "rows": rows}


def measure_ray(bench: Any, index: Path, pool: QueryPool, settings: ServeBenchSettings, log: Log
                ) -> dict[str, Any]:
    """The largest client count against ``galr-serve --ray`` with ``ray_replicas`` replicas on this machine."""
    if settings.ray_replicas < 1:
        return not_run("not asked for (ray_replicas is 0)")
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        return not_run("Ray Serve is not installed (pip install 'galr[ray]')")
    log(f"serve: galr-serve --ray with {settings.ray_replicas} replicas")
    process, port = _start_service(bench, index, settings, "--ray", "--replicas", str(settings.ray_replicas),
                                   "--replica-cpus", str(1.0 / settings.ray_replicas))
    try:
        _wait_ready(port, process, limit_s=180)
        clients = max(settings.clients)
        log(f"serve: {clients} client(s) x {settings.requests_per_client} requests through Ray's proxy")
        row = measure_clients(port, clients, pool.take(clients * settings.requests_per_client), settings)
    except RuntimeError as exc:
        return not_run(f"{exc}: {_stderr_tail(process)}")
    finally:
        _stop(process, interrupt=True)
    return {"status": STATUS_OK, "replicas": settings.ray_replicas, "row": row}


def run_serve_benchmarks(bench: Any | None, settings: ServeBenchSettings, log: Log) -> dict[str, Any]:
    """The ``serve`` section (needs the benchmark model and the serve extra)."""
    if bench is None:
        return not_run("the encoder section's model was not built (encoders not selected)")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return not_run("the serve extra is not installed (pip install 'galr[serve]')")
    from galr.bench.bounds import write_random_index
    from galr.bench.encoders import synthetic_queries

    elapsed = stopwatch()
    # Fresh queries for every run: the table's steps, the spinning steps and Ray's.
    steps = sum(settings.clients) + min(settings.clients) + max(settings.clients)
    total = (steps * max(1, settings.repeats) + max(settings.clients)) * settings.requests_per_client
    queries = synthetic_queries(bench.vocab, max(total, settings.reference_batch), 16, settings.seed)
    pool = QueryPool(queries)
    log(f"serve: text encoder alone at batch {settings.reference_batch}")
    reference_before = reference_throughput(bench, queries, settings.reference_batch)
    with tempfile.TemporaryDirectory(prefix="galr-bench-serve-") as work:
        index = write_random_index(bench, Path(work), settings.gallery, settings.text_bank, settings.seed)
        process, port = _start_service(bench, index, settings)
        try:
            _wait_ready(port, process)
            rows = []
            for clients in settings.clients:
                log(f"serve: {clients} client(s) x {settings.requests_per_client} requests")
                rows.append(measure_repeated(port, clients, pool, settings))
            soak = not_run("not asked for (galr-bench --soak-minutes N)")
            if settings.soak_minutes > 0:
                log(f"serve: {settings.soak_minutes:g}-minute soak with {settings.soak_clients} clients")
                soak = {"status": STATUS_OK, **measure_soak(port, process.pid, queries, settings, log)}
        except RuntimeError as exc:
            return not_run(f"{exc}: {_stderr_tail(process)}")
        finally:
            _stop(process)
        spinning = measure_spinning(bench, index, pool, settings, log)
        # Again once the service has stopped: this machine's speed drifts by several per cent over
        # minutes, so the reference is the mean of the two.
        reference_after = reference_throughput(bench, queries, settings.reference_batch)
        ray_row = measure_ray(bench, index, pool, settings, log)
    return {"status": STATUS_OK, "settings": settings.to_dict(),
            "reference_queries_per_s": (reference_before + reference_after) / 2,
            "reference_before_after": [reference_before, reference_after],
            "rows": rows, "spinning": spinning, "ray": ray_row, "soak": soak, "seconds": round(elapsed(), 1)}


__all__ = ["QueryPool", "ServeBenchSettings", "measure_clients", "measure_ray", "measure_repeated", "measure_soak",
           "measure_spinning", "run_serve_benchmarks"]
