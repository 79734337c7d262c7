"""``galr-build``: compile a bundle's ONNX graphs into TensorRT engines for the local GPU.

Engines are stored inside the bundle under ``engines/<key>/`` where the key names the GPU
architecture, the TensorRT version, the precision and the hash of the ONNX graphs, so a bundle
can carry engines for several machines and the runtime picks the one that fits (or refuses
with the rebuild command). Nothing here has been executed on a GPU in this project's CI.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Callable

from galr import graphs
from galr.config import GaLRConfig
from galr.runtime.backends.device import probe_gpu, probe_tensorrt
from galr.runtime.backends.tensorrt import EngineKey
from galr.runtime.bundle import engine_member, read_bundle, sha256_bytes, update_bundle


class EngineBuildUnavailable(RuntimeError):
    """TensorRT or a GPU is missing, so no engine can be built on this machine."""


def precision_hash(bundle, precision: str) -> str:
    """One hash over the four ONNX graphs of a precision (the engine key's ONNX identity)."""
    return sha256_bytes(b"".join(bundle.onnx_bytes(name, precision) for name in graphs.GRAPH_NAMES))


def check_engine_build_possible() -> None:
    """Raise :class:`EngineBuildUnavailable` unless TensorRT imports and a GPU is visible."""
    if probe_tensorrt() is None:
        raise EngineBuildUnavailable("TensorRT is not installed (pip install 'galr[tensorrt]' on a GPU machine)")
    if probe_gpu() is None:
        raise EngineBuildUnavailable("no CUDA GPU is visible")


def build_bundle_engines(bundle_path: Path, precisions: list[str] | None = None, max_batch: int = 32,
                         workspace_bytes: int = 2 << 30, timing_cache: Path | None = None,
                         log: Callable[[str], None] = print, trt=None) -> list[dict[str, Any]]:
    """Build engines for ``precisions`` (default: every precision in the bundle) and store them.

    Raises:
        EngineBuildUnavailable: TensorRT is not importable or no GPU is visible.
        TensorRTBuildError: a build failed (the bundle is left unchanged).
    """
    from galr.export.tensorrt import TensorRTBuildConfig, build_engine, default_profiles

    if trt is None:
        check_engine_build_possible()
    gpu = probe_gpu()
    if gpu is None:
        raise EngineBuildUnavailable("no CUDA GPU is visible")
    trt_version = str(trt.__version__) if trt is not None else probe_tensorrt().version
    bundle = read_bundle(bundle_path)
    config = GaLRConfig.from_dict(bundle.manifest["model"])
    max_text = int(bundle.manifest.get("tokenizer", {}).get("max_length", 64))
    entries, members = [], {}
    for precision in precisions or bundle.precisions:
        key = EngineKey(gpu.compute_capability, trt_version, precision, precision_hash(bundle, precision))
        entry: dict[str, Any] = {"key": key.to_dict(), "key_string": key.as_string(), "gpu": gpu.name,
                                 "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                 "members": {}, "profiles": {}}
        for name in graphs.GRAPH_NAMES:
            profiles = default_profiles(name, config, max_batch=max_batch, max_text_length=max_text)
            build = TensorRTBuildConfig(precision=precision, workspace_bytes=workspace_bytes, profiles=profiles,
                                        timing_cache=str(timing_cache) if timing_cache else None)
            log(f"building TensorRT {precision} engine for the {name} graph on {gpu.name} ({key.as_string()})")
            plan = build_engine(bundle.onnx_bytes(name, precision), build, trt, source_precision=precision,
                                gpu_probe=lambda: gpu)
            member = engine_member(key.as_string(), name)
            members[member] = plan
            entry["members"][name] = member
            entry["profiles"][name] = build.to_dict()["profiles"]
        entries.append(entry)
    kept = [e for e in bundle.engines() if e["key_string"] not in {n["key_string"] for n in entries}]
    dropped = [m for e in bundle.engines() if e not in kept for m in e["members"].values()]
    update_bundle(bundle, {"engines": kept + entries}, members, drop_members=dropped)
    log(f"stored {len(entries)} engine set(s) in {bundle_path}")
    return entries
