"""INT8 calibration settings and the error every INT8 step raises."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from galr.errors import InputError
from galr.serialization import fields_from_dict

# Our names -> ORT's CalibrationMethod members.
METHODS: dict[str, str] = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
# Ops TensorRT runs in INT8 from explicit Q/DQ and that carry the model's compute.
COMPUTE_OPS: frozenset[str] = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
DEFAULT_OP_TYPES: tuple[str, ...] = ("Conv", "Gemm", "MatMul")


class CalibrationError(InputError):
    """INT8 calibration cannot run (bad settings, no data, old ONNX Runtime) or made a graph TensorRT rejects."""


@dataclass(frozen=True)
class CalibrationSettings:
    """How INT8 graphs are calibrated and quantised.

    Attributes:
        dataset: dataset root (original layout) to calibrate on; ``None`` when inputs are given in memory.
        split: the split calibrated on ("train": never calibrate on the split the accuracy gates score).
        method: ``"percentile"`` | ``"minmax"`` | ``"entropy"``. ORT's entropy search clips
            post-ReLU tensors hard (their zeros sit in the centre bin of its symmetric histogram:
            a half-normal is cut at 2.5 sigma, 0.6% of values), which cost cosine on the random
            full-size global graph (0.984 vs 0.9998 for percentile and minmax); hence the default.
        percentile: the percentile of ``|x|`` kept by the ``percentile`` method.
        histogram_bins: histogram bins of the ``entropy`` and ``percentile`` methods. ORT's entropy
            search is quadratic in it (about 0.15 / 0.6 / 1.7 s per tensor at 256 / 1024 / 2048 bins).
        max_images: at most this many images (a seeded choice when the split has more).
        batch_size: images (or captions) per calibration batch.
        seed: seed of the image choice.
        quantize_text: also quantise the text graph (only its ``Gemm``: the GRU stays FP32 in every tool);
            by default the INT8 set carries the FP32 text graph.
        per_channel: per-output-channel weight scales.
        op_types: op types that get Q/DQ on their inputs (a subset of :data:`COMPUTE_OPS`).
        exclude_nodes: more node names to keep in FP32.
        cache_dir: where calibration ranges are cached; ``None`` = no cache.
        evaluation_split: the split the accuracy gates score; calibrating on it is refused.
    """

    dataset: Path | None = None
    split: str = "train"
    method: str = "percentile"
    percentile: float = 99.99
    histogram_bins: int = 1024
    max_images: int = 128
    batch_size: int = 8
    seed: int = 0
    quantize_text: bool = False
    per_channel: bool = True
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    exclude_nodes: tuple[str, ...] = ()
    cache_dir: Path | None = None
    evaluation_split: str = "test"

    def __post_init__(self) -> None:
        for name in ("dataset", "cache_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "op_types", tuple(self.op_types))
        object.__setattr__(self, "exclude_nodes", tuple(self.exclude_nodes))
        if self.method not in METHODS:
            raise CalibrationError(f"unknown calibration method {self.method!r}; use one of {sorted(METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise CalibrationError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.histogram_bins < 256:
            raise CalibrationError(f"histogram_bins must be at least 256 (2 x the 128 INT8 levels), got {self.histogram_bins}")
        if self.max_images < 1 or self.batch_size < 1:
            raise CalibrationError(f"max_images ({self.max_images}) and batch_size ({self.batch_size}) must be at least 1")
        bad_ops = sorted(set(self.op_types) - COMPUTE_OPS)
        if not self.op_types or bad_ops:
            raise CalibrationError(f"op_types must be a non-empty subset of {sorted(COMPUTE_OPS)} "
                                   f"(Q/DQ belongs on compute ops only), got {list(self.op_types)}")
        if self.split == self.evaluation_split:
            raise CalibrationError(f"refusing to calibrate on {self.split!r}: it is the split the accuracy gates "
                                   "score; calibrate on a training split (e.g. --calibration-split train)")

    @property
    def method_tag(self) -> str:
        """The method with what changes its ranges, as it enters hashes, caches and metadata."""
        if self.method == "percentile":
            return f"percentile({self.percentile:g}, bins={self.histogram_bins})"
        if self.method == "entropy":
            return f"entropy(bins={self.histogram_bins})"
        return self.method

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        for name in ("dataset", "cache_dir"):
            values[name] = None if values[name] is None else str(values[name])
        values["op_types"] = list(self.op_types)
        values["exclude_nodes"] = list(self.exclude_nodes)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CalibrationSettings":
        """Inverse of :meth:`to_dict`; unknown keys are an error so a newer file is never half-read."""
        try:
            return cls(**fields_from_dict(cls, values))
        except ValueError as error:
            raise CalibrationError(str(error)) from None

