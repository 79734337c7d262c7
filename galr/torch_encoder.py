"""The PyTorch GaLR model behind the evaluation ``Encoder`` protocol (numpy in, numpy out).

:func:`galr.retrieval.evaluate.evaluate_encoder` scores anything with ``encode_images`` and
``encode_text``; the exported ONNX/TensorRT engines implement the same two methods, so the
trained model and every engine are measured by one code path (``galr-eval``, export gates).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from galr.config import GaLRConfig, RerankConfig
from galr.data import DatasetPaths, load_split
from galr.errors import InputError
from galr.model.checkpoint import load_checkpoint
from galr.model.galr import GaLR
from galr.preprocess.local_file import LocalFeatureTable, load_local_file
from galr.preprocess.text import Tokenizer
from galr.retrieval.evaluate import evaluate_encoder, load_split_inputs

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device) -> torch.device:
    """The one ``torch.device`` a run uses.

    Args:
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a
            ``torch.device``.

    Returns:
        The device.

    Raises:
        ValueError: an unknown name, or CUDA asked for on a machine without a usable CUDA device.
    """
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError:
            raise InputError(f"unknown device {device!r}; use one of {DEVICE_CHOICES} or 'cuda:N'") from None
    if resolved.type not in ("cpu", "cuda"):
        raise InputError(f"device {device!r} is not supported; use one of {DEVICE_CHOICES}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for CUDA but torch sees no CUDA device; use 'cpu' or 'auto'")
    return resolved


class TorchEncoder:
    """Evaluation :class:`~galr.retrieval.evaluate.Encoder` over a :class:`GaLR` model.

    Calls run in eval mode under ``torch.no_grad`` and put the model back in the mode it was in,
    so the same model can be validated in the middle of training.

    Args:
        model: the model; it is moved to ``device`` (in place, as ``nn.Module.to`` does).
        tokenizer: the tokenizer of the model's vocabulary.
        device: ``"cpu"``, ``"cuda"``, ``"auto"`` or a ``torch.device``.
        batch_size: images or captions per forward pass.

    Raises:
        ValueError: a bad device or batch size, or a tokenizer whose vocabulary does not fit the model.
    """

    def __init__(self, model: GaLR, tokenizer: Tokenizer, device: str | torch.device = "cpu",
                 batch_size: int = 64) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        if tokenizer.vocab.max_id != model.config.vocab_size:
            raise InputError(
                f"the tokenizer's vocabulary has ids up to {tokenizer.vocab.max_id} but the model embeds "
                f"{model.config.vocab_size} words; use the vocabulary the model was trained with"
            )
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @property
    def embed_dim(self) -> int:
        """Size of the joint embedding (columns of both outputs)."""
        return self.model.config.embed_dim

    @contextmanager
    def _inference(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _check_image_inputs(self, images: np.ndarray, rep: np.ndarray, adj: np.ndarray) -> None:
        config = self.model.config
        size, objects = config.image_size, config.num_objects
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise InputError(f"images must be float32 [n, 3, {size}, {size}] for this model, got {images.shape}")
        n = images.shape[0]
        if rep.shape != (n, objects, config.object_dim):
            raise InputError(f"local rep must be [{n}, {objects}, {config.object_dim}] for this model, got {rep.shape}")
        if adj.shape != (n, objects, objects):
            raise InputError(f"local adj must be [{n}, {objects}, {objects}] for this model, got {adj.shape}")

    def encode_images(self, images: np.ndarray, local: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """L2-normalised image embeddings.

        Args:
            images: preprocessed float32 ``[n, 3, S, S]`` (``S`` = the model's ``image_size``).
            local: the DREA matrices ``(rep [n, N, F], adj [n, N, N])``.

        Returns:
            float32 ``[n, embed_dim]``.

        Raises:
            ValueError: shapes that do not fit the model.
        """
        images = np.asarray(images, dtype=np.float32)
        rep, adj = (np.asarray(a, dtype=np.float32) for a in local)
        self._check_image_inputs(images, rep, adj)
        out = np.empty((images.shape[0], self.embed_dim), dtype=np.float32)
        with self._inference():
            for start in range(0, images.shape[0], self.batch_size):
                stop = start + self.batch_size
                batch = (self._to_device(a[start:stop]) for a in (images, rep, adj))
                embedded = self.model.encode_image(*batch)
                out[start:stop] = embedded.float().cpu().numpy()
        return out

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """L2-normalised embeddings of right-padded token ids ``int64 [n, T]`` (0 = padding)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 2:
            raise InputError(f"tokens must be a 2-D [n, T] id matrix, got shape {tokens.shape}")
        out = np.empty((tokens.shape[0], self.embed_dim), dtype=np.float32)
        with self._inference():
            for start in range(0, tokens.shape[0], self.batch_size):
                embedded = self.model.encode_text(self._to_device(tokens[start:start + self.batch_size]))
                out[start:start + self.batch_size] = embedded.float().cpu().numpy()
        return out

    def encode_text(self, captions: Sequence[str]) -> np.ndarray:
        """L2-normalised caption embeddings, float32 ``[n, embed_dim]`` (the tokenizer's length cap applies)."""
        captions = list(captions)
        if not captions:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        chunks = [
            self.encode_tokens(self.tokenizer.encode_batch(captions[start:start + self.batch_size]).tokens)
            for start in range(0, len(captions), self.batch_size)
        ]
        return np.concatenate(chunks)


def _local_source(paths: DatasetPaths, detections_dir: Path | None, local_file: Path | None,
                  config: GaLRConfig) -> tuple[LocalFeatureTable | None, Path | None, str]:
    """(local table, detections folder, description) for the DREA inputs of an evaluation."""
    if local_file is not None:
        table = load_local_file(local_file, config.num_objects, config.object_dim)
        return table, None, f"local file {local_file}"
    if detections_dir is not None and not Path(detections_dir).is_dir():
        raise FileNotFoundError(f"detections folder not found: {detections_dir}")
    folder = Path(detections_dir) if detections_dir is not None else paths.detections
    if folder.is_dir():
        return None, folder, f"detections {folder}"
    warnings.warn(f"no detections folder at {folder} and no --local file: all-zero DREA inputs, the local branch "
                  "carries no information", stacklevel=3)
    return None, None, "none (all-zero DREA inputs)"


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    dataset: str | os.PathLike,
    split: str = "test",
    *,
    vocab: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    detections_dir: str | os.PathLike | None = None,
    local_file: str | os.PathLike | None = None,
    rerank: RerankConfig | None = RerankConfig(),
    device: str | torch.device = "auto",
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, Any]:
    """Score a checkpoint on a dataset split with the original protocol (what ``galr-eval`` prints).

    The image preprocessing and DREA settings come from the checkpoint (defaults for authors'
    checkpoints). DREA inputs come from ``local_file`` if given, else from ``detections_dir``,
    else from the dataset's ``detections`` folder, else they are all zero (with a warning).

    Args:
        checkpoint: a galr checkpoint or an authors' ``.pth.tar``.
        dataset: dataset folder in the original layout.
        split: split name.
        vocab: vocabulary JSON; required for authors' checkpoints.
        image_dir: image folder; ``dataset/images`` when not given.
        detections_dir: detection files for DREA.
        local_file: precomputed DREA matrices (the authors' ``*_local.npy`` or a galr ``.npz``).
        rerank: MR settings for the second set of metrics; None skips MR.
        device: where the model runs.
        batch_size: images/captions per forward pass.
        progress: show a progress bar while reading images.

    Returns:
        A JSON-ready report: ``metrics``, ``metrics_rerank`` (or None), ``rerank`` settings, counts,
        sources, timings and the ``warnings`` raised while reading inputs.

    Raises:
        galr.model.CheckpointError: unreadable checkpoint or wrong vocabulary.
        galr.data.DatasetError: missing dataset folder or split files.
        FileNotFoundError: a missing detections folder or local file.
        ValueError: inputs that do not fit the model (e.g. DREA sizes).
    """
    started = time.perf_counter()
    loaded = load_checkpoint(checkpoint, vocab=vocab)
    config, spec = loaded.model.config, loaded.spec
    paths = DatasetPaths.find(dataset, image_dir=image_dir)
    data = load_split(paths.root, split, image_dir=paths.images)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table, detections, local_description = _local_source(
            paths, None if detections_dir is None else Path(detections_dir),
            None if local_file is None else Path(local_file), config)
        if table is None:
            spec.drea.check_model(config.num_objects, config.object_dim)
        inputs = load_split_inputs(data, spec, detections, table, progress=progress)
    encoder = TorchEncoder(loaded.model, spec.tokenizer(loaded.vocab), device, batch_size)
    evaluation = evaluate_encoder(encoder, inputs, rerank=rerank, batch_size=batch_size)
    return {
        "checkpoint": os.fspath(checkpoint),
        "checkpoint_format": loaded.source_format,
        "dataset": os.fspath(dataset),
        "split": split,
        "images": len(inputs.image_names),
        "captions": len(inputs.captions),
        "local_features": local_description,
        "device": str(encoder.device),
        "rerank": dataclasses.asdict(rerank) if rerank is not None else None,
        **evaluation.to_dict(),
        "seconds": round(time.perf_counter() - started, 2),
        "warnings": sorted({str(w.message) for w in caught}),
    }


__all__ = ["DEVICE_CHOICES", "TorchEncoder", "evaluate_checkpoint", "resolve_device"]
