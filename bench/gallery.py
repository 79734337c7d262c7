"""Gallery benchmarks: index build throughput with the real encoder, search latency and memory at scale.

Two measurements:

* **Index build** (:func:`measure_index_build`): :func:`galr.runtime.index.build_index` over a few
  dozen synthetic PNG files (smooth random scenes at the model's input size, no detection files, so
  DREA takes its documented all-zero fallback), per ONNX Runtime precision: decode, preprocess, the
  three image graphs and the index insert. Reported as images/s.
* **Search at scale** (:func:`measure_search`): galleries of ``sizes`` random unit embeddings stored
  as fp32 and fp16 (no encoder: at 10^6 images it would take hours), searched exactly for the top
  ``k``. Each (size, storage) runs in a **fresh Python process** so its memory figures are its own:
  the process reports its resident set and its peak (``VmRSS``/``VmHWM``, else ``getrusage``) before and after
  filling the index, and the index is filled in blocks of ``block_rows`` through
  :meth:`GalleryIndex.add`, as ``galr-index`` would. Reported: insert rate (embeddings/s, with their
  records), search latency p50/p95/p99 for one query and throughput (queries/s) for batches of
  ``query_batch`` queries, and bytes per image (embedding storage, resident set delta, peak delta).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from galr.bench.harness import (
    STATUS_OK,
    Log,
    TimingSettings,
    measure,
    not_run,
    peak_bytes,
    resident_bytes,
    stopwatch,
)

_CHILD_FLAG = "--search-case"


@dataclass(frozen=True)
class GallerySettings:
    """What the gallery section measures.

    Attributes:
        sizes: gallery sizes for search and memory.
        storages: index storage dtypes (``"fp32"``, ``"fp16"``).
        embed_dim: embedding size ``D``.
        top_k: results per query.
        query_batch: queries per call of the batched search.
        block_rows: rows per :meth:`GalleryIndex.add` call while filling.
        build_images: synthetic image files encoded for the build throughput.
        build_batch: images per engine call during the build.
        ray_images: synthetic images for the Ray Data indexing comparison (0: not measured).
        ray_workers: encoder actors of that comparison (one CPU each).
        timing: timing of the search cases.
        threads: BLAS/OpenMP threads of the search processes.
        seed: seed of the embeddings and images.
    """

    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    storages: tuple[str, ...] = ("fp32", "fp16")
    embed_dim: int = 512
    top_k: int = 10
    query_batch: int = 32
    block_rows: int = 100_000
    build_images: int = 48
    build_batch: int = 16
    ray_images: int = 0
    ray_workers: int = 2
    timing: TimingSettings = TimingSettings(warmup=1, repeats=3, min_iterations=1, max_iterations=100, target_seconds=0.5)
    threads: int = 2
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes), "storages": list(self.storages), "embed_dim": self.embed_dim,
                "top_k": self.top_k, "query_batch": self.query_batch, "block_rows": self.block_rows,
                "build_images": self.build_images, "build_batch": self.build_batch, "ray_images": self.ray_images,
                "ray_workers": self.ray_workers, "timing": self.timing.to_dict(),
                "threads": self.threads, "seed": self.seed}


# ---------------------------------------------------------------------------------------------
# Index build with the real encoder


def write_synthetic_images(folder: Path, count: int, size: int, seed: int) -> list[Path]:
    """``count`` smooth random RGB PNGs (``size`` x ``size``): upsampled noise, cheap to make, real to decode."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(count):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        picture = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
        path = folder / f"scene_{number:04d}.png"
        picture.save(path)
        paths.append(path)
    return paths


def measure_index_build(bench: Any, settings: GallerySettings, log: Log) -> list[dict[str, Any]]:
    """Images/s of :func:`~galr.runtime.index.build_index` per ONNX Runtime precision in the bundle.

    Args:
        bench: the :class:`~galr.bench.encoders.BenchModel`.
        settings: image count, batch and threads.
        log: progress messages.

    Returns:
        One row per precision: images, seconds (min/median/max over the runs), images/s.
    """
    from galr.bench.encoders import open_backend
    from galr.runtime.index import build_index

    rows = []
    with tempfile.TemporaryDirectory(prefix="galr-bench-images-") as folder:
        paths = write_synthetic_images(Path(folder), settings.build_images, bench.model.config.image_size, settings.seed)
        for precision in ("fp32", "int8"):
            backend = f"onnxruntime-{precision}"
            if precision not in bench.precisions:
                rows.append({"backend": backend, **not_run(bench.int8_error or f"no {precision} graphs")})
                continue
            encoders = open_backend(bench, backend, settings.threads)
            log(f"index build, {backend}: {len(paths)} images")

            def build(encoders: Any = encoders) -> None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # one no-detection warning per image
                    build_index(encoders, paths, batch_size=settings.build_batch, progress=False, root=folder)

            timing = TimingSettings(warmup=1, repeats=settings.timing.repeats, min_iterations=1, max_iterations=1,
                                    target_seconds=1.0)
            throughput = measure(build, timing, items=len(paths)).throughput()
            encoders.close()
            rows.append({"backend": backend, "status": STATUS_OK, "images": len(paths), "batch": settings.build_batch,
                         "images_per_s": throughput})
    return rows


def measure_ray_indexing(bench: Any, settings: GallerySettings, log: Log) -> dict[str, Any]:
    """Images/s of ``galr-index --ray`` (Ray Data, local) against one process on the same images and CPUs.

    Both sides run the bundle's FP32 graphs on ONNX Runtime's CPU provider and include loading the
    engine (the Ray side in every actor). Ray's own start-up is timed apart, so the figure is given
    with and without it. One run each (tens of seconds; the spread of the other build rows applies).
    """
    if not settings.ray_images:
        return not_run("not asked for (ray_images is 0)")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        return not_run("Ray Data is not installed (pip install 'galr[ray]')")
    import os

    from galr.runtime.backends.onnxruntime import OnnxRuntimeOptions
    from galr.runtime.encoders import load_engine
    from galr.runtime.index import build_index
    from galr.runtime.index.distributed import DistributedSettings, build_index_on_ray

    cpus = settings.ray_workers
    with tempfile.TemporaryDirectory(prefix="galr-bench-ray-") as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one no-detection warning per image
        paths = write_synthetic_images(Path(folder) / "images", settings.ray_images, bench.model.config.image_size,
                                       settings.seed + 1)
        log(f"index build, one process vs Ray Data ({cpus} workers): {len(paths)} images")
        single = stopwatch()
        with load_engine(bench.bundle, backend="onnxruntime", device="cpu", precision="fp32",
                         options=[OnnxRuntimeOptions(intra_op_threads=cpus)]) as encoders:
            index, _ = build_index(encoders, paths, batch_size=32, progress=False, root=Path(folder) / "images")
            model_hash, embed_dim = encoders.model_hash, encoders.embed_dim
        single_s = single()
        started = stopwatch()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        start_s = started()
        try:
            encoded = stopwatch()
            distributed, _ = build_index_on_ray(
                bench.bundle, paths, Path(folder) / "ray.gidx",
                DistributedSettings(workers=cpus, cpus_per_worker=1.0, shard_size=64, batch_size=32),
                model_hash=model_hash, embed_dim=embed_dim, root=str(Path(folder) / "images"), backend="onnxruntime",
                device="cpu", precision="fp32", log=lambda _: None, progress=False)
            ray_s = encoded()
        finally:
            ray.shutdown()
        agree = float(np.max(np.abs(distributed.image_vectors() - index.image_vectors())))
    count = len(paths)
    return {"status": STATUS_OK, "images": count, "cpus": cpus, "cpu_count": os.cpu_count(),
            "single_s": round(single_s, 2), "ray_start_s": round(start_s, 2), "ray_s": round(ray_s, 2),
            "single_images_per_s_per_cpu": round(count / single_s / cpus, 2),
            "ray_images_per_s_per_cpu": round(count / ray_s / cpus, 2),
            "ray_with_start_images_per_s_per_cpu": round(count / (ray_s + start_s) / cpus, 2),
            "max_abs_difference": agree}


# ---------------------------------------------------------------------------------------------
# Search at scale, one process per case


def search_case(size: int, storage: str, settings: GallerySettings) -> dict[str, Any]:
    """Fill one index and time its search (runs in the calling process; see :func:`measure_search`).

    Returns:
        The row for this (size, storage).
    """
    from galr.runtime.index import GalleryIndex, ImageRecord
    from galr.runtime.index.vectors import STORAGE_DTYPES

    rng = np.random.default_rng(settings.seed)
    dim = settings.embed_dim
    resident_before, peak_before = resident_bytes(), peak_bytes()
    index = GalleryIndex("benchmark", dim, storage)
    insert_seconds = 0.0
    for start in range(0, size, settings.block_rows):
        rows = min(settings.block_rows, size - start)
        block = rng.standard_normal((rows, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        elapsed = stopwatch()
        index.add([ImageRecord(f"image_{i:07d}", "", 0, 0) for i in range(start, start + rows)], block)
        insert_seconds += elapsed()
        del block
    resident_after, peak_after = resident_bytes(), peak_bytes()
    queries = rng.standard_normal((settings.query_batch, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    single = measure(lambda: index.search(queries[:1], k=settings.top_k, device="cpu"), settings.timing)
    batched = measure(lambda: index.search(queries, k=settings.top_k, device="cpu"),
                      settings.timing.with_iterations(1, settings.timing.max_iterations), items=settings.query_batch)
    resident_delta = None if resident_before is None or resident_after is None else resident_after - resident_before
    return {
        "size": size, "storage": storage, "status": STATUS_OK,
        "insert_per_s": size / insert_seconds if insert_seconds > 0 else None,
        "latency_ms_one_query": single.latency_ms(),
        "queries_per_s_batched": batched.throughput(),
        "query_batch": settings.query_batch,
        "memory": {
            "embedding_bytes_per_image": np.dtype(STORAGE_DTYPES[storage]).itemsize * dim,
            "resident_delta_mb": None if resident_delta is None else resident_delta / 2**20,
            "resident_bytes_per_image": None if resident_delta is None else resident_delta / size,
            "peak_delta_mb": (peak_after - peak_before) / 2**20,
            "peak_bytes_per_image": (peak_after - peak_before) / size,
        },
    }


def _child_environment(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    return env


def _run_child(size: int, storage: str, settings: GallerySettings) -> dict[str, Any]:
    request = json.dumps({"size": size, "storage": storage, "settings": settings.to_dict()})
    completed = subprocess.run([sys.executable, "-m", "galr.bench.gallery", _CHILD_FLAG, request], capture_output=True,
                               text=True, env=_child_environment(settings.threads), check=False)
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-3:]
        return {"size": size, "storage": storage, **not_run(f"search process failed: {' | '.join(tail)}")}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure_search(settings: GallerySettings, log: Log) -> list[dict[str, Any]]:
    """Search latency, throughput, insert rate and memory per (size, storage), each in its own process."""
    rows = []
    for size in settings.sizes:
        for storage in settings.storages:
            log(f"gallery of {size} embeddings ({storage}): fill, search, memory")
            rows.append(_run_child(size, storage, settings))
    return rows


def run_gallery_benchmarks(bench: Any | None, settings: GallerySettings, log: Log) -> dict[str, Any]:
    """The ``gallery`` section: index build throughput (when a model is given) and search at scale.

    Args:
        bench: the :class:`~galr.bench.encoders.BenchModel`, or ``None`` to skip the build measurement.
        settings: sizes, storages, timing.
        log: progress messages.
    """
    elapsed = stopwatch()
    build = measure_index_build(bench, settings, log) if bench is not None else [
        {"backend": "onnxruntime-fp32", **not_run("the encoder section's model was not built (encoders not selected)")}]
    ray = measure_ray_indexing(bench, settings, log) if bench is not None else not_run("no model built")
    return {"status": STATUS_OK, "settings": settings.to_dict(), "build": build, "ray": ray,
            "search": measure_search(settings, log), "seconds": round(elapsed(), 1)}


def _settings_from_dict(values: dict[str, Any]) -> GallerySettings:
    values = dict(values)
    values["timing"] = TimingSettings.from_dict(values["timing"])
    for name in ("sizes", "storages"):
        values[name] = tuple(values[name])
    return GallerySettings(**values)


def _child_main(argv: Sequence[str]) -> None:
    from galr.bench.harness import plain

    request = json.loads(argv[1])
    row = search_case(int(request["size"]), request["storage"], _settings_from_dict(request["settings"]))
    print(json.dumps(plain(row)))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == _CHILD_FLAG:
    _child_main(sys.argv[1:])


__all__ = [
    "GallerySettings",
    "measure_index_build",
    "measure_search",
    "run_gallery_benchmarks",
    "search_case",
    "write_synthetic_images",
]
