"""Training GaLR as the original code does (galr-reference.md §6), with resumable checkpoints.

What is kept from the original (``R:train.py``, ``R:utils.py``):

* the VSE hinge loss summed over all in-batch negatives in both directions, margin 0.2
  (``loss="hardest"`` switches to the VSE++ max-violation variant);
* Adam, lr 2e-4, multiplied by 0.7 at the start of every epoch ``e`` with
  ``e % lr_decay_every == lr_decay_every - 1``;
* (image, caption) pairs, every caption once per epoch, so each image is seen
  ``captions_per_image`` times per epoch;
* the train transform ``Resize(278) -> RandomRotation(0..90) -> RandomCrop(256)``, scaled to the
  model's ``image_size``;
* k-fold re-splits of the train images with the best epoch chosen by validation mR.

What differs, on purpose:

* a batch never holds the same image twice: the epoch is split into ``captions_per_image`` rounds,
  each pairing every image with a different one of its captions, so no true pair is ever used as a
  negative (the original shuffles all captions together and can put two captions of one image in
  a batch, one of them then counting as a negative of the other's image);
* gradient clipping, when asked for, runs after ``backward`` (the original calls it before, a no-op);
* the dataset is read and preprocessed once into memory (uint8 pixels, DREA matrices, token ids);
* every epoch draws its shuffling, augmentation and dropout from generators seeded by
  ``(seed, epoch)``, so a resumed run continues exactly as an uninterrupted one would.

Files written by :func:`train` for ``-o model.pt``: ``model.pt`` (galr checkpoint of the last epoch),
``model.best.pt`` (best validation mR) and ``model.state.pt`` (weights, optimizer state and history
for ``resume``). All three are written atomically after every epoch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from galr.atomic import atomic_output
from galr.config import GaLRConfig
from galr.data import DatasetPaths, RetrievalSplit, kfold_splits, load_split
from galr.errors import InputError
from galr.model.checkpoint import save_checkpoint
from galr.model.galr import GaLR
from galr.preprocess.drea import DREAConfig
from galr.preprocess.image import ImagePreprocessConfig, load_image
from galr.preprocess.local_inputs import local_features_for
from galr.preprocess.spec import PreprocessSpec
from galr.preprocess.text import DEFAULT_MAX_TEXT_LENGTH, Tokenizer, Vocabulary
from galr.retrieval.evaluate import SplitInputs, evaluate_encoder, load_split_inputs
from galr.retrieval.metrics import RetrievalMetrics
from galr.serialization import fields_from_dict
from galr.torch_encoder import TorchEncoder, resolve_device

LOSS_KINDS = ("sum", "hardest")
MODEL_PRESETS = ("small", "demo", "original")
DEMO_EPOCHS = 9
STATE_FORMAT = "galr-train-state"
STATE_FORMAT_VERSION = 1
# The original train transform resizes to 278 before a 256 crop; the same ratio at other sizes.
ORIGINAL_RESIZE, ORIGINAL_CROP = 278, 256
# Fields that say where a run executes, not what it computes.
EXECUTION_FIELDS = frozenset({"device", "num_threads", "eval_batch_size"})
# Fields that may change between a run and its resumption (more epochs continue the same run).
RESUMABLE_CHANGES = EXECUTION_FIELDS | {"epochs"}


class TrainError(InputError):
    """A training configuration or dataset cannot be used; the message says what to change."""


def demo_model_config(vocab_size: int) -> GaLRConfig:
    """The ``demo`` model: GaLR's structure at 256 px, narrowed to train in minutes on 2 CPU cores.

    ResNet-18 with a quarter of the channels (16/32/64/128), a 256-d joint space and a 512-unit
    GRU instead of 2400. The image tower dominates the cost; see ``docs/training.md`` for timings.

    Args:
        vocab_size: words in the vocabulary (its largest id).

    Returns:
        The model config.
    """
    return GaLRConfig(
        vocab_size=vocab_size, embed_dim=256, word_dim=300, gru_hidden=512, image_size=256,
        resnet_widths=(16, 32, 64, 128), fusion_heads=8, fusion_ff=512, fusion_dynamic_dim=256,
    )


def model_config_preset(name: str, vocab_size: int) -> GaLRConfig:
    """A named model config sized for a vocabulary.

    Args:
        name: ``"original"`` (the authors' dimensions), ``"demo"`` (:func:`demo_model_config`) or
            ``"small"`` (:meth:`GaLRConfig.small`, for tests).
        vocab_size: words in the vocabulary (its largest id).

    Returns:
        The model config.

    Raises:
        ValueError: an unknown preset name.
    """
    if name == "original":
        return GaLRConfig(vocab_size=vocab_size)
    if name == "demo":
        return demo_model_config(vocab_size)
    if name == "small":
        return GaLRConfig.small(vocab_size=vocab_size)
    raise InputError(f"unknown model preset {name!r}; use one of {MODEL_PRESETS}")


def _path_or_none(value: Any) -> str | None:
    return None if value is None else os.fspath(value)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (stored in every checkpoint it writes).

    Attributes:
        dataset: dataset folder in the original layout (:mod:`galr.data`).
        model: model dimensions; ``vocab_size`` must equal the dataset vocabulary's largest id.
        epochs: total epochs (a resumed run continues up to this number).
        batch_size: (image, caption) pairs per step; the in-batch negatives are the other pairs.
        lr: Adam learning rate at epoch 0.
        lr_decay: factor applied at the start of epoch ``e`` when ``e % lr_decay_every == lr_decay_every - 1``.
        lr_decay_every: the decay period in epochs (the original: 20).
        margin: hinge margin.
        loss: ``"sum"`` (all negatives, the original) or ``"hardest"`` (VSE++ max violation).
        grad_clip: max global gradient norm; 0 disables clipping.
        captions_per_epoch: captions of each image used per epoch; None = all of them (the original).
            Fewer captions make an epoch proportionally faster; they are drawn at random each epoch.
        augment: apply the original train transform (resize, random rotation, random crop).
        seed: seeds the initial weights, the shuffling, the augmentation, dropout and k-fold splits.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        num_threads: CPU threads for torch; 0 keeps torch's default.
        backbone_weights: optional ImageNet ResNet-18 state dict (torchvision names) for the trunk.
        train_split: split name of the training images.
        val_split: split scored after each epoch to pick the best checkpoint; None = no validation.
            Ignored when ``fold`` is set (the fold's validation images are used).
        fold: k-fold index (0-based) to re-split ``train_split`` into train/val; None = no k-fold.
        num_folds: folds of the k-fold protocol (the original: 3).
        val_fraction: share of ``train_split`` images validated in each fold.
        eval_every: validate every this many epochs (and after the last); 0 = only after the last.
        eval_batch_size: batch size of validation encoding.
        max_caption_tokens: captions are cut to this many tokens (the tokenizer's cap).
        drea: how DREA matrices are built from the dataset's ``detections`` folder.
        detections_dir: detections folder; ``<dataset>/detections`` when not given.
        vocab_file: vocabulary JSON; found in ``dataset`` when not given.
    """

    dataset: str
    model: GaLRConfig
    epochs: int = 20
    batch_size: int = 100
    lr: float = 2e-4
    lr_decay: float = 0.7
    lr_decay_every: int = 20
    margin: float = 0.2
    loss: str = "sum"
    grad_clip: float = 0.0
    captions_per_epoch: int | None = None
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0
    backbone_weights: str | None = None
    train_split: str = "train"
    val_split: str | None = "val"
    fold: int | None = None
    num_folds: int = 3
    val_fraction: float = 0.2
    eval_every: int = 1
    eval_batch_size: int = 64
    max_caption_tokens: int = DEFAULT_MAX_TEXT_LENGTH
    drea: DREAConfig = field(default_factory=DREAConfig)
    detections_dir: str | None = None
    vocab_file: str | None = None

    def __post_init__(self) -> None:
        for name in ("dataset", "backbone_weights", "detections_dir", "vocab_file"):
            object.__setattr__(self, name, _path_or_none(getattr(self, name)))
        positive = {"epochs": self.epochs, "lr_decay_every": self.lr_decay_every, "num_folds": self.num_folds,
                    "eval_batch_size": self.eval_batch_size, "max_caption_tokens": self.max_caption_tokens}
        for name, value in positive.items():
            if value < 1:
                raise TrainError(f"TrainConfig.{name} must be at least 1, got {value}")
        if self.batch_size < 2:
            raise TrainError(
                f"TrainConfig.batch_size must be at least 2 (the loss needs in-batch negatives), got {self.batch_size}")
        if self.lr <= 0 or not 0 < self.lr_decay <= 1:
            raise TrainError(
                f"TrainConfig needs lr > 0 and 0 < lr_decay <= 1, got lr={self.lr}, lr_decay={self.lr_decay}")
        if self.margin < 0 or self.grad_clip < 0:
            raise TrainError(f"TrainConfig.margin and .grad_clip must be >= 0, got {self.margin} and {self.grad_clip}")
        if self.loss not in LOSS_KINDS:
            raise TrainError(f"TrainConfig.loss {self.loss!r} is unknown; use one of {LOSS_KINDS}")
        if self.captions_per_epoch is not None and self.captions_per_epoch < 1:
            raise TrainError(
                f"TrainConfig.captions_per_epoch must be at least 1 or None (all), got {self.captions_per_epoch}")
        if self.fold is not None and not 0 <= self.fold < self.num_folds:
            raise TrainError(f"TrainConfig.fold must be in [0, {self.num_folds}), got {self.fold}")
        if not 0 < self.val_fraction < 1:
            raise TrainError(f"TrainConfig.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.eval_every < 0 or self.num_threads < 0:
            raise TrainError("TrainConfig.eval_every and .num_threads must be >= 0")
        try:
            self.drea.check_model(self.model.num_objects, self.model.object_dim)
        except ValueError as exc:
            raise TrainError(f"TrainConfig.drea does not fit TrainConfig.model: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible values (tuples become lists), nested configs as dicts."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["model"] = self.model.to_dict()
        values["drea"] = self.drea.to_dict()
        return json.loads(json.dumps(values))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error so a newer file is never half-read.

        Raises:
            TrainError: unknown fields or invalid values.
        """
        try:
            fixed = fields_from_dict(cls, values, lists_to_tuples=False)
        except ValueError as error:
            raise TrainError(str(error)) from None
        if isinstance(fixed.get("model"), Mapping):
            fixed["model"] = GaLRConfig.from_dict(dict(fixed["model"]))
        if isinstance(fixed.get("drea"), Mapping):
            fixed["drea"] = DREAConfig.from_dict(dict(fixed["drea"]))
        return cls(**fixed)


def train_config_preset(name: str, dataset: str | os.PathLike, vocab_size: int, **overrides: Any) -> TrainConfig:
    """A named training recipe for a dataset, with the model of the same name.

    * ``"original"``: the authors' model and recipe (batch 100, all captions, augmentation, 20 epochs).
    * ``"demo"``: the CPU demo recipe (``docs/training.md``): :func:`demo_model_config`, 9 epochs of
      one random caption per image, lr 5e-4 (x0.7 at epochs 3 and 7), batch 32, no augmentation.
    * ``"small"``: :meth:`GaLRConfig.small` for a few quick epochs (tests, smoke runs).

    Args:
        name: the preset.
        dataset: the dataset folder.
        vocab_size: the dataset vocabulary's largest id.
        **overrides: TrainConfig fields to set on top (``model`` included).

    Returns:
        The config.

    Raises:
        TrainError: an unknown preset or invalid overrides.
    """
    recipes: dict[str, dict[str, Any]] = {
        "original": {},
        "demo": dict(epochs=DEMO_EPOCHS, batch_size=32, captions_per_epoch=1, augment=False, loss="sum",
                     lr=5e-4, lr_decay_every=4, eval_every=3),
        "small": dict(epochs=3, batch_size=16, augment=False, eval_every=1),
    }
    if name not in recipes:
        raise TrainError(f"unknown training preset {name!r}; use one of {MODEL_PRESETS}")
    values: dict[str, Any] = {"model": model_config_preset(name, vocab_size), **recipes[name], **overrides}
    try:
        return TrainConfig(dataset=os.fspath(dataset), **values)
    except TypeError as exc:  # an unknown field name among the overrides
        raise TrainError(f"invalid training option: {exc}") from None


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """Learning rate of a (0-based) epoch under the original step decay.

    The original multiplies the current lr by ``lr_decay`` at the start of every epoch ``e`` with
    ``e % lr_decay_every == lr_decay_every - 1``, so epochs 0..18 use ``lr``, 19..38 ``0.7 lr``, ...
    """
    return config.lr * config.lr_decay ** ((epoch + 1) // config.lr_decay_every)


def contrastive_loss(scores: torch.Tensor, margin: float = 0.2, hardest: bool = False) -> torch.Tensor:
    """The VSE hinge loss on an in-batch similarity matrix (true pairs on the diagonal).

    ``sum``: ``sum_{i!=j} [m + S_ij - S_ii]_+ + sum_{i!=j} [m + S_ij - S_jj]_+`` (the original);
    ``hardest``: only the largest violation of each row and each column is summed (VSE++).

    Args:
        scores: ``[B, B]`` similarities, ``scores[i, j]`` = image ``i`` vs caption ``j``.
        margin: hinge margin.
        hardest: use the hardest negative only.

    Returns:
        The scalar loss (summed over the batch, as the original).
    """
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise InputError(f"scores must be a square [B, B] matrix, got shape {tuple(scores.shape)}")
    diagonal = scores.diag()
    positive = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    # Row i: image i against wrong captions j; column j: caption j against wrong images i.
    cost_caption = (margin + scores - diagonal[:, None]).clamp(min=0).masked_fill(positive, 0)
    cost_image = (margin + scores - diagonal[None, :]).clamp(min=0).masked_fill(positive, 0)
    if hardest:
        return cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
    return cost_caption.sum() + cost_image.sum()


# ------------------------------------------------------------------------------------------------
# Data held in memory


@dataclass(frozen=True)
class TrainingSet:
    """A training split read once: base-size uint8 pixels, DREA matrices and token ids.

    Attributes:
        pixels: uint8 ``[n, H, W, 3]`` at the augmentation base size (or the model size).
        local_rep: float32 ``[n, N, F]``.
        local_adj: float32 ``[n, N, N]``.
        tokens: per caption, its token ids (``captions_per_image`` consecutive captions per image).
        captions_per_image: captions of each image.
    """

    pixels: np.ndarray
    local_rep: np.ndarray
    local_adj: np.ndarray
    tokens: tuple[tuple[int, ...], ...]
    captions_per_image: int

    @property
    def num_images(self) -> int:
        return int(self.pixels.shape[0])


def augmentation_base_size(image_size: int) -> int:
    """The resize before the random crop: 278 for 256, the same ratio at other sizes."""
    return int(round(image_size * ORIGINAL_RESIZE / ORIGINAL_CROP))


def _detections_folder(paths: DatasetPaths) -> Path | None:
    if paths.detections.is_dir():
        return paths.detections
    warnings.warn(
        f"no detections folder at {paths.detections}: every image gets all-zero DREA inputs, so the local "
        "branch carries no information", stacklevel=3,
    )
    return None


def load_training_set(split: RetrievalSplit, tokenizer: Tokenizer, image_size: int, augment: bool,
                      drea: DREAConfig, detections_dir: Path | None, progress: bool = False) -> TrainingSet:
    """Read a split's images, detections and captions once.

    Args:
        split: the training images and captions.
        tokenizer: maps captions to ids.
        image_size: the model's input side.
        augment: keep pixels at :func:`augmentation_base_size` for random crops, else at ``image_size``.
        drea: DREA settings.
        detections_dir: per-image detection files, or None for all-zero DREA inputs.
        progress: show a progress bar.

    Returns:
        The split in memory.

    Raises:
        galr.preprocess.image.ImageLoadError: an unreadable image (named).
    """
    side = augmentation_base_size(image_size) if augment else image_size
    config = ImagePreprocessConfig(size=side)
    pixels = np.empty((split.num_images, side, side, 3), dtype=np.uint8)
    sizes: list[tuple[int, int]] = []
    paths = [split.image_path(i) for i in range(split.num_images)]
    for index, path in enumerate(tqdm(paths, desc=f"loading {split.name or 'train'}", unit="img", leave=False,
                                      disable=not progress)):
        picture = load_image(path, config)
        sizes.append(picture.size)
        pixels[index] = np.asarray(picture.resize((side, side), config.resample), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one warning per image without detections would flood the log
        rep, adj = local_features_for(paths, sizes, drea, detections_dir)
    tokens = tuple(tuple(tokenizer.encode(c)[: tokenizer.max_length]) for c in split.captions)
    return TrainingSet(pixels, rep, adj, tokens, split.captions_per_image)


def augment_pixels(pixels: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """The original train transform on a base-size image: random rotation in [0, 90] degrees, random crop.

    Equals torchvision ``RandomRotation(degrees=(0, 90))`` (nearest neighbour, counter-clockwise,
    black corners, same canvas) then ``RandomCrop(crop)``, drawn from ``rng``.

    Args:
        pixels: uint8 ``[H, W, 3]``.
        crop: output side.
        rng: random source.

    Returns:
        uint8 ``[crop, crop, 3]``.
    """
    angle = float(rng.uniform(0.0, 90.0))
    rotated = np.asarray(Image.fromarray(pixels).rotate(angle, resample=Image.Resampling.NEAREST, fillcolor=(0, 0, 0)))
    top = int(rng.integers(0, rotated.shape[0] - crop + 1))
    left = int(rng.integers(0, rotated.shape[1] - crop + 1))
    return rotated[top:top + crop, left:left + crop]


def normalise_pixels(pixels: np.ndarray, config: ImagePreprocessConfig) -> np.ndarray:
    """uint8 ``[n, S, S, 3]`` -> float32 ``[n, 3, S, S]``: ``ToTensor`` + ``Normalize`` for a whole batch.

    Same float32 operations as :func:`galr.preprocess.image.preprocess_image` after its resize.
    """
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    scaled = pixels.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(((scaled - mean) / std).transpose(0, 3, 1, 2))


def pad_tokens(rows: Sequence[Sequence[int]]) -> np.ndarray:
    """Right-pad token id rows with 0 into ``int64 [n, longest]`` (at least one column)."""
    width = max([1] + [len(r) for r in rows])
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def epoch_batches(num_images: int, captions_per_image: int, captions_per_epoch: int | None, batch_size: int,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """The (image, caption) pairs of one epoch, as batches of global caption indices.

    Each round pairs every image with one of its captions not used earlier in the epoch, in a
    fresh random image order, so a batch never holds two captions of one image. A trailing batch
    of one pair (no negatives) is dropped.

    Args:
        num_images: images in the split.
        captions_per_image: captions of each image.
        captions_per_epoch: rounds per epoch; None = ``captions_per_image``.
        batch_size: pairs per batch.
        rng: random source.

    Returns:
        int64 arrays of caption indices (the image of caption ``c`` is ``c // captions_per_image``).
    """
    rounds = min(captions_per_epoch or captions_per_image, captions_per_image)
    choice = np.argsort(rng.random((num_images, captions_per_image)), axis=1)[:, :rounds]
    batches: list[np.ndarray] = []
    for round_index in range(rounds):
        order = rng.permutation(num_images)
        captions = order * captions_per_image + choice[order, round_index]
        batches.extend(b for b in np.array_split(captions, range(batch_size, num_images, batch_size)) if len(b) > 1)
    return batches


# ------------------------------------------------------------------------------------------------
# Checkpoints and resumption


@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch: mean loss per batch, learning rate, wall time and validation metrics."""

    epoch: int
    loss: float
    lr: float
    seconds: float
    val: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EpochRecord":
        return cls(int(values["epoch"]), float(values["loss"]), float(values["lr"]), float(values["seconds"]),
                   None if values.get("val") is None else {k: float(v) for k, v in values["val"].items()})


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        checkpoint: galr checkpoint of the last finished epoch.
        best_checkpoint: checkpoint of the best validation mR (None without validation).
        state_file: resumption state (weights, optimizer, history).
        epochs: epochs finished in total.
        start_epoch: the epoch this call started at (> 0 after a resume).
        history: one record per finished epoch, from epoch 0.
        best_epoch: epoch of the best validation mR (None without validation).
        best_val_mean_recall: that mR.
        seconds: wall time of this call.
    """

    checkpoint: Path
    best_checkpoint: Path | None
    state_file: Path
    epochs: int
    start_epoch: int
    history: tuple[EpochRecord, ...]
    best_epoch: int | None
    best_val_mean_recall: float | None
    seconds: float


def state_path(checkpoint: str | os.PathLike) -> Path:
    """The resumption file next to a checkpoint: ``model.pt`` -> ``model.state.pt``."""
    return Path(checkpoint).with_suffix(".state.pt")


def best_path(checkpoint: str | os.PathLike) -> Path:
    """The best-by-validation checkpoint next to a checkpoint: ``model.pt`` -> ``model.best.pt``."""
    return Path(checkpoint).with_suffix(".best.pt")


def _atomic_torch_save(payload: Mapping[str, Any], path: Path) -> None:
    with atomic_output(path) as handle:
        torch.save(dict(payload), handle)


def _config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def _read_state(path: Path, config: TrainConfig) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise TrainError(f"{path}: unreadable training state ({type(exc).__name__}: {exc}); "
                         "delete it or train with resume=False") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainError(f"{path}: not a galr training state; delete it or train with resume=False")
    if state.get("format_version") != STATE_FORMAT_VERSION:
        raise TrainError(f"{path}: training state version {state.get('format_version')} is not supported")
    differences = _config_differences(state["config"], config.to_dict())
    if differences:
        raise TrainError(
            f"{path} was written by a run with a different training config (fields {differences} differ); "
            "resume with the same settings, or start over with resume=False (--no-resume) or another output path"
        )
    return state


# ------------------------------------------------------------------------------------------------
# The loop


def _resolve_splits(config: TrainConfig, paths: DatasetPaths) -> tuple[RetrievalSplit, RetrievalSplit | None]:
    train_split = load_split(paths.root, config.train_split, image_dir=paths.images)
    if config.fold is not None:
        try:
            return kfold_splits(train_split, config.num_folds, config.fold, config.seed, config.val_fraction)
        except ValueError as exc:
            raise TrainError(f"k-fold split of {config.train_split!r}: {exc}") from None
    if config.val_split is None:
        return train_split, None
    if config.val_split not in paths.splits():
        raise TrainError(
            f"validation split {config.val_split!r} not found in {paths.root} (splits there: {list(paths.splits())}); "
            "pick another with val_split (--val-split), or none"
        )
    return train_split, load_split(paths.root, config.val_split, image_dir=paths.images)


def _epoch_generators(seed: int, epoch: int) -> tuple[np.random.Generator, int]:
    """A numpy generator and a torch seed that depend only on (seed, epoch)."""
    sequence = np.random.SeedSequence([seed, epoch])
    return np.random.default_rng(sequence), int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class _Trainer:
    """One training run's state; :func:`train` is the public entry point."""

    def __init__(self, config: TrainConfig, checkpoint: Path, progress: bool) -> None:
        self.config = config
        self.checkpoint = checkpoint
        self.progress = progress
        self.device = resolve_device(config.device)
        paths = DatasetPaths.find(config.dataset, detections_dir=config.detections_dir, vocab_file=config.vocab_file)
        self.vocab = Vocabulary.load(paths.vocab())
        if self.vocab.max_id != config.model.vocab_size:
            raise TrainError(
                f"the vocabulary {paths.vocab()} has ids up to {self.vocab.max_id} but TrainConfig.model.vocab_size "
                f"is {config.model.vocab_size}; build the model config for this vocabulary "
                "(model_config_preset(name, vocab.max_id))"
            )
        self.spec = PreprocessSpec(ImagePreprocessConfig(size=config.model.image_size), config.drea,
                                   config.max_caption_tokens)
        self.tokenizer = self.spec.tokenizer(self.vocab)
        detections = _detections_folder(paths)
        train_split, val_split = _resolve_splits(config, paths)
        if train_split.num_images < 2:
            raise TrainError(f"split {train_split.name!r} has {train_split.num_images} image(s); the in-batch loss "
                             "needs at least 2")
        self.data = load_training_set(train_split, self.tokenizer, config.model.image_size, config.augment,
                                      config.drea, detections, progress)
        self.val_inputs: SplitInputs | None = None
        if val_split is not None:
            self.val_inputs = load_split_inputs(val_split, self.spec, detections, progress=progress)
        self.train_images = train_split.num_images

        torch.manual_seed(config.seed)
        self.model = GaLR(config.model)
        if config.backbone_weights:
            self._load_backbone(Path(config.backbone_weights))
        self.model.to(self.device)
        # oneDNN convolutions run faster on NHWC tensors (measured in docs/training.md); CUDA keeps NCHW.
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=config.lr)
        self.history: list[EpochRecord] = []
        self.best_epoch: int | None = None
        self.best_mr: float | None = None

    def _load_backbone(self, path: Path) -> None:
        if not path.is_file():
            raise TrainError(f"backbone weights not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable or unsafe pickles
            raise TrainError(f"{path}: cannot be read as a state dict ({type(exc).__name__}: {exc})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            self.model.load_backbone_weights(state)
        except (ValueError, AttributeError) as exc:
            raise TrainError(f"{path}: {exc}") from None

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a state read by :func:`_read_state`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = [EpochRecord.from_dict(r) for r in state["history"]]
        self.best_epoch, self.best_mr = state["best_epoch"], state["best_mean_recall"]

    def _batch(self, captions: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        data, size = self.data, self.config.model.image_size
        images = captions // data.captions_per_image
        pixels = np.stack([augment_pixels(data.pixels[i], size, rng) for i in images]) if self.config.augment \
            else data.pixels[images]
        batch = normalise_pixels(pixels, self.spec.image)
        tokens = pad_tokens([data.tokens[c] for c in captions])
        arrays = (batch, data.local_rep[images], data.local_adj[images], tokens)
        tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=True) for a in arrays]
        if self.channels_last:
            tensors[0] = tensors[0].contiguous(memory_format=torch.channels_last)
        return tuple(tensors)

    def _step(self, captions: np.ndarray, rng: np.random.Generator) -> float:
        """One optimisation step on a batch; returns its loss."""
        config = self.config
        images, rep, adj, tokens = self._batch(captions, rng)
        # Gradients on even if the caller (or a library) switched them off process-wide.
        with torch.enable_grad():
            loss = contrastive_loss(self.model(images, rep, adj, tokens), config.margin, config.loss == "hardest")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        return float(loss.detach())

    def run_epoch(self, epoch: int) -> EpochRecord:
        config = self.config
        lr = learning_rate(config, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rng, torch_seed = _epoch_generators(config.seed, epoch)
        torch.manual_seed(torch_seed)  # dropout in MIDF
        batches = epoch_batches(self.data.num_images, self.data.captions_per_image, config.captions_per_epoch,
                                config.batch_size, rng)
        self.model.train()
        started, pairs, total_loss = time.perf_counter(), 0, 0.0
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
                   disable=not self.progress)
        for steps, captions in enumerate(bar, start=1):
            total_loss += self._step(captions, rng)
            pairs += len(captions)
            speed = pairs / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{total_loss / steps:.3f}", img_s=f"{speed:.1f}")
        bar.close()
        record = EpochRecord(epoch, total_loss / max(1, len(batches)), lr, time.perf_counter() - started)
        if self.val_inputs is not None and self._validates_after(epoch):
            record = dataclasses.replace(record, val=self.validate().to_dict())
        return record

    def _validates_after(self, epoch: int) -> bool:
        every = self.config.eval_every
        return epoch == self.config.epochs - 1 or (every > 0 and (epoch + 1) % every == 0)

    def validate(self) -> RetrievalMetrics:
        assert self.val_inputs is not None
        encoder = TorchEncoder(self.model, self.tokenizer, self.device, self.config.eval_batch_size)
        return evaluate_encoder(encoder, self.val_inputs, rerank=None, batch_size=self.config.eval_batch_size).metrics

    def save(self, record: EpochRecord) -> None:
        config, epochs_done = self.config, record.epoch + 1
        self.history.append(record)
        metadata: dict[str, Any] = {
            "epoch": epochs_done, "train_config": config.to_dict(), "train_images": self.train_images,
            "loss": record.loss, "val": record.val, "trained_with": "galr.train",
        }
        save = dict(model=self.model, vocab=self.vocab, spec=self.spec)
        if record.val is not None and (self.best_mr is None or record.val["mean_recall"] > self.best_mr):
            self.best_epoch, self.best_mr = record.epoch, record.val["mean_recall"]
            save_checkpoint(best_path(self.checkpoint), metadata=metadata | {"best": True}, **save)
        save_checkpoint(self.checkpoint, metadata=metadata, **save)
        _atomic_torch_save({
            "format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION, "epoch": epochs_done,
            "config": config.to_dict(), "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "history": [r.to_dict() for r in self.history],
            "best_epoch": self.best_epoch, "best_mean_recall": self.best_mr,
        }, state_path(self.checkpoint))

    def log(self, record: EpochRecord) -> None:
        if not self.progress:
            return
        line = (f"epoch {record.epoch + 1}/{self.config.epochs}  loss {record.loss:.4f}  lr {record.lr:.2e}  "
                f"{record.seconds:.1f}s")
        if record.val is not None:
            line += f"  val mR {record.val['mean_recall']:.2f}"
            line += "  (best)" if self.best_epoch == record.epoch else ""
        tqdm.write(line)


def train(config: TrainConfig, output_checkpoint: str | os.PathLike, resume: bool = True,
          progress: bool = True) -> TrainResult:
    """Train GaLR, writing a checkpoint after every epoch.

    Args:
        config: the run's settings.
        output_checkpoint: galr checkpoint of the last epoch; ``.best.pt`` and ``.state.pt`` files
            are written next to it (:func:`best_path`, :func:`state_path`).
        resume: continue from ``.state.pt`` when it exists (it must come from the same config, except
            ``epochs``, ``device``, ``num_threads`` and ``eval_batch_size``); a finished run returns at once.
        progress: show progress bars and one line per epoch.

    Returns:
        Paths, history and the best validation score.

    Raises:
        TrainError: a config that does not fit the dataset, or a state file from another config.
        galr.data.DatasetError: missing or malformed dataset files.
        galr.preprocess.image.ImageLoadError: an unreadable image.
    """
    started = time.perf_counter()
    checkpoint = Path(output_checkpoint)
    state_file = state_path(checkpoint)
    state = _read_state(state_file, config) if resume and state_file.is_file() else None
    start_epoch = int(state["epoch"]) if state is not None else 0
    if state is not None and start_epoch >= config.epochs and checkpoint.is_file():
        # Finished already: no need to read the dataset.
        history = tuple(EpochRecord.from_dict(r) for r in state["history"])
        return _result(checkpoint, state["best_epoch"], state["best_mean_recall"], start_epoch, history, started)
    threads = torch.get_num_threads()
    try:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)  # process-wide in torch: restored below
        trainer = _Trainer(config, checkpoint, progress)
        if state is not None:
            trainer.restore(state)
            if progress and start_epoch:
                tqdm.write(f"resuming {checkpoint} after epoch {start_epoch}")
        for epoch in range(start_epoch, config.epochs):
            record = trainer.run_epoch(epoch)
            trainer.save(record)
            trainer.log(record)
    finally:
        torch.set_num_threads(threads)
    return _result(checkpoint, trainer.best_epoch, trainer.best_mr, start_epoch, tuple(trainer.history), started)


def _result(checkpoint: Path, best_epoch: int | None, best_mr: float | None, start_epoch: int,
            history: tuple[EpochRecord, ...], started: float) -> TrainResult:
    best = best_path(checkpoint) if best_epoch is not None else None
    epochs = history[-1].epoch + 1 if history else 0
    return TrainResult(checkpoint, best, state_path(checkpoint), epochs, start_epoch, history, best_epoch, best_mr,
                       time.perf_counter() - started)


__all__ = [
    "DEMO_EPOCHS",
    "EXECUTION_FIELDS",
    "LOSS_KINDS",
    "MODEL_PRESETS",
    "RESUMABLE_CHANGES",
    "EpochRecord",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "TrainingSet",
    "augment_pixels",
    "augmentation_base_size",
    "best_path",
    "contrastive_loss",
    "demo_model_config",
    "epoch_batches",
    "learning_rate",
    "load_training_set",
    "model_config_preset",
    "normalise_pixels",
    "pad_tokens",
    "state_path",
    "train",
    "train_config_preset",
]
