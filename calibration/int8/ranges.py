"""Activation ranges for INT8: collected with ONNX Runtime's calibrators, cached as JSON."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from galr.atomic import write_bytes_atomically
from galr.calibration.int8.settings import (
    METHODS,
    CalibrationError,
    CalibrationSettings,
)
from galr.calibration.readers import FeedReader
from galr.container import sha256_bytes
from galr.errors import InputError

_CACHE_FORMAT = "galr-int8-ranges"
_CACHE_VERSION = 1
# Batches per ORT collect_data call: bounds the intermediate tensors it keeps in memory.
_BATCHES_PER_COLLECT = 4

Ranges = dict[str, tuple[float, float]]


def range_cache_key(graph_sha256: str, set_hash: str, settings: CalibrationSettings) -> dict[str, Any]:
    """What cached ranges depend on: the graph (with its upstream graphs), the calibration set, the method."""
    return {"graph_sha256": graph_sha256, "calibration_set": set_hash, "method": settings.method_tag,
            "op_types": sorted(settings.op_types), "symmetric": True}


def _cache_file(cache_dir: Path, graph_name: str, key: Mapping[str, Any]) -> Path:
    digest = sha256_bytes(json.dumps(key, sort_keys=True).encode("utf-8"))
    return cache_dir / f"int8-ranges-{graph_name}-{digest[:32]}.json"


def _read_cached_ranges(path: Path, key: Mapping[str, Any], log: Callable[[str], None]) -> Ranges | None:
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload.get("format") != _CACHE_FORMAT or payload.get("version") != _CACHE_VERSION or payload.get("key") != dict(key):
            raise InputError("written by another galr version or for another key")
        return {name: (float(low), float(high)) for name, (low, high) in payload["ranges"].items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        log(f"ignoring calibration cache {path}: {error}; collecting ranges again")
        return None


def _write_cached_ranges(path: Path, key: Mapping[str, Any], ranges: Ranges) -> None:
    """Atomic write: a crash never leaves a half-written cache that a later run would trust."""
    payload = {"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "key": dict(key),
               "ranges": {name: [low, high] for name, (low, high) in sorted(ranges.items())}}
    write_bytes_atomically(path, json.dumps(payload).encode("utf-8"))


@contextlib.contextmanager
def quiet_onnxruntime_quantization() -> Iterator[None]:
    """Silence ORT's stdout prints (percentile statistics) and its "run pre-processing" advice."""

    def drop_preprocess_advice(record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop_preprocess_advice)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(drop_preprocess_advice)


def collect_ranges(model_path: Path, reader: FeedReader, settings: CalibrationSettings, work_dir: Path) -> Ranges:
    """Run ORT's calibrator for ``settings.method`` over ``reader``; symmetric (min, max) per calibrated tensor.

    Raises:
        CalibrationError: the reader is empty.
    """
    from onnxruntime.quantization import calibrate

    if not len(reader):
        raise CalibrationError("no calibration batches: the calibration set is empty")
    calibrator = calibrate.create_calibrator(
        Path(model_path), list(settings.op_types), augmented_model_path=str(work_dir / "augmented.onnx"),
        calibrate_method=calibrate.CalibrationMethod[METHODS[settings.method]],
        # ORT's default entropy histogram (128 bins -> 128 levels) leaves no threshold to choose but
        # the maximum, i.e. entropy silently becomes minmax; hence histogram_bins (>= 256).
        extra_options={"symmetric": True, "percentile": settings.percentile, "num_bins": settings.histogram_bins,
                       "num_quantized_bins": 128},
    )
    with quiet_onnxruntime_quantization():
        for chunk in reader.chunks(_BATCHES_PER_COLLECT):
            calibrator.collect_data(chunk)
        tensors = calibrator.compute_data()
    # Ranges come back as 0-d or 1-element arrays depending on the calibrator.
    return {name: (float(np.min(data.range_value[0])), float(np.max(data.range_value[1])))
            for name, data in tensors.data.items()}


def cached_or_collected_ranges(graph: bytes, upstream: bytes, model_path: Path, reader: FeedReader,
                               settings: CalibrationSettings, set_hash: str, name: str, work_dir: Path,
                               log: Callable[[str], None]) -> tuple[Ranges, bool]:
    """The ranges of one graph: from the cache when it holds this graph, set and method, else collected
    (and cached). Returns ``(ranges, from_cache)``.

    ``upstream`` are the bytes of graphs that produced the reader's feeds (the fusion graph's
    encoders), so cached ranges follow them too.
    """
    key = range_cache_key(sha256_bytes(graph + upstream), set_hash, settings)
    path = _cache_file(settings.cache_dir, name, key) if settings.cache_dir is not None else None
    ranges = _read_cached_ranges(path, key, log) if path is not None else None
    if ranges is not None:
        return ranges, True
    ranges = collect_ranges(model_path, reader, settings, work_dir)
    if path is not None:
        _write_cached_ranges(path, key, ranges)
    return ranges, False
