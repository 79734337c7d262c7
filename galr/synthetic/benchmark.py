"""Generate the synthetic retrieval benchmark on disk, in the original RSITMD/RSICD layout.

Layout under ``out_dir`` (readable by :func:`galr.data.load_split`)::

    images/<split>_<nnnnn>.png         rendered scenes (RGB, image_size x image_size)
    {split}_caps.txt                   5 consecutive captions per image
    {split}_filename.txt               the image name on each caption line
    vocab.json                         original-format vocabulary from the *train* captions
    detections/<stem>.json             noisy detections (schema in galr.synthetic.detector)
    detections_gt/<stem>.json          exact detections
    scenes/<split>.jsonl               one {"image": ..., "scene": SceneSpec} per line
    benchmark.json                     config, versions and counts; written last

Every image draws from its own random streams, seeded by ``(seed, split, index, purpose)``: the same
config gives byte-identical text files and identical pixels, the test images do not change when
``n_train`` changes, and changing caption or detector knobs leaves the scenes as they are.
``benchmark.json`` is written last, so a folder without it is an interrupted run and is regenerated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
import PIL
from tqdm import tqdm

import galr
from galr.atomic import atomic_output, write_bytes_atomically
from galr.data import DatasetPaths, RetrievalSplit, write_split
from galr.errors import InputError
from galr.serialization import fields_from_dict
from galr.synthetic.captions import build_vocabulary, generate_captions
from galr.synthetic.detector import (
    DetectorNoise,
    apply_detector_noise,
    ground_truth_detections,
    write_detections,
)
from galr.synthetic.scenes import SceneConfig, SceneSpec, render_scene, sample_scene

FORMAT = "galr-synthetic-benchmark"
FORMAT_VERSION = 1
# Bump whenever the same config would produce different files (a new shape, a new caption template...).
GENERATOR_VERSION = "1.0.0"
SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_CODES: Mapping[str, int] = MappingProxyType({"train": 0, "val": 1, "test": 2})
_STREAM_SCENE, _STREAM_CAPTIONS, _STREAM_DETECTIONS = 0, 1, 2
_GENERATED_NAME = re.compile(r"^(train|val|test)_\d{5}\.(png|json)$")


class BenchmarkError(InputError):
    """The output folder holds a different benchmark, or a benchmark file is unreadable."""


@dataclass(frozen=True)
class BenchmarkConfig:
    """Everything that determines a synthetic benchmark.

    Attributes:
        seed: master seed.
        n_train: training images.
        n_val: validation images.
        n_test: test images.
        image_size: image side in pixels.
        captions_per_image: captions per image (5 like RSITMD/RSICD).
        caption_specificity: 0..1, detail in captions (exact counts, colours, positions, several objects
            per caption, layout); lower is harder.
        vocab_min_count: words seen fewer times in the train captions become ``<unk>``.
        scene: scene sampling knobs (object groups, distractors, class/land-cover correlation).
        detector_noise: how the ``detections/`` files depart from ``detections_gt/``.
    """

    seed: int = 0
    n_train: int = 400
    n_val: int = 50
    n_test: int = 100
    image_size: int = 256
    captions_per_image: int = 5
    caption_specificity: float = 0.7
    vocab_min_count: int = 1
    scene: SceneConfig = field(default_factory=SceneConfig)
    detector_noise: DetectorNoise = field(default_factory=DetectorNoise)

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 0 or getattr(self, name) > 99999:
                raise InputError(f"BenchmarkConfig.{name} must be in [0, 99999], got {getattr(self, name)}")
        if self.n_train < 1:
            raise InputError("BenchmarkConfig.n_train must be at least 1 (the vocabulary is built from it)")
        if self.image_size < 32:
            raise InputError(f"BenchmarkConfig.image_size must be at least 32, got {self.image_size}")
        if self.captions_per_image < 1:
            raise InputError(f"BenchmarkConfig.captions_per_image must be at least 1, got {self.captions_per_image}")
        if not 0.0 <= self.caption_specificity <= 1.0:
            raise InputError(f"BenchmarkConfig.caption_specificity must be in [0, 1], got {self.caption_specificity}")
        if self.vocab_min_count < 1:
            raise InputError(f"BenchmarkConfig.vocab_min_count must be at least 1, got {self.vocab_min_count}")

    def split_size(self, split: str) -> int:
        if split not in _SPLIT_CODES:
            raise InputError(f"unknown split {split!r}; expected one of {SPLITS}")
        return int(getattr(self, f"n_{split}"))

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["scene"] = self.scene.to_dict()
        values["detector_noise"] = self.detector_noise.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "BenchmarkConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error so a newer file is never half-read."""
        fixed = fields_from_dict(cls, values, lists_to_tuples=False)
        if "scene" in fixed:
            fixed["scene"] = SceneConfig.from_dict(fixed["scene"])
        if "detector_noise" in fixed:
            fixed["detector_noise"] = DetectorNoise.from_dict(fixed["detector_noise"])
        return cls(**fixed)

    @classmethod
    def preset(cls, difficulty: str, **overrides: Any) -> "BenchmarkConfig":
        """A config at a named difficulty: ``"easy"``, ``"medium"`` (the defaults) or ``"hard"``.

        Args:
            difficulty: preset name.
            **overrides: fields to set on top of the preset (e.g. ``seed=3, n_train=200``).

        Raises:
            ValueError: unknown preset.
        """
        presets: dict[str, dict[str, Any]] = {
            "easy": dict(
                caption_specificity=1.0,
                scene=SceneConfig(salient_groups=(2, 3), distractor_groups=(0, 0), class_cover_correlation=0.9),
                detector_noise=DetectorNoise(miss_rate=0.03, duplicate_rate=0.05, false_alarms=0.2, confusion_rate=0.0),
            ),
            "medium": {},
            "hard": dict(
                caption_specificity=0.4,
                scene=SceneConfig(salient_groups=(1, 2), distractor_groups=(1, 2), class_cover_correlation=0.5),
                detector_noise=DetectorNoise(
                    miss_rate=0.2, duplicate_rate=0.3, false_alarms=2.0, confusion_rate=0.15, box_jitter=0.08
                ),
            ),
        }
        if difficulty not in presets:
            raise InputError(f"unknown difficulty {difficulty!r}; expected one of {sorted(presets)}")
        return cls(**{**presets[difficulty], **overrides})


@dataclass(frozen=True)
class BenchmarkInfo:
    """What :func:`generate_benchmark` produced (or found cached).

    Attributes:
        root: the benchmark folder.
        config: its config.
        images: images per split.
        vocab_size: words in ``vocab.json`` (``<unk>`` included).
        format_version: layout version.
        generator_version: generator version.
        cached: ``True`` when an existing benchmark was reused.
        seconds: wall time of this call.
    """

    root: Path
    config: BenchmarkConfig
    images: Mapping[str, int]
    vocab_size: int
    format_version: int = FORMAT_VERSION
    generator_version: str = GENERATOR_VERSION
    cached: bool = False
    seconds: float = 0.0

    @property
    def paths(self) -> DatasetPaths:
        return DatasetPaths(self.root)


@dataclass(frozen=True)
class SyntheticSample:
    """One generated image's description: name, scene and captions (pixels are rendered separately)."""

    name: str
    scene: SceneSpec
    captions: tuple[str, ...]


def _stream(config: BenchmarkConfig, split: str, index: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([config.seed, _SPLIT_CODES[split], index, purpose]))


def image_name(split: str, index: int) -> str:
    """File name of image ``index`` (0-based) of a split, e.g. ``test_00001.png``."""
    return f"{split}_{index + 1:05d}.png"


def make_sample(config: BenchmarkConfig, split: str, index: int) -> SyntheticSample:
    """Scene and captions of one image, from that image's own random streams (no rendering)."""
    scene = sample_scene(_stream(config, split, index, _STREAM_SCENE), config.scene)
    captions = generate_captions(
        scene,
        _stream(config, split, index, _STREAM_CAPTIONS),
        count=config.captions_per_image,
        specificity=config.caption_specificity,
    )
    return SyntheticSample(image_name(split, index), scene, tuple(captions))


def sample_split(config: BenchmarkConfig, split: str) -> list[SyntheticSample]:
    """Scenes and captions of a split without rendering (cheap; what the benchmark files will hold).

    Args:
        config: the benchmark config.
        split: ``"train"``, ``"val"`` or ``"test"``.

    Returns:
        One sample per image, in order.
    """
    return [make_sample(config, split, index) for index in range(config.split_size(split))]


def _write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomically(path, text.encode("utf-8"))


def read_benchmark_info(out_dir: str | os.PathLike) -> BenchmarkInfo:
    """Read ``benchmark.json`` of a finished benchmark.

    Raises:
        BenchmarkError: the file is missing, unreadable or of an unknown format.
    """
    path = Path(out_dir) / "benchmark.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchmarkError(f"no finished benchmark in {path.parent} ({path.name} is missing)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchmarkError(f"{path}: unreadable ({exc}); regenerate with overwrite=True") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BenchmarkError(f"{path}: not a {FORMAT} file")
    if data.get("format_version") != FORMAT_VERSION:
        raise BenchmarkError(
            f"{path}: format version {data.get('format_version')} is not {FORMAT_VERSION}; "
            "regenerate with overwrite=True"
        )
    return BenchmarkInfo(
        root=path.parent,
        config=BenchmarkConfig.from_dict(data["config"]),
        images={s: int(v["images"]) for s, v in data["splits"].items()},
        vocab_size=int(data["vocab_size"]),
        format_version=int(data["format_version"]),
        generator_version=str(data["generator_version"]),
        cached=True,
    )


def _clear_generated(paths: DatasetPaths) -> None:
    """Remove files an earlier (possibly interrupted) run wrote, and only those."""
    for folder in (paths.images, paths.detections, paths.detections_gt):
        if folder.is_dir():
            for item in folder.iterdir():
                if _GENERATED_NAME.match(item.name):
                    item.unlink()
    for split in SPLITS:
        for item in (paths.caption_file(split), paths.filename_file(split), paths.root / "scenes" / f"{split}.jsonl"):
            item.unlink(missing_ok=True)


def _write_image(paths: DatasetPaths, config: BenchmarkConfig, split: str, index: int) -> SyntheticSample:
    """Sample one image, write its PNG and both detection files, and return its description."""
    sample = make_sample(config, split, index)
    size = config.image_size
    # The fastest zlib level: synthetic noise barely compresses, so higher levels only cost time.
    with atomic_output(paths.images / sample.name) as handle:
        render_scene(sample.scene, size).save(handle, format="PNG", compress_level=1)
    exact = ground_truth_detections(sample.scene, size)
    noisy = apply_detector_noise(exact, config.detector_noise, _stream(config, split, index, _STREAM_DETECTIONS), size)
    stem = Path(sample.name).stem
    write_detections(paths.detections_gt / f"{stem}.json", sample.name, size, size, exact)
    write_detections(paths.detections / f"{stem}.json", sample.name, size, size, noisy)
    return sample


def generate_benchmark(
    out_dir: str | os.PathLike, config: BenchmarkConfig | None = None, progress: bool = True, overwrite: bool = False
) -> BenchmarkInfo:
    """Write the benchmark (layout in the module doc), or reuse the one already there.

    Args:
        out_dir: destination folder (created if missing).
        config: what to generate; defaults to ``BenchmarkConfig()`` (400/50/100 images).
        progress: show a tqdm progress bar.
        overwrite: regenerate even if ``out_dir`` holds a finished benchmark (of any config).

    Returns:
        Counts and versions; ``cached`` tells whether the existing files were reused.

    Raises:
        BenchmarkError: ``out_dir`` holds a finished benchmark with another config or generator
            version and ``overwrite`` is false.
    """
    config = config or BenchmarkConfig()
    started = time.perf_counter()
    root = Path(out_dir)
    paths = DatasetPaths(root)
    info_file = root / "benchmark.json"
    if info_file.exists() and not overwrite:
        existing = read_benchmark_info(root)
        if existing.config == config and existing.generator_version == GENERATOR_VERSION:
            return dataclasses.replace(existing, seconds=time.perf_counter() - started)
        raise BenchmarkError(
            f"{root} holds a benchmark with a different config or generator version "
            f"({existing.generator_version}); pass overwrite=True or choose another out_dir"
        )
    # From here on the folder is unfinished until benchmark.json is written again.
    info_file.unlink(missing_ok=True)
    _clear_generated(paths)
    for folder in (paths.images, paths.detections, paths.detections_gt, root / "scenes"):
        folder.mkdir(parents=True, exist_ok=True)

    total = sum(config.split_size(s) for s in SPLITS)
    train_captions: list[str] = []
    with tqdm(total=total, desc="synthetic benchmark", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            samples: list[SyntheticSample] = []
            for index in range(config.split_size(split)):
                samples.append(_write_image(paths, config, split, index))
                bar.update(1)
            scene_lines = [
                json.dumps({"image": s.name, "scene": s.scene.to_dict()}, separators=(",", ":")) for s in samples
            ]
            _write_text_atomic(root / "scenes" / f"{split}.jsonl", "".join(line + "\n" for line in scene_lines))
            captions = tuple(c for s in samples for c in s.captions)
            names = tuple(s.name for s in samples)
            write_split(RetrievalSplit(names, captions, config.captions_per_image, root, paths.images, split), root)
            if split == "train":
                train_captions = list(captions)

    vocab = build_vocabulary(train_captions, min_count=config.vocab_min_count)
    vocab.save(root / "vocab.json")
    images = {s: config.split_size(s) for s in SPLITS}
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generator_version": GENERATOR_VERSION,
        "config": config.to_dict(),
        "splits": {s: {"images": n, "captions": n * config.captions_per_image} for s, n in images.items()},
        "vocab_size": len(vocab),
        # Pixels depend on these libraries' resampling and random streams; recorded, not checked.
        "libraries": {"galr": galr.__version__, "numpy": np.__version__, "pillow": PIL.__version__},
    }
    _write_text_atomic(info_file, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return BenchmarkInfo(root, config, images, len(vocab), cached=False, seconds=time.perf_counter() - started)
