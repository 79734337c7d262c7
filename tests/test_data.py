"""Tests for galr.data: the original caption/filename layout, k-fold re-splits, dataset paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from galr.data import (
    DatasetError,
    DatasetPaths,
    RetrievalSplit,
    kfold_splits,
    load_split,
    write_split,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write(root: Path, split: str, captions: list[str], names: list[str]) -> None:
    (root / f"{split}_caps.txt").write_text("".join(c + "\n" for c in captions), encoding="utf-8")
    (root / f"{split}_filename.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")


def _toy_split(n_images: int, cpi: int = 5) -> RetrievalSplit:
    names = tuple(f"img_{i}.png" for i in range(n_images))
    return RetrievalSplit(
        names, tuple(f"caption {j} of {n}" for n in names for j in range(cpi)), cpi, Path("."), name="train"
    )


@pytest.mark.parametrize(("dataset", "images", "first"), [("rsitmd", 452, "boat_0.tif"), ("rsicd", 1093, None)])
def test_shared_test_splits_load(dataset: str, images: int, first: str | None) -> None:
    root = SHARED_DATA / dataset
    if not (root / "test_caps.txt").is_file():
        pytest.skip(f"shared data not available at {root}")
    split = load_split(root, "test")
    assert split.num_images == images and split.num_captions == 5 * images
    assert len(set(split.image_names)) == images
    assert split.image_dir == root / "images" and split.name == "test"
    if first is not None:
        assert split.image_names[0] == first and split.image_path(0) == root / "images" / first
        assert split.captions[0].startswith("Two large ships")
    assert split.captions_per_image == 5 and split.num_captions == 5 * split.num_images
    assert DatasetPaths.find(root).vocab() == root / "vocab.json"


def test_round_trip_through_write_split(tmp_path: Path) -> None:
    split = _toy_split(3)
    write_split(split, tmp_path)
    loaded = load_split(tmp_path, "train", image_dir=tmp_path / "pictures")
    assert loaded.image_names == split.image_names and loaded.captions == split.captions
    assert loaded.image_path(2) == tmp_path / "pictures" / "img_2.png"
    assert loaded.captions[5:10] == split.captions[5:10]
    with pytest.raises(IndexError, match="out of range"):
        loaded.image_path(3)


def test_original_byte_reading_strips_crlf_and_bom(tmp_path: Path) -> None:
    (tmp_path / "test_caps.txt").write_bytes("\ufeffa caf\u00e9\r\nb\r\n".encode("utf-8"))
    (tmp_path / "test_filename.txt").write_bytes(b"x.tif\r\nx.tif\r\n")
    split = load_split(tmp_path, "test", captions_per_image=2)
    assert split.captions == ("a caf\u00e9", "b") and split.image_names == ("x.tif",)


@pytest.mark.parametrize(
    ("captions", "names", "message"),
    [
        (["c"] * 5, ["a.png"] * 4, r"test_caps.txt has 5 lines but .*test_filename.txt has 4"),
        (["c"] * 6, ["a.png"] * 6, r"test_filename.txt: 6 lines is not a multiple of 5"),
        (["c"] * 10, ["a.png"] * 4 + ["b.png"] * 6, r"test_filename.txt, line 5: expected 'a.png'"),
        (["c", "", "c", "c", "c"], ["a.png"] * 5, r"test_caps.txt, line 2: empty line"),
    ],
)
def test_malformed_files_give_clear_errors(tmp_path: Path, captions: list[str], names: list[str], message: str) -> None:
    _write(tmp_path, "test", captions, names)
    with pytest.raises(DatasetError, match=message):
        load_split(tmp_path, "test")


def test_missing_and_undecodable_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="file not found: .*val_caps.txt"):
        load_split(tmp_path, "val")
    _write(tmp_path, "test", ["c"] * 5, ["a.png"] * 5)
    (tmp_path / "test_caps.txt").write_bytes(b"ok\nok\n\xff\xfe\nok\nok\n")
    with pytest.raises(DatasetError, match=r"test_caps.txt, line 3: not valid UTF-8"):
        load_split(tmp_path, "test")


def test_split_checks_caption_count() -> None:
    with pytest.raises(DatasetError, match="7 captions for 2 images"):
        RetrievalSplit(("a", "b"), ("c",) * 7)


def test_kfold_is_deterministic_and_keeps_images_whole() -> None:
    split = _toy_split(50)
    train, val = kfold_splits(split, k=3, fold=1, seed=0)
    again_train, again_val = kfold_splits(split, k=3, fold=1, seed=0)
    assert (train, val) == (again_train, again_val)
    assert val.num_images == 10 and train.num_images == 40
    assert set(train.image_names).isdisjoint(val.image_names)
    assert set(train.image_names) | set(val.image_names) == set(split.image_names)
    for part in (train, val):
        for i, name in enumerate(part.image_names):
            assert all(c.endswith(f"of {name}") for c in part.captions[5 * i:5 * i + 5])
    assert list(train.image_names) == sorted(train.image_names, key=split.image_names.index)
    assert train.name == "train_fold1_train" and val.name == "train_fold1_val"
    other_seed = kfold_splits(split, k=3, fold=1, seed=1)[1]
    assert other_seed.image_names != val.image_names


def test_kfold_validation_sets_do_not_overlap_across_folds() -> None:
    split = _toy_split(50)
    vals = [set(kfold_splits(split, k=3, fold=f, seed=4)[1].image_names) for f in range(3)]
    assert all(vals[a].isdisjoint(vals[b]) for a in range(3) for b in range(a + 1, 3))


def test_kfold_rejects_bad_arguments() -> None:
    split = _toy_split(4)
    with pytest.raises(ValueError, match="fold"):
        kfold_splits(split, k=3, fold=3, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        kfold_splits(split, k=3, fold=0, seed=0, val_fraction=1.0)
    with pytest.raises(ValueError, match="too few"):
        kfold_splits(_toy_split(1), k=1, fold=0, seed=0)


def test_dataset_paths_find_vocabularies(tmp_path: Path) -> None:
    paths = DatasetPaths.find(tmp_path)
    assert paths.images == tmp_path / "images" and paths.detections == tmp_path / "detections"
    with pytest.raises(DatasetError, match="no vocabulary"):
        paths.vocab()
    (tmp_path / "rsitmd_splits_vocab.json").write_text("{}")
    assert paths.vocab() == tmp_path / "rsitmd_splits_vocab.json"
    (tmp_path / "rsicd_splits_vocab.json").write_text("{}")
    with pytest.raises(DatasetError, match="several vocabularies"):
        paths.vocab()
    (tmp_path / "vocab.json").write_text("{}")
    assert paths.vocab() == tmp_path / "vocab.json"
    with pytest.raises(DatasetError, match="vocabulary file not found"):
        DatasetPaths(tmp_path, vocab_file=tmp_path / "nope.json").vocab()
    with pytest.raises(DatasetError, match="dataset folder not found"):
        DatasetPaths.find(tmp_path / "missing")
