"""Parity of two sets of embeddings, and the gates an exported precision must pass.

Torch-free: the export's gates, the INT8 calibration report and the benchmarks compare embeddings
with the same :func:`compare`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from galr.errors import GateError


class ParityError(GateError):
    """An exported graph disagrees with its reference beyond the gate's tolerance."""


@dataclass(frozen=True)
class ParityStats:
    """Agreement of two sets of embeddings (rows compared pairwise)."""

    min_cosine: float
    mean_cosine: float
    max_abs_error: float
    rows: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ParityGate:
    """Thresholds a comparison must meet; ``max_abs_error=None`` checks cosine only."""

    min_cosine: float
    max_abs_error: float | None = None

    def check(self, stats: ParityStats, label: str) -> None:
        problems = []
        if stats.min_cosine < self.min_cosine:
            problems.append(f"min cosine {stats.min_cosine:.7f} < {self.min_cosine}")
        if self.max_abs_error is not None and stats.max_abs_error > self.max_abs_error:
            problems.append(f"max abs error {stats.max_abs_error:.3g} > {self.max_abs_error:g}")
        if problems:
            raise ParityError(f"parity gate failed for {label}: {'; '.join(problems)} over {stats.rows} rows. "
                              "The export was not written.")


# Tolerances per precision (the gates); FP32 is ONNX Runtime against PyTorch, FP16 and
# INT8 are against the FP32 graphs.
FP32_GATE = ParityGate(min_cosine=0.99999, max_abs_error=1e-4)
FP16_GATE = ParityGate(min_cosine=0.999)
INT8_GATE = ParityGate(min_cosine=0.99)


def compare(reference: np.ndarray, candidate: np.ndarray) -> ParityStats:
    """Row-wise cosine and element-wise error between two [n, D] arrays."""
    reference = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    candidate = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    if reference.shape != candidate.shape:
        raise ParityError(f"shape mismatch: reference {reference.shape} vs candidate {candidate.shape}")
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    cosine = np.where(norms > 0, (reference * candidate).sum(1) / np.maximum(norms, 1e-30), 1.0)
    both_zero = (np.linalg.norm(reference, axis=1) == 0) & (np.linalg.norm(candidate, axis=1) == 0)
    cosine = np.where(both_zero, 1.0, cosine)
    return ParityStats(float(cosine.min()), float(cosine.mean()), float(np.abs(reference - candidate).max()),
                       len(reference))
