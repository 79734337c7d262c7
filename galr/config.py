"""Typed model configuration (torch-free, so manifests and the runtime can read it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from galr.errors import InputError
from galr.serialization import fields_from_dict


@dataclass(frozen=True)
class GaLRConfig:
    """Dimensions of a GaLR model. The defaults are the authors' (RSITMD vocabulary).

    Attributes:
        vocab_size: number of words; the word embedding has ``vocab_size + 1`` rows (row 0 = padding).
        embed_dim: joint embedding size (also MIDF hidden size).
        word_dim: skip-thought word embedding size.
        gru_hidden: skip-thought GRU hidden size.
        num_objects: DREA nodes per image (rows of ``local_rep`` / ``local_adj``).
        object_dim: DREA feature size per object (columns of ``local_rep``).
        gcn_dims: output sizes of the three GCN layers (``fc1``, ``fc2``, ``fc3``).
        image_size: square input side in pixels; the VSA attention needs ``(image_size / 16) ** 2`` positions.
        resnet_widths: channel widths of ResNet-18's four stages.
        vsa_channels: channels of the MVSA low/high level convolutions.
        fusion_heads: attention heads in MIDF.
        fusion_ff: MIDF feed-forward hidden size.
        fusion_dynamic_dim: hidden size of MIDF's dynamic weight MLP.
    """

    vocab_size: int = 1349
    embed_dim: int = 512
    word_dim: int = 620
    gru_hidden: int = 2400
    num_objects: int = 20
    object_dim: int = 20
    gcn_dims: tuple[int, int, int] = (20, 10, 20)
    image_size: int = 256
    resnet_widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    vsa_channels: int = 3
    fusion_heads: int = 8
    fusion_ff: int = 1024
    fusion_dynamic_dim: int = 512

    def __post_init__(self) -> None:
        if self.image_size % 32:
            raise InputError(f"image_size must be a multiple of 32 (ResNet stride), got {self.image_size}")
        if self.embed_dim % self.fusion_heads:
            raise InputError(f"embed_dim {self.embed_dim} is not divisible by fusion_heads {self.fusion_heads}")
        if self.vocab_size < 1:
            raise InputError(f"vocab_size must be positive, got {self.vocab_size}")

    @property
    def attention_positions(self) -> int:
        """Spatial positions seen by the VSA attention (16x16 = 256 for 256 px input)."""
        return (self.image_size // 16) ** 2

    @classmethod
    def small(cls, vocab_size: int = 50, **overrides: Any) -> "GaLRConfig":
        """A tiny configuration for fast tests (same structure, narrow layers, 64 px input)."""
        values: dict[str, Any] = dict(
            vocab_size=vocab_size, embed_dim=32, word_dim=16, gru_hidden=24, image_size=64,
            resnet_widths=(8, 16, 32, 64), fusion_heads=4, fusion_ff=64, fusion_dynamic_dim=32,
        )
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GaLRConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error so a newer file is never half-read."""
        return cls(**fields_from_dict(cls, values))


@dataclass(frozen=True)
class RerankConfig:
    """Multivariate rerank (MR) parameters; defaults are the authors' ``__main__`` values."""

    k: int = 30
    wp1: float = 0.3
    wp2: float = 1.1
    decay: float = 0.05


__all__ = ["GaLRConfig", "RerankConfig"]
