"""Tests for the ``galr-index`` command (galr.runtime.cli.index) with fake encoders."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from galr.errors import NotFoundError
from galr.preprocess.local_file import LocalFeatureTable, save_local_file
from galr.runtime.cli import index as index_cli
from galr.runtime.index import load_index
from tests.test_index import FakeEngine, write_broken_images, write_image


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A folder of images, a placeholder bundle file and ``load_engine`` returning fake engines."""
    monkeypatch.chdir(tmp_path)
    images = tmp_path / "scenes"
    for seed, name in enumerate(["port/a.png", "port/b.jpg", "c.png", "d.tif"]):
        write_image(images / name, seed)
    Path("galr.plan").write_bytes(b"placeholder: load_engine is replaced")
    opened: list[FakeEngine] = []

    def fake_load_engine(bundle, backend="auto", device="auto", precision="auto"):
        if not Path(bundle).is_file():  # what read_bundle says
            raise NotFoundError(f"bundle not found: {bundle}; create one with `galr-export`")
        opened.append(FakeEngine(model_hash=getattr(fake_load_engine, "model_hash", "fake-model-0001")))
        return opened[-1]

    monkeypatch.setattr(index_cli, "load_engine", fake_load_engine)
    return tmp_path, images, fake_load_engine, opened


def invoke(*args: str):
    result = CliRunner().invoke(index_cli.main, ["--no-progress", *args])
    # Every outcome is a clean exit: never an unhandled exception with a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def test_build_with_text_bank_and_a_broken_image(workspace):
    root, images, _, opened = workspace
    write_broken_images(images)
    (root / "captions.txt").write_text("# captions\nships in a harbour\n\na bridge\n", encoding="utf-8")
    result = invoke(str(images), "--text-bank", "captions.txt", "--storage", "fp16", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert "engine: fake backend on CPU" in result.output
    assert "indexed 4 images" in result.output and "skipped 2" in result.output
    assert "broken.png" in result.output and "no-detection fallback" in result.output
    assert "wrote gallery.gidx" in result.output
    index = load_index(root / "gallery.gidx", expected_model_hash="fake-model-0001")
    assert index.ids == ["c.png", "d.tif", "port/a.png", "port/b.jpg"]
    assert index.storage == "fp16" and index.text_bank_texts == ["ships in a harbour", "a bridge"]
    assert opened[0].closed and all(local is None for _, local in opened[0].calls)


def test_update_adds_and_replaces_and_keeps_ids_relative_to_the_first_root(workspace):
    root, images, _, _ = workspace
    assert invoke(str(images)).exit_code == 0
    write_image(images / "new" / "e.png", 10)
    write_image(images / "c.png", 11)  # changed pixels, same id
    result = invoke(str(images / "new" / "e.png"), str(images / "c.png"), "--update")
    assert result.exit_code == 0, result.output
    assert "indexed 2 images (1 new, 1 replaced)" in result.output
    index = load_index(root / "gallery.gidx")
    assert index.ids == ["c.png", "d.tif", "port/a.png", "port/b.jpg", "new/e.png"]
    np.testing.assert_allclose(index.image_vectors()[0], FakeEngine().encode_images([images / "c.png"])[0], atol=1e-7)


def test_update_refuses_an_index_of_another_model(workspace):
    root, images, fake_load_engine, _ = workspace
    assert invoke(str(images)).exit_code == 0
    before = (root / "gallery.gidx").read_bytes()
    fake_load_engine.model_hash = "another-model"
    result = invoke(str(images), "--update")
    assert result.exit_code == 2
    assert "was built with model fake-model-0001" in result.output and "galr-index IMAGES --engine" in result.output
    assert "Traceback" not in result.output
    assert (root / "gallery.gidx").read_bytes() == before


def test_remove_takes_several_ids_without_loading_an_engine(workspace):
    root, images, _, opened = workspace
    assert invoke(str(images)).exit_code == 0
    result = invoke("--remove", "c.png", "port/a.png")
    assert result.exit_code == 0, result.output
    assert load_index(root / "gallery.gidx").ids == ["d.tif", "port/b.jpg"]
    assert len(opened) == 1  # only the build opened one
    result = invoke("--remove", "ghost.png")
    assert result.exit_code == 2 and "ghost.png" in result.output


def test_local_file_is_loaded_and_passed_to_the_engine(workspace):
    root, images, _, opened = workspace
    keys = ("a.txt", "c.txt", "d.txt")  # b.jpg has no entry
    table = LocalFeatureTable(keys, np.zeros((3, 20, 20), np.float32), np.zeros((3, 20, 20), np.float32))
    save_local_file(root / "local.npz", table)
    result = invoke(str(images), "--local", "local.npz")
    assert result.exit_code == 0, result.output
    assert "indexed 3 images" in result.output and "b.jpg" in result.output
    assert all(isinstance(local, LocalFeatureTable) for _, local in opened[0].calls)


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ["--engine", "missing.plan", "scenes"], "bundle not found: missing.plan"),
        (None, [], "give IMAGES"),
        (None, ["scenes", "--update"], "no index at gallery.gidx"),
        (None, ["scenes", "--detections", "scenes", "--local", "x.npz"], "give one of --detections, --local or --detector"),
        (None, ["nowhere/"], "no such image file or folder"),
        (lambda r: (r / "bad.npz").write_bytes(b"garbage"), ["scenes", "--local", "bad.npz"], "bad.npz"),
        (lambda r: (r / "empty.txt").write_text("# nothing\n\n"), ["scenes", "--text-bank", "empty.txt"], "has no captions"),
        (lambda r: (r / "gallery.gidx").write_bytes(b"junk"), ["scenes", "--update"], "not a readable zip"),
    ],
)
def test_bad_usage_and_bad_inputs_exit_2(workspace, setup, args, message):
    root, _, _, _ = workspace
    if setup is not None:
        setup(root)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_update_refuses_another_storage(workspace):
    _, images, _, _ = workspace
    assert invoke(str(images), "--storage", "fp16").exit_code == 0
    result = invoke(str(images), "--update", "--storage", "fp32")
    assert result.exit_code == 2 and "stores fp16" in result.output


def test_nothing_indexed_exits_1_and_writes_nothing(workspace):
    root, _, _, _ = workspace
    broken = root / "broken_only"
    broken.mkdir()
    write_broken_images(broken)
    result = invoke(str(broken))
    assert result.exit_code == 1 and "none of the 2 images" in result.output
    empty = root / "empty"
    empty.mkdir()
    result = invoke(str(empty))
    assert result.exit_code == 1 and "no images" in result.output
    assert not (root / "gallery.gidx").exists()


def test_detections_folder_and_no_detection_warnings_are_summarised(workspace, monkeypatch):
    from galr.preprocess.drea import NoDetectionsWarning

    root, images, _, opened = workspace
    (root / "dets").mkdir()
    encode = FakeEngine.encode_images

    def encode_with_warnings(self, paths, local=None):
        for path in paths:
            warnings.warn(f"{path}: no usable detections", NoDetectionsWarning)
        return encode(self, paths, local)

    monkeypatch.setattr(FakeEngine, "encode_images", encode_with_warnings)
    result = invoke(str(images), "--detections", "dets")
    assert result.exit_code == 0, result.output
    assert "note: 4 images had no usable detections" in result.output
    assert "NoDetectionsWarning" not in result.output
    assert all(local == Path("dets") for _, local in opened[0].calls)


def test_engine_failure_is_reported_without_traceback(workspace, monkeypatch):
    from galr.runtime.backends.base import RunnerError

    _, images, _, _ = workspace

    def broken(self, paths, local=None):
        raise RunnerError("input 'image' axis 2 must be 64, got shape [1, 3, 256, 256]")

    monkeypatch.setattr(FakeEngine, "encode_images", broken)
    result = invoke(str(images))
    assert result.exit_code == 2 and "axis 2 must be 64" in result.output
    assert "Traceback" not in result.output


def test_search_kind_is_chosen_kept_and_changed(workspace):
    pytest.importorskip("faiss", reason="approximate search needs faiss-cpu (pip install 'galr[faiss]')")
    root, images, _, _ = workspace
    result = invoke(str(images), "--search", "hnsw", "--search-setting", "M=8")
    assert result.exit_code == 0, result.output
    assert "hnsw search" in result.output
    index = load_index(root / "gallery.gidx")
    assert index.images.kind == "hnsw" and index.images.settings.M == 8
    write_image(images / "e.png", 9)
    assert invoke(str(images), "--update").exit_code == 0  # an existing index keeps its searcher
    assert load_index(root / "gallery.gidx").images.kind == "hnsw"
    result = invoke("--update", "--search", "ivf", "--search-setting", "nlist=2", "--remove", "c.png")
    assert result.exit_code == 0, result.output
    assert "search: ivf (moved 4 images)" in result.output
    index = load_index(root / "gallery.gidx")
    assert index.images.kind == "ivf" and len(index) == 4 and "c.png" not in index


@pytest.mark.parametrize("args, message", [
    (["--search", "ivf", "--search-setting", "nlist"], "is not NAME=INTEGER"),
    (["--search", "ivf", "--search-setting", "colour=3"], "unknown ivf searcher settings"),
    (["--search", "exact", "--search-setting", "nlist=3"], "takes no settings"),
])
def test_bad_search_settings_exit_2_before_encoding(workspace, args, message):
    pytest.importorskip("faiss", reason="approximate search needs faiss-cpu (pip install 'galr[faiss]')")
    root, images, _, opened = workspace
    result = invoke(str(images), *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (root / "gallery.gidx").exists()
    assert all(not engine.calls for engine in opened)
