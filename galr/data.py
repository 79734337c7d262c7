"""Retrieval datasets in the original GaLR layout (RSITMD, RSICD, the synthetic benchmark); torch-free.

A dataset root holds, per split (``train``, ``val``, ``test``, or k-fold names such as ``train_verify``):

- ``{split}_caps.txt``: one caption per line, the captions of one image on consecutive lines;
- ``{split}_filename.txt``: the image file name for each caption line (so each name repeats
  ``captions_per_image`` times in a row; the image list is every ``captions_per_image``-th entry).

Images live in an image folder (``root/images`` unless told otherwise), the vocabulary in a JSON
file in the original format, detections in ``root/detections``. Caption ``j`` belongs to image
``j // captions_per_image``, the convention of the original evaluation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from galr.atomic import write_text_atomically
from galr.errors import InputError


class DatasetError(InputError):
    """A dataset file is missing or malformed."""


@dataclass(frozen=True)
class RetrievalSplit:
    """Images and their captions, in file order.

    Attributes:
        image_names: one file name per image.
        captions: ``captions_per_image`` consecutive captions per image.
        captions_per_image: captions of each image (5 for RSITMD/RSICD).
        root: the dataset folder the split was read from.
        image_dir: folder the image names are relative to (``root / "images"`` when not given).
        name: the split's name (e.g. ``"test"``), informational.
    """

    image_names: tuple[str, ...]
    captions: tuple[str, ...]
    captions_per_image: int = 5
    root: Path = field(default_factory=lambda: Path("."))
    image_dir: Path | None = None
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_names", tuple(self.image_names))
        object.__setattr__(self, "captions", tuple(self.captions))
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(
            self, "image_dir", Path(self.image_dir) if self.image_dir is not None else self.root / "images"
        )
        if self.captions_per_image < 1:
            raise DatasetError(f"captions_per_image must be at least 1, got {self.captions_per_image}")
        if len(self.captions) != len(self.image_names) * self.captions_per_image:
            raise DatasetError(
                f"split {self.name!r}: {len(self.captions)} captions for {len(self.image_names)} images; "
                f"expected {self.captions_per_image} per image ({len(self.image_names) * self.captions_per_image})"
            )

    @property
    def num_images(self) -> int:
        return len(self.image_names)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def image_path(self, index: int) -> Path:
        """Path of image ``index`` (its name joined to ``image_dir``).

        Raises:
            IndexError: ``index`` is outside ``[0, num_images)``.
        """
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} out of range for split {self.name!r} with {self.num_images} images")
        assert self.image_dir is not None  # set in __post_init__
        return self.image_dir / self.image_names[index]

    def subset(self, image_indices: Sequence[int], name: str | None = None) -> "RetrievalSplit":
        """A split with the given images (in the given order) and their captions."""
        indices = [int(i) for i in image_indices]
        for i in indices:
            if not 0 <= i < self.num_images:
                raise IndexError(f"image index {i} out of range for split {self.name!r} with {self.num_images} images")
        cpi = self.captions_per_image
        captions = tuple(c for i in indices for c in self.captions[i * cpi : (i + 1) * cpi])
        return replace(
            self,
            image_names=tuple(self.image_names[i] for i in indices),
            captions=captions,
            name=self.name if name is None else name,
        )


@dataclass(frozen=True)
class DatasetPaths:
    """Where a dataset's files are, with the original layout's defaults.

    Attributes:
        root: folder with the ``{split}_caps.txt`` / ``{split}_filename.txt`` files.
        image_dir: image folder; ``root / "images"`` when not given.
        vocab_file: vocabulary JSON; searched in ``root`` when not given (see :meth:`vocab`).
        detections_dir: per-image detection JSON files; ``root / "detections"`` when not given.
    """

    root: Path
    image_dir: Path | None = None
    vocab_file: Path | None = None
    detections_dir: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        for name in ("image_dir", "vocab_file", "detections_dir"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))

    @classmethod
    def find(cls, root: str | os.PathLike, **overrides: str | os.PathLike | None) -> "DatasetPaths":
        """Paths for an existing dataset folder.

        Raises:
            DatasetError: ``root`` is not a directory.
        """
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"dataset folder not found: {root}")
        return cls(root, **overrides)  # type: ignore[arg-type]

    @property
    def images(self) -> Path:
        return self.image_dir if self.image_dir is not None else self.root / "images"

    @property
    def detections(self) -> Path:
        return self.detections_dir if self.detections_dir is not None else self.root / "detections"

    @property
    def detections_gt(self) -> Path:
        """Exact detections of a synthetic benchmark (``root / "detections_gt"``)."""
        return self.root / "detections_gt"

    def vocab(self) -> Path:
        """The vocabulary file: ``vocab_file`` if given, else ``root/vocab.json``, else the one
        ``root/*_vocab.json`` (the original's ``rsitmd_splits_vocab.json`` naming).

        Raises:
            DatasetError: no candidate exists, or several do.
        """
        if self.vocab_file is not None:
            if not self.vocab_file.is_file():
                raise DatasetError(f"vocabulary file not found: {self.vocab_file}")
            return self.vocab_file
        default = self.root / "vocab.json"
        if default.is_file():
            return default
        matches = sorted(self.root.glob("*_vocab.json"))
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise DatasetError(f"several vocabularies in {self.root}: {[m.name for m in matches]}; pass vocab_file")
        raise DatasetError(f"no vocabulary in {self.root} (looked for vocab.json and *_vocab.json); pass vocab_file")

    def caption_file(self, split: str) -> Path:
        return self.root / f"{split}_caps.txt"

    def filename_file(self, split: str) -> Path:
        return self.root / f"{split}_filename.txt"

    def splits(self) -> tuple[str, ...]:
        """Split names that have both files, sorted."""
        names = {p.name[: -len("_caps.txt")] for p in self.root.glob("*_caps.txt")}
        return tuple(sorted(n for n in names if self.filename_file(n).is_file()))


def _read_lines(path: Path) -> list[str]:
    """Stripped lines of a UTF-8 text file (read as bytes and decoded, like the original)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"file not found: {path}") from None
    chunks = raw.split(b"\n")
    if chunks and chunks[-1].strip() == b"":
        chunks.pop()  # the newline that ends the last line
    lines: list[str] = []
    for number, chunk in enumerate(chunks, start=1):
        try:
            line = chunk.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}, line {number}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if number == 1:
            line = line.lstrip("\ufeff")  # a byte-order mark left by some editors
        if not line:
            raise DatasetError(f"{path}, line {number}: empty line; every line must hold one entry")
        lines.append(line)
    return lines


def load_split(
    root: str | os.PathLike, split: str, image_dir: str | os.PathLike | None = None, captions_per_image: int = 5
) -> RetrievalSplit:
    """Read ``{split}_caps.txt`` and ``{split}_filename.txt`` from a dataset folder.

    Args:
        root: the folder with the two files.
        split: split name, e.g. ``"test"``.
        image_dir: folder of the images; ``root / "images"`` when not given (not checked to exist:
            the shipped RSITMD/RSICD caption files come without images).
        captions_per_image: captions per image (5 for RSITMD/RSICD).

    Returns:
        The split, images in file order.

    Raises:
        DatasetError: a file is missing, not UTF-8, has empty lines, the two files differ in length,
            or an image's name is not repeated on ``captions_per_image`` consecutive lines (the
            message names the file and the line).
    """
    paths = DatasetPaths(Path(root), image_dir=None if image_dir is None else Path(image_dir))
    caption_file, filename_file = paths.caption_file(split), paths.filename_file(split)
    captions = _read_lines(caption_file)
    filenames = _read_lines(filename_file)
    if len(captions) != len(filenames):
        raise DatasetError(
            f"{caption_file} has {len(captions)} lines but {filename_file} has {len(filenames)}; "
            "they must have one line per caption each"
        )
    if captions_per_image < 1:
        raise DatasetError(f"captions_per_image must be at least 1, got {captions_per_image}")
    if len(filenames) % captions_per_image:
        raise DatasetError(
            f"{filename_file}: {len(filenames)} lines is not a multiple of {captions_per_image} captions per image"
        )
    image_names: list[str] = []
    for start in range(0, len(filenames), captions_per_image):
        name = filenames[start]
        for offset in range(1, captions_per_image):
            found = filenames[start + offset]
            if found != name:
                raise DatasetError(
                    f"{filename_file}, line {start + offset + 1}: expected {name!r} (each image name repeats on "
                    f"{captions_per_image} consecutive lines, starting at line {start + 1}), found {found!r}"
                )
        image_names.append(name)
    return RetrievalSplit(tuple(image_names), tuple(captions), captions_per_image, paths.root, paths.images, split)


def write_split(split: RetrievalSplit, root: str | os.PathLike, name: str | None = None) -> tuple[Path, Path]:
    """Write a split as ``{name}_caps.txt`` and ``{name}_filename.txt`` (UTF-8, ``\\n`` line ends).

    Args:
        split: the split to write.
        root: destination folder (created if missing).
        name: split name in the file names; ``split.name`` when not given.

    Returns:
        (captions file, filenames file).

    Raises:
        DatasetError: no name is known, or a caption or image name holds a line break.
    """
    name = name or split.name
    if not name:
        raise DatasetError("write_split needs a split name (pass name=...)")
    for text in split.captions + split.image_names:
        if "\n" in text or "\r" in text:
            raise DatasetError(f"cannot write split {name!r}: {text[:60]!r} contains a line break")
    paths = DatasetPaths(Path(root))
    paths.root.mkdir(parents=True, exist_ok=True)
    cpi = split.captions_per_image
    repeated = [n for n in split.image_names for _ in range(cpi)]
    caption_file, filename_file = paths.caption_file(name), paths.filename_file(name)
    write_text_atomically(caption_file, "".join(c + "\n" for c in split.captions))
    write_text_atomically(filename_file, "".join(n + "\n" for n in repeated))
    return caption_file, filename_file


def kfold_splits(
    split: RetrievalSplit, k: int, fold: int, seed: int, val_fraction: float = 0.2
) -> tuple[RetrievalSplit, RetrievalSplit]:
    """Re-split images into train/val for one fold of the original k-fold protocol.

    The original (``generate_random_samples``) draws a fresh random 80/20 split of the official train
    images for each fold. Here one seeded permutation is cut into consecutive validation windows, one
    per fold, so folds are reproducible from ``(seed, fold)`` and, while ``k * val_fraction <= 1``, no
    image is validated twice. Images keep all their captions on one side.

    Args:
        split: the images to divide (normally the official train split).
        k: number of folds.
        fold: this fold, ``0 <= fold < k``.
        seed: permutation seed, shared by all folds.
        val_fraction: share of images for validation.

    Returns:
        (train, val) splits named ``"{name}_fold{fold}_train"`` / ``"..._val"``, each in the original
        image order.

    Raises:
        ValueError: ``k``, ``fold`` or ``val_fraction`` out of range, or too few images for both sides.
    """
    if k < 1 or not 0 <= fold < k:
        raise InputError(f"kfold_splits needs k >= 1 and 0 <= fold < k, got k={k}, fold={fold}")
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = split.num_images
    n_val = max(1, int(round(val_fraction * n)))
    if n_val >= n:
        raise InputError(f"split {split.name!r} has {n} images; too few for a {val_fraction:.0%} validation share")
    order = np.random.default_rng(seed).permutation(n)
    val = np.sort(order[(fold * n_val + np.arange(n_val)) % n])
    train = np.setdiff1d(np.arange(n), val)
    prefix = f"{split.name or 'split'}_fold{fold}"
    return split.subset(train.tolist(), f"{prefix}_train"), split.subset(val.tolist(), f"{prefix}_val")
