"""Tests for galr.runtime.index: editing, exact search against a loop oracle, the .gidx file, building."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
from PIL import Image

from galr.container import ARRAY_ALIGNMENT, ContainerReader, ContainerWriter, table_sha256
from galr.errors import InputError, NotFoundError
from galr.preprocess.image import load_image
from galr.preprocess.spec import PreprocessSpec
from galr.preprocess.text import TextLine, read_text_lines
from galr.runtime.index import (
    SEARCHERS,
    GalleryIndex,
    ImageRecord,
    IndexFormatError,
    IndexModelMismatchError,
    Searcher,
    build_index,
    image_id,
    iter_image_files,
    load_index,
)
from galr.runtime.index.searchers import exact as exact_module

DIM = 8
MODEL = "fake-model-0001"


# ---------------------------------------------------------------------------------------------
# Fake engine and fixtures (also used by test_index_cli.py)


class FakeInfo:
    bundle = "fake.plan"

    def describe(self) -> str:
        return "fake backend on CPU at fp32 (test)"


class FakeEngine:
    """Deterministic unit vectors from the pixels (images) or the text's SHA-256 (captions)."""

    embed_dim = DIM
    spec = PreprocessSpec()

    def __init__(self, model_hash: str = MODEL) -> None:
        self.model_hash = model_hash
        self.info = FakeInfo()
        self.calls: list[tuple[list[Path], Any]] = []
        self.closed = False
        self._projection = np.random.default_rng(7).standard_normal((12, DIM)).astype(np.float32)

    def encode_images(self, images: Sequence[Any], local: Any = None) -> np.ndarray:
        self.calls.append(([Path(p) for p in images], local))
        pixels = [np.asarray(load_image(p).resize((2, 2), Image.Resampling.BILINEAR), np.float32) for p in images]
        return _unit(np.stack([p.ravel() / 255.0 - 0.5 for p in pixels]) @ self._projection)

    def encode_text(self, captions: Sequence[str]) -> np.ndarray:
        rows = [np.random.default_rng(int(hashlib.sha256(c.encode()).hexdigest()[:8], 16)).standard_normal(DIM)
                for c in captions]
        return _unit(np.stack(rows))

    def close(self) -> None:
        self.closed = True


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_image(path: Path, seed: int, size: tuple[int, int] = (24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_broken_images(folder: Path) -> tuple[Path, Path]:
    """A file Pillow cannot identify, and a PNG whose header reads but whose pixel data is cut off."""
    unreadable = folder / "broken.png"
    unreadable.write_bytes(b"this is not an image")
    truncated = folder / "cut.png"
    full = io.BytesIO()
    Image.fromarray(np.random.default_rng(99).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full, "PNG")
    truncated.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    return unreadable, truncated


def random_unit(rows: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    return _unit(np.random.default_rng(seed).standard_normal((rows, dim)))


def records_for(names: Sequence[str]) -> list[ImageRecord]:
    return [ImageRecord(name, f"/data/{name}", 32, 32) for name in names]


def make_index(rows: int, storage: str = "fp32", seed: int = 0) -> GalleryIndex:
    index = GalleryIndex(MODEL, DIM, storage, built_with="fake.plan")
    index.add(records_for([f"img{i:03d}.png" for i in range(rows)]), random_unit(rows, seed))
    return index


def brute_force(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """The top-k by looping over queries and items: score descending, then gallery position."""
    gallery = gallery.astype(np.float32)
    indices, scores = [], []
    for query in queries.astype(np.float32):
        row = [float(np.dot(item, query)) for item in gallery]
        order = sorted(range(len(gallery)), key=lambda i: (-row[i], i))[:k]
        indices.append(order)
        scores.append([row[i] for i in order])
    return indices, scores


# ---------------------------------------------------------------------------------------------
# Records


def test_record_round_trips_through_json_with_geo_fields():
    record = ImageRecord("a/b.png", "/x/a/b.png", 640, 480, lat=-33.9, lon=151.2,
                         footprint=[[151.0, -34.0], [151.4, -34.0], [151.4, -33.8]], extra={"sensor": "GF-2", "gsd": 0.8})
    again = ImageRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record
    assert again.footprint == ((151.0, -34.0), (151.4, -34.0), (151.4, -33.8))
    assert hash(again) == hash(record)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lat": 91.0}, "lat"),
        ({"lon": float("nan")}, "lon"),
        ({"footprint": [(1.0, 2.0, 3.0)]}, "footprint"),
        ({"extra": {"bad": float("nan")}}, "JSON"),
        ({"width": -1}, "width"),
        ({"id": ""}, "id"),
    ],
)
def test_record_refuses_invalid_fields(fields, message):
    values = {"id": "a.png", "path": "/a.png", "width": 1, "height": 1, **fields}
    with pytest.raises(ValueError, match=message):
        ImageRecord(**values)


def test_record_from_dict_refuses_unknown_keys():
    with pytest.raises(ValueError, match="newer galr"):
        ImageRecord.from_dict({"id": "a", "path": "a", "width": 1, "height": 1, "colour": "red"})


# ---------------------------------------------------------------------------------------------
# Editing


def test_add_get_and_ids():
    index = make_index(3)
    assert len(index) == 3 and index.ids == ["img000.png", "img001.png", "img002.png"]
    assert index.get("img001.png").path == "/data/img001.png"
    assert "img002.png" in index and "nope" not in index
    with pytest.raises(KeyError, match="nope"):
        index.get("nope")


def test_add_refuses_existing_ids_unless_replace():
    index = make_index(3)
    new = random_unit(2, seed=5)
    with pytest.raises(ValueError, match="img001.png"):
        index.add(records_for(["img001.png", "fresh.png"]), new)
    assert len(index) == 3  # nothing half-added
    index.add(records_for(["img001.png", "fresh.png"]), new, replace=True)
    assert index.ids == ["img000.png", "img001.png", "img002.png", "fresh.png"]
    vectors = index.image_vectors()
    np.testing.assert_array_equal(vectors[1], new[0])
    np.testing.assert_array_equal(vectors[3], new[1])
    assert [index.key_of(i) for i in index.ids] == [0, 1, 2, 3]  # the replaced image kept its key


def test_add_refuses_ids_repeated_in_one_call():
    index = make_index(0)
    with pytest.raises(ValueError, match="more than once"):
        index.add(records_for(["a", "a"]), random_unit(2))


def test_update_replaces_in_place_and_refuses_unknown_ids():
    index = make_index(3)
    replacement = random_unit(1, seed=9)
    index.update([ImageRecord("img002.png", "/new/path.png", 8, 8)], replacement)
    assert index.get("img002.png").path == "/new/path.png" and index.key_of("img002.png") == 2
    np.testing.assert_array_equal(index.image_vectors()[2], replacement[0])
    with pytest.raises(KeyError, match="ghost.png"):
        index.update(records_for(["ghost.png"]), random_unit(1))


def test_remove_keeps_keys_and_order_and_names_unknown_ids():
    index = make_index(5)
    before = index.image_vectors()
    with pytest.raises(KeyError, match="ghost"):
        index.remove(["img001.png", "ghost"])
    assert len(index) == 5  # all-or-nothing
    index.remove(["img001.png", "img003.png"])
    assert index.ids == ["img000.png", "img002.png", "img004.png"]
    np.testing.assert_array_equal(index.image_vectors(), before[[0, 2, 4]])
    assert [index.key_of(i) for i in index.ids] == [0, 2, 4]  # keys are stable
    index.add(records_for(["img001.png"]), before[1:2])  # a removed id can come back, under a new key
    assert index.ids[-1] == "img001.png" and index.key_of("img001.png") == 5
    assert index.record(5).id == "img001.png"


@pytest.mark.parametrize(
    ("embeddings", "error", "message"),
    [
        (np.ones((2, DIM), np.int64), TypeError, "floating"),
        (np.ones((2, DIM + 1), np.float32), ValueError, "shape"),
        (np.ones((3, DIM), np.float32), ValueError, "shape"),
        (np.full((2, DIM), np.nan, np.float32), ValueError, "NaN"),
        (np.ones((2, DIM), np.float32), ValueError, "unit-norm"),
    ],
)
def test_add_validates_embeddings(embeddings, error, message):
    with pytest.raises(error, match=message):
        make_index(0).add(records_for(["a", "b"]), embeddings)


def test_stored_vectors_are_read_only():
    index = make_index(2)
    with pytest.raises(ValueError):
        index.images.vectors[0, 0] = 1.0


def test_text_bank_add_and_replace():
    index = make_index(2)
    index.add_text_bank(["a ship", "a road"], random_unit(2, seed=1))
    index.add_text_bank(["a farm"], random_unit(1, seed=2))
    assert index.text_bank_texts == ["a ship", "a road", "a farm"]
    bank = index.text_bank_vectors()
    assert bank.shape == (3, DIM) and bank.dtype == np.float32 and index.bank_text(2) == "a farm"
    index.add_text_bank(["only"], random_unit(1, seed=3), replace=True)
    assert index.text_bank_texts == ["only"]
    with pytest.raises(ValueError, match="non-empty"):
        index.add_text_bank(["  "], random_unit(1))


# ---------------------------------------------------------------------------------------------
# Search


@pytest.mark.parametrize("k", [1, 5, 57, 100])
@pytest.mark.parametrize("block_rows", [None, 1, 4, 16])
def test_search_equals_brute_force(k, block_rows):
    index = make_index(57, seed=1)
    queries = random_unit(6, seed=2)
    result = index.search(queries, k, device="cpu", block_rows=block_rows)
    expected_indices, expected_scores = brute_force(index.image_vectors(), queries, k)
    assert result.keys.dtype == np.int64 and result.scores.dtype == np.float32
    assert result.keys.tolist() == expected_indices  # keys are positions in a fresh index
    np.testing.assert_allclose(result.scores, expected_scores, atol=1e-6)
    assert result.ids == [[index.ids[i] for i in row] for row in expected_indices]


@pytest.mark.parametrize("block_rows", [None, 1, 3, 7])
def test_search_breaks_ties_by_gallery_position(block_rows):
    # Basis vectors and halves give exact float products, so equal scores really are equal.
    basis = np.eye(DIM, dtype=np.float32)
    gallery = basis[np.random.default_rng(3).integers(0, 4, 40)]
    index = GalleryIndex(MODEL, DIM)
    index.add(records_for([f"t{i}" for i in range(40)]), gallery)
    queries = np.zeros((3, DIM), np.float32)
    queries[0, :4] = 0.5
    queries[1, 0] = 1.0
    queries[2, [1, 2]] = [0.6, 0.8]
    for k in (1, 9, 25, 40):
        result = index.search(queries, k, device="cpu", block_rows=block_rows)
        expected, _ = brute_force(gallery, queries, k)
        assert result.keys.tolist() == expected


def test_search_of_fp16_gallery_scores_the_stored_values():
    index = make_index(30, storage="fp16", seed=4)
    assert index.images.vectors.dtype == np.float16
    queries = random_unit(4, seed=5)
    result = index.search(queries, 10, device="cpu", block_rows=8)
    expected, scores = brute_force(index.images.vectors, queries, 10)
    assert result.keys.tolist() == expected
    np.testing.assert_allclose(result.scores, scores, atol=1e-6)


def test_search_of_empty_index_and_bad_arguments():
    index = make_index(0)
    result = index.search(random_unit(2), 5, device="cpu")
    assert result.scores.shape == (2, 0) and result.ids == [[], []]
    with pytest.raises(ValueError, match="k must be"):
        make_index(3).search(random_unit(1), 0)
    with pytest.raises(ValueError, match="shape"):
        make_index(3).search(random_unit(1)[0], 1)
    with pytest.raises(ValueError, match="device"):
        make_index(3).search(random_unit(1), 1, device="tpu")


def test_similarity_matrix_is_the_full_product():
    index = make_index(23, storage="fp16", seed=6)
    queries = random_unit(5, seed=7)
    expected = queries @ index.image_vectors().T
    for block_rows in (None, 4):
        matrix = index.similarity_matrix(queries, device="cpu", block_rows=block_rows)
        assert matrix.dtype == np.float32 and matrix.shape == (5, 23)
        np.testing.assert_allclose(matrix, expected, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed; this checks its absence")
def test_cuda_search_without_cupy_says_what_is_missing():
    from galr.runtime.backends.base import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="CuPy"):
        make_index(3).search(random_unit(1), 1, device="cuda")
    assert make_index(3).search(random_unit(1), 2, device="auto").keys.shape == (1, 2)


def test_device_copy_of_the_gallery_follows_edits(monkeypatch):
    """The device path (a stand-in module for CuPy) keeps one gallery copy and refreshes it after edits."""

    class FakeDeviceArray(np.ndarray):
        def get(self) -> np.ndarray:
            return np.asarray(self)

    class FakeDevice:
        copies = 0

        def __getattr__(self, name):
            return getattr(np, name)

        def asarray(self, values):
            FakeDevice.copies += 1
            return np.array(values).view(FakeDeviceArray)

    monkeypatch.setattr(exact_module, "array_module", lambda device: np if device == "cpu" else FakeDevice())
    index = make_index(20, seed=16)
    queries = random_unit(3, seed=17)
    first = index.search(queries, 4, device="cuda", block_rows=6)
    index.search(queries, 4, device="cuda")
    assert FakeDevice.copies == 3  # the gallery once, the queries of each search
    assert first.ids == index.search(queries, 4, device="cpu").ids
    index.add(records_for(["query-twin"]), queries[:1])
    again = index.search(queries, 4, device="cuda", block_rows=6)
    assert FakeDevice.copies == 5  # the edit made the gallery copy stale
    assert again.ids[0][0] == "query-twin" and again.ids == index.search(queries, 4, device="cpu").ids


@pytest.mark.gpu
def test_cuda_search_equals_cpu_search():
    index = make_index(300, storage="fp16", seed=8)
    first = index.images.vectors[:1].astype(np.float32)
    index.add(records_for(["dup-a", "dup-b"]), np.repeat(first, 2, axis=0))
    queries = np.concatenate([random_unit(7, seed=9), first])
    for block_rows in (None, 17):
        gpu = index.search(queries, 12, device="cuda", block_rows=block_rows)
        cpu = index.search(queries, 12, device="cpu", block_rows=block_rows)
        np.testing.assert_allclose(gpu.scores, cpu.scores, atol=1e-5)
        assert gpu.ids[:-1] == cpu.ids[:-1]
        assert gpu.keys[-1, :3].tolist() == [0, 300, 301]  # three equal best scores, by gallery order
    np.testing.assert_allclose(index.similarity_matrix(queries, device="cuda"),
                               index.similarity_matrix(queries, device="cpu"), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The file


def _saved(tmp_path: Path, storage: str = "fp32") -> tuple[GalleryIndex, Path]:
    index = make_index(12, storage=storage, seed=10)
    index.add([ImageRecord("geo.tif", "/g.tif", 100, 50, lat=1.5, lon=2.5, footprint=[(2, 1), (3, 1), (3, 2)],
                           extra={"tags": ["port"]})], random_unit(1, seed=11))
    index.add_text_bank(["two ships", "a bridge over a river"], random_unit(2, seed=12))
    return index, index.save(tmp_path / "gallery.gidx")


@pytest.mark.parametrize("storage", ["fp32", "fp16"])
def test_save_and_load_round_trip(tmp_path, storage):
    index, path = _saved(tmp_path, storage)
    loaded = load_index(path, expected_model_hash=MODEL)
    assert loaded.storage == storage and loaded.images.vectors.dtype == index.images.vectors.dtype
    np.testing.assert_array_equal(loaded.images.vectors, index.images.vectors)
    np.testing.assert_array_equal(loaded.images.keys, index.images.keys)
    assert loaded.records == index.records and loaded.ids == index.ids and loaded.next_key == index.next_key
    assert loaded.text_bank_texts == index.text_bank_texts
    np.testing.assert_array_equal(loaded.text_bank_vectors(), index.text_bank_vectors())
    assert (loaded.model_hash, loaded.embed_dim, loaded.built_with) == (MODEL, DIM, "fake.plan")
    assert (loaded.created, loaded.updated, loaded.galr_version) == (index.created, index.updated, index.galr_version)
    queries = random_unit(3, seed=13)
    assert loaded.search(queries, 5, device="cpu").ids == index.search(queries, 5, device="cpu").ids
    loaded.add(records_for(["after-load.png"]), random_unit(1, seed=14))  # a loaded index stays editable
    assert len(loaded) == len(index) + 1


def test_saved_members_are_listed_with_hashes(tmp_path):
    _, path = _saved(tmp_path)
    with zipfile.ZipFile(path) as archive:
        header = json.loads(archive.read("header.json"))
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
        for name, entry in header["members"].items():
            assert hashlib.sha256(archive.read(name)).hexdigest() == entry["sha256"]
    assert (header["format"], header["format_version"], header["count"], header["text_bank_count"]) == \
        ("galr-index", 2, 13, 2)
    assert header["searchers"]["images"] == {"kind": "exact", "storage": "fp32", "count": 13, "params": {}}
    assert {"images/keys.npy", "images/vectors.npy", "text_bank/vectors.npy"} <= set(header["members"])


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_the_previous_index(tmp_path, monkeypatch, failure):
    index, path = _saved(tmp_path)
    before = path.read_bytes()
    index.add(records_for(["new.png"]), random_unit(1, seed=15))
    original = ContainerWriter.write_json

    def fail_midway(writer, name, payload, **kwargs):
        if name == "records.json":  # after the embeddings were written
            raise failure
        return original(writer, name, payload, **kwargs)

    monkeypatch.setattr(ContainerWriter, "write_json", fail_midway)
    with pytest.raises(type(failure)):
        index.save(path)
    assert path.read_bytes() == before
    assert len(load_index(path)) == 13
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery.gidx"]


def _rewrite(path: Path, replace: dict[str, bytes | None], header_changes: dict[str, Any] | None = None,
             rehash: bool = True) -> None:
    """Copy the index with members replaced (None drops one) and header fields changed; ``rehash``
    updates the header's own hash, as a writer that made a wrong header on purpose would."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    header = json.loads(members["header.json"])
    header.update(header_changes or {})
    if rehash:
        header["header_sha256"] = table_sha256(header, "header_sha256")
    members["header.json"] = json.dumps(header).encode()
    members.update(replace)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            if data is not None:
                archive.writestr(name, data)


def _object_npy() -> bytes:
    stream = io.BytesIO()
    np.save(stream, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    return stream.getvalue()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "not a readable zip"),
        (lambda p: p.write_bytes(b"plain text"), "not a readable zip"),
        (lambda p: _rewrite(p, {}, {"format_version": 99}), "version 99 is not supported"),
        (lambda p: _rewrite(p, {}, {"format": "something-else"}), "not a galr index"),
        (lambda p: _rewrite(p, {"header.json": None}), "no header.json"),
        (lambda p: _rewrite(p, {}, {"count": "many"}), "count must be a non-negative integer"),
        (lambda p: _rewrite(p, {}, {"count": 14}, rehash=False), "header.json fails its own SHA-256 check"),
        (lambda p: _rewrite(p, {}, {"count": 3}), "no valid 'images' searcher entry"),
        (lambda p: _rewrite(p, {"text_bank.json": None}), r"member 'text_bank.json' is missing"),
        (lambda p: _rewrite(p, {"records.json": b"[]"}), r"member 'records.json' is 2 bytes, the table says"),
        (lambda p: _rewrite(p, {"images/vectors.npy": _object_npy()}), "member 'images/vectors.npy' is"),
    ],
)
def test_damaged_files_are_refused_with_the_path(tmp_path, damage, message):
    _, path = _saved(tmp_path)
    damage(path)
    with pytest.raises(IndexFormatError, match=message) as caught:
        load_index(path)
    assert str(path) in str(caught.value)


def test_flipped_byte_in_the_embeddings_is_detected(tmp_path):
    index, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    needle = index.images.vectors[5].tobytes()
    offset = bytes(data).index(needle)
    data[offset + 3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="damaged"):
        load_index(path)


def test_missing_file_and_model_mismatch(tmp_path):
    with pytest.raises(NotFoundError, match="galr-index"):
        load_index(tmp_path / "absent.gidx")
    _, path = _saved(tmp_path)
    with pytest.raises(IndexModelMismatchError, match=r"fake\.plan.*galr-index IMAGES --engine <bundle> -o"):
        load_index(path, expected_model_hash="another-model")


# ---------------------------------------------------------------------------------------------
# Building from files


def test_iter_image_files_is_recursive_case_insensitive_and_sorted(tmp_path):
    for name in ["b.PNG", "a.jpg", "sub/c.TIF", "sub/deeper/d.jpeg", "e.bmp", "notes.txt", "f.tiff"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_image_files(tmp_path)]
    assert found == ["a.jpg", "b.PNG", "e.bmp", "f.tiff", "sub/c.TIF", "sub/deeper/d.jpeg"]
    with pytest.raises(InputError, match="not a folder"):
        iter_image_files(tmp_path / "a.jpg")


def test_read_text_lines_skips_blanks_and_comments(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("\ufeff# header\nships in a harbour\n\n   \n  # indented comment\n a dense forest \n", encoding="utf-8")
    assert read_text_lines(path) == [TextLine(2, "ships in a harbour"), TextLine(6, "a dense forest")]


def test_image_id_is_relative_to_the_root(tmp_path):
    assert image_id(tmp_path / "a" / "b.png", tmp_path) == "a/b.png"
    assert image_id("x/y.png", None) == "x/y.png"
    with pytest.raises(ValueError, match="not inside"):
        image_id("/elsewhere/y.png", tmp_path)


def test_build_index_skips_broken_images_and_keeps_their_batch(tmp_path):
    good = [write_image(tmp_path / "a.png", 1), write_image(tmp_path / "sub" / "b.png", 2, (10, 30)),
            write_image(tmp_path / "c.jpg", 3), write_image(tmp_path / "d.png", 4)]
    unreadable, truncated = write_broken_images(tmp_path)
    paths = [good[0], unreadable, good[1], truncated, good[2], good[3]]
    engine = FakeEngine()
    index, skipped = build_index(engine, paths, batch_size=3, storage="fp16", progress=False, root=tmp_path)
    assert index.ids == ["a.png", "sub/b.png", "c.jpg", "d.png"]
    # The unreadable file is caught before encoding; the truncated one fails its batch, retried one by one.
    assert [len(batch) for batch, _ in engine.calls] == [2, 3, 1, 1, 1]
    assert [s.path for s in skipped] == [str(unreadable), str(truncated)]
    assert all(str(s.path) in s.reason for s in skipped)
    assert (index.get("sub/b.png").width, index.get("sub/b.png").height) == (10, 30)
    assert index.get("a.png").path == str(good[0].resolve())
    assert index.model_hash == MODEL and index.storage == "fp16" and index.built_with == "fake.plan"
    expected = np.concatenate([engine.encode_images([p]) for p in good]).astype(np.float16)
    np.testing.assert_array_equal(index.images.vectors, expected)


def test_build_index_passes_local_through_and_skips_images_missing_from_a_table(tmp_path):
    class Table:
        source = "table.npz"

        def lookup(self, name):
            raise AssertionError("the fake engine does not read the table")

        def __contains__(self, name):
            return Path(name).stem != "b"

    paths = [write_image(tmp_path / f"{name}.png", seed) for seed, name in enumerate("abc")]
    engine, table = FakeEngine(), Table()
    index, skipped = build_index(engine, paths, local=table, batch_size=8, progress=False)
    assert index.ids == [paths[0].as_posix(), paths[2].as_posix()]
    assert len(skipped) == 1 and "table.npz" in skipped[0].reason
    assert [local for _, local in engine.calls] == [table]
    detections = tmp_path / "dets"
    detections.mkdir()
    build_index(engine, paths, local=detections, progress=False)
    assert engine.calls[-1][1] == detections
    with pytest.raises(NotFoundError, match="detections folder"):
        build_index(engine, paths, local=tmp_path / "missing", progress=False)


def test_build_index_refuses_repeated_ids(tmp_path):
    path = write_image(tmp_path / "a.png", 1)
    with pytest.raises(ValueError, match="occur twice"):
        build_index(FakeEngine(), [path, path], progress=False)


# ---------------------------------------------------------------------------------------------
# The search seam


def test_both_sides_of_an_index_are_searchers():
    index = make_index(4)
    index.add_text_bank(["a ship"], random_unit(1, seed=3))
    assert isinstance(index.images, Searcher) and isinstance(index.text_bank, Searcher)
    assert index.images.kind in SEARCHERS and index.text_bank.kind in SEARCHERS


def test_an_unknown_searcher_kind_is_refused_with_the_known_ones(tmp_path):
    with pytest.raises(InputError, match="unknown searcher 'annoy'.*exact"):
        GalleryIndex(MODEL, DIM, searcher="annoy")
    _, path = _saved(tmp_path)
    header = json.loads(zipfile.ZipFile(path).read("header.json"))
    header["searchers"]["images"]["kind"] = "annoy"
    _rewrite(path, {}, {"searchers": header["searchers"]})
    with pytest.raises(InputError, match="unknown searcher 'annoy'"):
        load_index(path)


def test_a_version_1_index_still_opens(tmp_path):
    """The pre-searcher layout: one embeddings.npy and text_bank.npy, keys implied by position."""
    index, _ = _saved(tmp_path)
    path = tmp_path / "v1.gidx"

    def npy(array: np.ndarray) -> bytes:
        stream = io.BytesIO()
        np.save(stream, array, allow_pickle=False)
        return stream.getvalue()

    members = {"embeddings.npy": npy(index.images.vectors), "text_bank.npy": npy(index.text_bank.vectors),
               "records.json": json.dumps([r.to_dict() for r in index.records]).encode(),
               "text_bank.json": json.dumps(index.text_bank_texts).encode()}
    header = {"format": "galr-index", "format_version": 1, "model_hash": MODEL, "embed_dim": DIM, "storage": "fp32",
              "count": len(index), "text_bank_count": 2,
              "members": {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                          for name, data in members.items()}}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr("header.json", json.dumps(header))
    old = load_index(path, expected_model_hash=MODEL)
    assert old.ids == index.ids and old.text_bank_texts == index.text_bank_texts
    np.testing.assert_array_equal(old.image_vectors(), index.image_vectors())
    queries = random_unit(2, seed=21)
    assert old.search(queries, 4, device="cpu").ids == index.search(queries, 4, device="cpu").ids
    old.save(path)  # saving writes the current version
    assert json.loads(zipfile.ZipFile(path).read("header.json"))["format_version"] == 2


@pytest.mark.parametrize("storage", ["fp32", "fp16"])
def test_a_mapped_index_shares_the_file_pages_searches_alike_and_copies_before_editing(tmp_path, storage):
    index, path = _saved(tmp_path, storage)
    before = path.read_bytes()
    mapped = load_index(path, expected_model_hash=MODEL, mapped=True)
    assert isinstance(mapped.images.vectors.base, np.memmap) or isinstance(mapped.images.vectors, np.memmap)
    assert mapped.images.vectors.flags.aligned
    np.testing.assert_array_equal(mapped.images.vectors, index.images.vectors)
    queries = random_unit(3, seed=13)
    assert mapped.search(queries, 5, device="cpu").ids == index.search(queries, 5, device="cpu").ids
    first = mapped.ids[0]
    mapped.update(records_for([first]), random_unit(1, seed=21))
    mapped.remove(mapped.ids[1])
    mapped.add(records_for(["after-map.png"]), random_unit(1, seed=22))
    assert len(mapped) == len(index) and path.read_bytes() == before  # the file itself is never written


@pytest.mark.parametrize("name", ["v.npy", "images/vectors.npy", "x" * 61 + ".npy"])
def test_array_members_start_on_the_alignment_boundary_so_memory_maps_are_aligned(tmp_path, name):
    # numpy multiplies a misaligned float32 map without BLAS: the exact scan of a mapped index was x5 slower
    path = tmp_path / "aligned.zip"
    arrays = {name: np.arange(12, dtype=np.float32).reshape(3, 4), "b/" + name: np.ones((2, 5), np.float16)}
    with ContainerWriter(path) as writer:
        writer.write_bytes("odd.txt", b"x" * 7)  # members before an array leave the file at any offset
        for member, array in arrays.items():
            writer.write_array(member, array)
            writer.write_bytes(member + ".txt", b"y" * len(member))
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None  # the padded local headers are still plain zip for other readers
    with ContainerReader(path, error=InputError, fix="", map_arrays=True) as reader:
        for member, array in arrays.items():
            mapped = reader.read_array(member, writer.entries[member], array.dtype, array.shape)
            assert isinstance(mapped, np.memmap) and mapped.flags.aligned
            assert mapped.ctypes.data % ARRAY_ALIGNMENT == 0
            np.testing.assert_array_equal(mapped, array)


def test_an_older_misaligned_mapped_index_is_scanned_from_aligned_copies_of_its_blocks(tmp_path):
    rows = random_unit(10, seed=3)
    raw = tmp_path / "rows.bin"
    raw.write_bytes(b"\0" + rows.tobytes())
    misaligned = np.memmap(raw, dtype=np.float32, mode="r", offset=1, shape=rows.shape)
    assert not misaligned.flags.aligned
    block = exact_module.aligned_rows(misaligned[2:7])
    assert block.flags.aligned and block.dtype == np.float32
    np.testing.assert_array_equal(block, rows[2:7])
    assert exact_module.aligned_rows(rows) is rows  # aligned rows are used as they are


def test_a_mapped_index_still_checks_every_member(tmp_path):
    _, path = _saved(tmp_path, "fp32")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("vectors.npy"))
    data[info.header_offset + 200] ^= 0xFF  # inside the vectors member's array bytes
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="vectors.npy"):  # zip's CRC or our SHA-256, whichever reads it first
        load_index(path, mapped=True)


def test_approximate_search_settings_on_an_exact_index_are_refused_clearly():
    with pytest.raises(InputError, match=r"searched exactly: \['nprobe'\] apply to ivf"):
        make_index(5).search(random_unit(1), 2, nprobe=3)
