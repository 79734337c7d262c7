"""Tests for galr.synthetic: scenes, captions, detections and the on-disk benchmark."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from galr.data import DatasetPaths, load_split
from galr.preprocess.text import Tokenizer, Vocabulary, tokenize
from galr.synthetic import (
    LAND_COVERS,
    OBJECT_CLASSES,
    BenchmarkConfig,
    BenchmarkError,
    DetectorNoise,
    ObjectGroup,
    ObjectInstance,
    SceneSpec,
    apply_detector_noise,
    build_vocabulary,
    caption_mentions,
    generate_benchmark,
    generate_captions,
    ground_truth_detections,
    read_benchmark_info,
    read_detections,
    render_scene,
    sample_scene,
    sample_split,
)
from galr.synthetic.captions import (
    CLASS_NOUNS,
    COVER_WORDS,
    VOCAB_STOPWORDS,
    spatial_relations,
)
from galr.synthetic.detector import box_iou

SMALL = BenchmarkConfig(seed=7, n_train=6, n_val=2, n_test=2, image_size=128)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    generate_benchmark(root, SMALL, progress=False)
    return root


def _text_files(root: Path) -> dict[str, bytes]:
    """Every generated file except the PNGs, by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".png"
    }


# --- scenes -----------------------------------------------------------------------------------------


def test_scene_spec_round_trips_through_json_and_renders_identically() -> None:
    spec = sample_scene(np.random.default_rng(3))
    again = SceneSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    a, b = render_scene(spec, 96), render_scene(again, 96)
    assert a.mode == "RGB" and a.size == (96, 96)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_scenes_differ_between_seeds() -> None:
    a, b = (sample_scene(np.random.default_rng(s)) for s in (1, 2))
    assert a != b
    assert not np.array_equal(np.asarray(render_scene(a, 64)), np.asarray(render_scene(b, 64)))


def test_scene_spec_rejects_bad_fields() -> None:
    spec = sample_scene(np.random.default_rng(0))
    with pytest.raises(ValueError, match="land_cover"):
        dataclasses.replace(spec, land_cover="lava")
    with pytest.raises(ValueError, match="secondary_cover"):
        dataclasses.replace(spec, layout="full", secondary_cover="water")
    with pytest.raises(ValueError, match="unknown fields"):
        SceneSpec.from_dict({**spec.to_dict(), "colour_scheme": 1})


def test_objects_stand_on_plausible_land_cover() -> None:
    for seed in range(40):
        spec = sample_scene(np.random.default_rng(seed))
        for group in spec.groups:
            covers = set(
                spec.cover_at(np.array([o.cx for o in group.instances]), np.array([o.cy for o in group.instances]))
            )
            if group.label == "ship":
                assert covers == {"water"}, (seed, group)
            if group.label == "plane":
                assert covers <= {"bare-soil", "urban", "desert"}, (seed, group)
            if group.label == "bridge":
                assert spec.layout.startswith("river"), (seed, group)


# --- captions and vocabulary ------------------------------------------------------------------------


def test_captions_are_consistent_with_their_scene() -> None:
    for sample in sample_split(BenchmarkConfig(n_train=60), "train"):
        scene = sample.scene
        salient = {g.label: g.count for g in scene.salient_groups}
        assert len(sample.captions) == 5
        for caption in sample.captions:
            mentions = caption_mentions(caption)
            assert mentions.classes <= set(salient), (caption, scene.groups)
            assert mentions.covers <= set(scene.covers_present), (caption, scene.covers_present)
            for label, count in mentions.counts.items():
                assert salient[label] == count, (caption, label)


def test_captions_are_deterministic_and_vary_with_the_rng() -> None:
    spec = sample_scene(np.random.default_rng(11))
    first = generate_captions(spec, np.random.default_rng(0))
    assert first == generate_captions(spec, np.random.default_rng(0))
    assert first != generate_captions(spec, np.random.default_rng(1))
    assert len(set(first)) > 1


def test_spatial_relations_follow_geometry() -> None:
    def group(label: str, points: list[tuple[float, float]]) -> ObjectGroup:
        return ObjectGroup(
            label, "white", (230, 230, 230), tuple(ObjectInstance(x, y, 0.03, 0.015, 0.0) for x, y in points)
        )

    left, right = group("plane", [(0.2, 0.5)]), group("ship", [(0.8, 0.52)])
    assert "left of" in spatial_relations(left, right)
    assert "right of" in spatial_relations(right, left)
    assert "next to" not in spatial_relations(left, right)
    top, bottom = group("plane", [(0.5, 0.1)]), group("ship", [(0.5, 0.9)])
    assert "above" in spatial_relations(top, bottom) and "below" in spatial_relations(bottom, top)
    centre = group("roundabout", [(0.5, 0.5)])
    ring = group("small-vehicle", [(0.5 + 0.08 * np.cos(a), 0.5 + 0.08 * np.sin(a)) for a in np.linspace(0, 6, 6)])
    assert {"surrounded by", "next to"} <= set(spatial_relations(centre, ring))


def test_vocabulary_covers_classes_and_land_covers() -> None:
    captions = [c for s in sample_split(BenchmarkConfig(n_train=60), "train") for c in s.captions]
    vocab = build_vocabulary(captions)
    for label in OBJECT_CLASSES:
        words = {w for pair in CLASS_NOUNS[label] for phrase in pair for w in phrase.split()}
        assert words & set(vocab.word2idx), label
    for cover in LAND_COVERS:
        assert COVER_WORDS[cover] & set(vocab.word2idx), cover
    tokenizer = Tokenizer(vocab, max_length=47)
    for caption in captions:
        tokens = tokenize(caption)
        ids = tokenizer.encode(caption)
        assert 0 < len(ids) <= 47
        # Every non-stopword is known (min_count 1); stopwords become <unk> like the original.
        for token, token_id in zip(tokens, ids, strict=True):
            assert (token_id == vocab.unk_id) == (token in VOCAB_STOPWORDS), token


def test_vocabulary_min_count_drops_rare_words() -> None:
    vocab = build_vocabulary(["two planes", "two ships", "the planes"], min_count=2)
    assert vocab.words() == ["two", "planes", "<unk>"]


# --- detections -------------------------------------------------------------------------------------


def test_ground_truth_boxes_enclose_every_instance() -> None:
    spec = sample_scene(np.random.default_rng(5))
    detections = ground_truth_detections(spec, 256)
    assert len(detections) == sum(g.count for g in spec.groups)
    for det in detections:
        x0, y0, x1, y1 = det.box
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256 and det.score == 1.0


def test_detector_noise_adds_duplicates_and_false_alarms() -> None:
    spec = sample_scene(np.random.default_rng(5))
    exact = ground_truth_detections(spec, 256)
    perfect = DetectorNoise(miss_rate=0.0, true_score=1.0, score_jitter=0.0, box_jitter=0.0, duplicate_rate=0.0,
                            false_alarms=0.0, confusion_rate=0.0)
    clean = apply_detector_noise(exact, perfect, np.random.default_rng(0), 256)
    assert sorted(clean, key=lambda d: d.box) == sorted(exact, key=lambda d: d.box)
    noise = DetectorNoise(
        miss_rate=0.0, duplicate_rate=1.0, duplicate_min_iou=0.7, false_alarms=5.0, confusion_rate=0.0
    )
    noisy = apply_detector_noise(exact, noise, np.random.default_rng(0), 256)
    scores = [d.score for d in noisy]
    assert scores == sorted(scores, reverse=True)
    duplicates = sum(
        1 for i, a in enumerate(noisy) for b in noisy[i + 1 :] if a.label == b.label and box_iou(a.box, b.box) >= 0.7
    )
    assert duplicates >= len(exact) // 2
    assert len(noisy) > 2 * len(exact)  # duplicates plus false alarms


def test_detection_files_follow_the_schema(bench: Path) -> None:
    for folder in ("detections", "detections_gt"):
        files = sorted((bench / folder).glob("*.json"))
        assert len(files) == 10
        for path in files:
            data = json.loads(path.read_text(encoding="utf-8"))
            assert set(data) == {"image", "width", "height", "detections"}
            assert data["image"] == path.stem + ".png" and data["width"] == data["height"] == 128
            for det in data["detections"]:
                assert set(det) == {"label", "score", "box"} and det["label"] in OBJECT_CLASSES
                assert 0.0 <= det["score"] <= 1.0 and len(det["box"]) == 4
                assert 0 <= det["box"][0] <= det["box"][2] <= 128 and 0 <= det["box"][1] <= det["box"][3] <= 128
            read_detections(path)  # validates too


# --- the benchmark on disk --------------------------------------------------------------------------


def test_layout_is_readable_by_the_dataset_loader(bench: Path) -> None:
    paths = DatasetPaths.find(bench)
    assert paths.splits() == ("test", "train", "val")
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        data = load_split(bench, split)
        assert data.num_images == n and data.num_captions == 5 * n
        for i in range(n):
            with Image.open(data.image_path(i)) as image:
                assert image.size == (128, 128) and image.mode == "RGB"
        scenes = [json.loads(line) for line in (bench / "scenes" / f"{split}.jsonl").read_text().splitlines()]
        assert [s["image"] for s in scenes] == list(data.image_names)
        SceneSpec.from_dict(scenes[0]["scene"])
    train = load_split(bench, "train")
    assert Vocabulary.load(paths.vocab()) == build_vocabulary(train.captions)


def test_same_seed_gives_identical_files_and_pixels(bench: Path, tmp_path: Path) -> None:
    again = generate_benchmark(tmp_path / "again", SMALL, progress=False)
    assert _text_files(again.root) == _text_files(bench)
    for image in sorted((bench / "images").glob("*.png")):
        assert np.array_equal(np.asarray(Image.open(image)), np.asarray(Image.open(again.root / "images" / image.name)))
    other = generate_benchmark(tmp_path / "other", dataclasses.replace(SMALL, seed=8), progress=False)
    assert load_split(other.root, "train").captions != load_split(bench, "train").captions


def test_test_split_does_not_depend_on_train_size() -> None:
    small, large = (sample_split(dataclasses.replace(SMALL, n_train=n), "test") for n in (3, 9))
    assert small == large


def test_cache_reuse_conflict_overwrite_and_interrupted_runs(tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, n_train=2, n_val=1, n_test=1, image_size=64)
    first = generate_benchmark(tmp_path, config, progress=False)
    assert not first.cached and read_benchmark_info(tmp_path).config == config
    assert generate_benchmark(tmp_path, config, progress=False).cached
    bigger = dataclasses.replace(config, n_train=3)
    with pytest.raises(BenchmarkError, match="overwrite=True"):
        generate_benchmark(tmp_path, bigger, progress=False)
    assert not generate_benchmark(tmp_path, bigger, progress=False, overwrite=True).cached
    assert load_split(tmp_path, "train").num_images == 3
    # No benchmark.json means an unfinished run: it is regenerated, and stale files are removed.
    (tmp_path / "benchmark.json").unlink()
    assert not generate_benchmark(tmp_path, config, progress=False).cached
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "test_00001.png",
        "train_00001.png",
        "train_00002.png",
        "val_00001.png",
    ]


def test_config_round_trips_and_presets() -> None:
    config = BenchmarkConfig.preset("hard", seed=3)
    assert config.seed == 3 and config.caption_specificity < BenchmarkConfig().caption_specificity
    assert BenchmarkConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown BenchmarkConfig fields"):
        BenchmarkConfig.from_dict({"sed": 1})
    with pytest.raises(ValueError, match="difficulty"):
        BenchmarkConfig.preset("insane")
    with pytest.raises(ValueError, match="caption_specificity"):
        BenchmarkConfig(caption_specificity=1.5)
