"""Evaluate any encoder (PyTorch model, ONNX Runtime or TensorRT engine) with the original protocol.

Torch-free on purpose: the same code scores the trained model (``galr-eval``), the exported
graphs at every precision (``galr-export`` gates, INT8 reports) and the benchmarks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from galr.config import RerankConfig
from galr.errors import InputError
from galr.retrieval.metrics import (
    RetrievalMetrics,
    evaluate_similarity,
    evaluate_with_rerank,
)

if TYPE_CHECKING:
    from galr.preprocess.spec import PreprocessSpec


class Encoder(Protocol):
    """What evaluation needs from a model: two towers returning L2-normalised float32 rows."""

    def encode_images(self, images: np.ndarray, local: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """``images``: preprocessed float32 [n, 3, S, S]; ``local``: DREA (rep [n, N, F], adj [n, N, N])."""
        ...

    def encode_text(self, captions: Sequence[str]) -> np.ndarray:
        ...


@dataclass(frozen=True)
class SplitInputs:
    """Everything needed to score one split: preprocessed images, DREA matrices and captions."""

    image_names: tuple[str, ...]
    images: np.ndarray
    local_rep: np.ndarray
    local_adj: np.ndarray
    captions: tuple[str, ...]
    captions_per_image: int = 5

    def __post_init__(self) -> None:
        n = len(self.image_names)
        if not (self.images.shape[0] == self.local_rep.shape[0] == self.local_adj.shape[0] == n):
            raise InputError("images, local features and image names disagree on the number of images")
        if len(self.captions) != n * self.captions_per_image:
            raise InputError(f"{len(self.captions)} captions for {n} images x {self.captions_per_image}")

    def subset(self, count: int) -> "SplitInputs":
        """The first ``count`` images with their captions (for quick checks)."""
        c = self.captions_per_image
        return SplitInputs(self.image_names[:count], self.images[:count], self.local_rep[:count],
                           self.local_adj[:count], self.captions[: count * c], c)


def load_split_inputs(split, spec: "PreprocessSpec", detections_dir: Path | None = None, local_table=None,
                      progress: bool = False) -> SplitInputs:
    """Read and preprocess a :class:`galr.data.RetrievalSplit` (images, DREA inputs, captions) with a
    model's preprocessing ``spec``."""
    from galr.preprocess.image import load_image, preprocess_image
    from galr.preprocess.local_inputs import local_features_for

    image_config, drea_config = spec.image, spec.drea
    paths = [split.image_path(i) for i in range(len(split.image_names))]
    iterator = paths
    if progress:
        from tqdm import tqdm

        iterator = tqdm(paths, desc="images", unit="img", leave=False)
    images, sizes = [], []
    for path in iterator:
        picture = load_image(path, image_config)
        sizes.append(picture.size)
        images.append(preprocess_image(picture, image_config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one warning per image would drown the table; counted below
        rep, adj = local_features_for(paths, sizes, drea_config, detections_dir, local_table)
    empty = int(np.sum(~rep.any(axis=(1, 2))))
    if empty:
        warnings.warn(f"{empty} of {len(paths)} images have no detections: their local branch is a constant vector",
                      stacklevel=2)
    return SplitInputs(tuple(split.image_names), np.stack(images), rep, adj, tuple(split.captions),
                       split.captions_per_image)


@dataclass(frozen=True)
class Evaluation:
    """Scores of one encoder on one split, with and without multivariate rerank."""

    metrics: RetrievalMetrics
    metrics_rerank: RetrievalMetrics | None
    image_embeddings: np.ndarray
    text_embeddings: np.ndarray

    @property
    def similarity(self) -> np.ndarray:
        return self.image_embeddings @ self.text_embeddings.T

    def to_dict(self) -> dict:
        return {"metrics": self.metrics.to_dict(),
                "metrics_rerank": self.metrics_rerank.to_dict() if self.metrics_rerank else None}


def encode_split(encoder: Encoder, inputs: SplitInputs, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Image and caption embeddings of a split, batched."""
    images = [
        encoder.encode_images(inputs.images[i:i + batch_size],
                              local=(inputs.local_rep[i:i + batch_size], inputs.local_adj[i:i + batch_size]))
        for i in range(0, len(inputs.image_names), batch_size)
    ]
    texts = [encoder.encode_text(list(inputs.captions[i:i + batch_size * 4]))
             for i in range(0, len(inputs.captions), batch_size * 4)]
    return np.concatenate(images).astype(np.float32), np.concatenate(texts).astype(np.float32)


def evaluate_encoder(encoder: Encoder, inputs: SplitInputs, rerank: RerankConfig | None = RerankConfig(),
                     batch_size: int = 32) -> Evaluation:
    """R@1/5/10 both ways and mR (original protocol), plus the same after MR when ``rerank`` is set."""
    image_embeddings, text_embeddings = encode_split(encoder, inputs, batch_size)
    similarity = image_embeddings @ text_embeddings.T
    metrics = evaluate_similarity(similarity, inputs.captions_per_image)
    reranked = evaluate_with_rerank(similarity, rerank, inputs.captions_per_image) if rerank else None
    return Evaluation(metrics, reranked, image_embeddings, text_embeddings)
