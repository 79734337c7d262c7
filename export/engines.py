"""``galr-build``: compile a bundle's ONNX graphs into TensorRT engines for the local GPU.

Engines are stored inside the bundle under ``engines/<key>/`` where the key names the GPU
architecture, the TensorRT version, the precision and the hash of the graphs they were built from
(:class:`~galr.bundle.EngineKey`), so a bundle can carry engines for several machines and the
runtime picks the one that fits (or refuses with the rebuild command). Nothing here has been
executed on a GPU in this project's CI.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Callable

from galr import graphs
from galr.bundle import (
    ENGINE_PRECISIONS,
    EngineEntry,
    engine_key,
    engine_member,
    read_bundle,
    update_bundle,
)
from galr.clock import utc_now
from galr.errors import UnavailableError
from galr.runtime.backends.device import GpuInfo, probe_gpu, probe_tensorrt


class EngineBuildUnavailable(UnavailableError):
    """TensorRT or a GPU is missing, so no engine can be built on this machine."""


def check_engine_build_possible() -> None:
    """Raise :class:`EngineBuildUnavailable` unless TensorRT imports and a GPU is visible."""
    if probe_tensorrt() is None:
        raise EngineBuildUnavailable("TensorRT is not installed (pip install 'galr[tensorrt]' on a GPU machine)")
    if probe_gpu() is None:
        raise EngineBuildUnavailable("no CUDA GPU is visible")


def build_bundle_engines(bundle_path: Path, precisions: list[str] | None = None, max_batch: int = 32,
                         workspace_bytes: int = 2 << 30, timing_cache: Path | None = None,
                         log: Callable[[str], None] = print, trt: ModuleType | None = None,
                         gpu_probe: Callable[[], GpuInfo | None] = probe_gpu) -> list[EngineEntry]:
    """Build engines for ``precisions`` (default: every TensorRT precision in the bundle, so not
    ``int8-cpu``) and store them.

    Args:
        bundle_path: the bundle, rewritten atomically with the new engine sets.
        precisions: precisions to build.
        max_batch: largest batch of the optimisation profiles.
        workspace_bytes: TensorRT builder workspace.
        timing_cache: TensorRT timing cache file (per GPU and TensorRT version).
        log: progress messages.
        trt: the ``tensorrt`` module (tests inject a fake); imported when ``None``.
        gpu_probe: returns the visible GPU (tests inject one).

    Raises:
        NotFoundError, BundleError: the bundle is missing or damaged (checked first).
        EngineBuildUnavailable: TensorRT is not importable or no GPU is visible.
        TensorRTBuildError: a build failed (the bundle is left unchanged).
    """
    from galr.export.tensorrt import TensorRTBuildConfig, build_engine, default_profiles

    bundle = read_bundle(bundle_path)  # a bad bundle is the user's to fix first, whatever the machine
    if trt is None:
        check_engine_build_possible()
    gpu = gpu_probe()
    if gpu is None:
        raise EngineBuildUnavailable("no CUDA GPU is visible")
    trt_version = str(trt.__version__) if trt is not None else probe_tensorrt().version
    max_text = bundle.spec.max_text_length
    entries, members = [], {}
    # int8-cpu graphs are for ONNX Runtime's CPU provider (MatMulNBits, u8/s8 QDQ); TensorRT builds int8.
    for precision in precisions or [p for p in bundle.precisions if p in ENGINE_PRECISIONS]:
        key = engine_key(bundle, precision, gpu.compute_capability, trt_version)
        plan_members, profiles = {}, {}
        for name in graphs.GRAPH_NAMES:
            build = TensorRTBuildConfig(precision=precision, workspace_bytes=workspace_bytes,
                                        profiles=default_profiles(name, bundle.config, max_text, max_batch=max_batch),
                                        timing_cache=str(timing_cache) if timing_cache else None)
            log(f"building TensorRT {precision} engine for the {name} graph on {gpu.name} ({key.as_string()})")
            plan = build_engine(bundle.onnx_bytes(name, precision), build, trt, source_precision=precision,
                                gpu_probe=lambda: gpu)
            member = engine_member(key.as_string(), name)
            members[member] = plan
            plan_members[name] = member
            profiles[name] = build.to_dict()["profiles"]
        entries.append(EngineEntry(key, gpu.name, utc_now(), plan_members, profiles))
    built = {entry.key_string for entry in entries}
    kept = [entry for entry in bundle.engine_entries if entry.key_string not in built]
    dropped = [m for entry in bundle.engine_entries if entry.key_string in built for m in entry.members.values()]
    changes: dict = {"engines": [entry.to_dict() for entry in kept + entries]}
    if bundle.detector is not None:
        changes["detector"], plan_member, plan, replaced = _detector_engine(bundle, gpu, trt, trt_version,
                                                                            workspace_bytes, timing_cache, log)
        members[plan_member] = plan
        dropped += replaced
    update_bundle(bundle, changes, members, drop_members=dropped)
    log(f"stored {len(entries)} engine set(s){' and a detector engine' if bundle.detector else ''} in {bundle_path}")
    return entries


def detector_engine_key(compute_capability: str, tensorrt_version: str, detector_sha256: str) -> str:
    """What a detector plan is tied to: the GPU architecture, the TensorRT version and the detector's bytes."""
    return f"{compute_capability}-trt{tensorrt_version}-{detector_sha256[:12]}"


def _detector_engine(bundle, gpu: GpuInfo, trt: ModuleType | None, trt_version: str, workspace_bytes: int,
                     timing_cache: Path | None, log: Callable[[str], None]) -> tuple[dict, str, bytes, list[str]]:
    """Build the bundled detector's plan (FP32, batch 1 at its input size): the manifest entry with the
    plan listed, the plan's member and bytes, and the members of the plan it replaces."""
    from galr.export.tensorrt import TensorRTBuildConfig, build_engine

    entry = dict(bundle.detector)
    height, width = entry["imgsz"]
    shape = (1, 3, int(height), int(width))
    build = TensorRTBuildConfig(precision="fp32", workspace_bytes=workspace_bytes, profiles={"images": [shape] * 3},
                                timing_cache=str(timing_cache) if timing_cache else None)
    key = detector_engine_key(gpu.compute_capability, trt_version, entry["sha256"])
    log(f"building the TensorRT engine of the bundled detector {entry.get('source')} on {gpu.name} ({key})")
    plan = build_engine(bundle.detector_bytes(), build, trt, source_precision="fp32", gpu_probe=lambda: gpu)
    member = f"engines/detector/{key}.plan"
    others = [e for e in entry.get("engines", []) if e.get("key") != key]
    replaced = [e["member"] for e in entry.get("engines", []) if e.get("key") == key]
    entry["engines"] = others + [{"key": key, "compute_capability": gpu.compute_capability,
                                  "tensorrt_version": trt_version, "gpu": gpu.name, "built": utc_now(),
                                  "member": member}]
    return entry, member, plan, replaced


__all__ = ["EngineBuildUnavailable", "build_bundle_engines", "check_engine_build_possible", "detector_engine_key"]
