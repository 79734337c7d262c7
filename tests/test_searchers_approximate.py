"""Tests for the FAISS searchers (ivf, ivfpq, hnsw): measured against exact search, edits, the .gidx member."""

from __future__ import annotations

import builtins
import zipfile

import numpy as np
import pytest

from galr.container import ContainerReader, ContainerWriter
from galr.errors import InputError, UnavailableError
from galr.runtime.index import GalleryIndex, ImageRecord, UnknownIdError, create_searcher, load_index
from galr.runtime.index.searchers import resolve_searcher_kind
from galr.runtime.index.searchers.approximate import HnswSearcher, IvfSearcher
from galr.runtime.index.searchers.exact import ExactSearcher
from galr.runtime.index.store import IndexFormatError

faiss = pytest.importorskip("faiss", reason="approximate search needs faiss-cpu (pip install 'galr[faiss]')")

DIM = 32
KINDS = ("ivf", "ivfpq", "hnsw")


def clustered(rows: int, seed: int = 0, clusters: int = 40, spread: float = 0.6) -> np.ndarray:
    """Unit vectors around a few centres: neighbours are close but not trivially separated."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM))
    points = centres[rng.integers(0, clusters, rows)] + spread * rng.standard_normal((rows, DIM))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def filled(kind: str, rows: int = 3000, storage: str = "fp32", **settings):
    vectors = clustered(rows)
    searcher = create_searcher(kind, DIM, storage, **settings)
    searcher.add(np.arange(100, 100 + rows, dtype=np.int64), vectors)
    return searcher, vectors


def exact_keys(vectors: np.ndarray, queries: np.ndarray, k: int, first_key: int = 100) -> np.ndarray:
    exact = ExactSearcher(DIM)
    exact.add(np.arange(first_key, first_key + len(vectors), dtype=np.int64), vectors)
    return exact.search(queries, k, device="cpu")[1]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), truth.tolist())]))


@pytest.mark.parametrize("kind, params, minimum", [
    ("ivf", {}, 0.9), ("ivf", {"nprobe": 10_000}, 1.0), ("hnsw", {}, 0.95), ("hnsw", {"ef": 512}, 0.99),
    ("ivfpq", {}, 0.4),  # 4 bytes a vector, no re-ranking: far above chance (0.003), far below exact
])
def test_recall_against_exact_search(kind, params, minimum):
    searcher, vectors = filled(kind)
    queries = clustered(50, seed=7)
    nlist = getattr(searcher._ready(), "nlist", None)
    if "nprobe" in params:
        params = {"nprobe": nlist}  # every list: IVF-Flat is then exact
    scores, keys = searcher.search(queries, 10, **params)
    assert scores.shape == keys.shape == (50, 10) and keys.dtype == np.int64 and scores.dtype == np.float32
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    assert recall(keys, exact_keys(vectors, queries, 10)) >= minimum
    if kind != "ivfpq":  # stored vectors are exact: scores are the true inner products
        np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, vectors[keys - 100]), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_edits_keep_keys_order_and_vectors(kind):
    searcher, vectors = filled(kind, rows=1200)
    removed = np.array([100, 555, 1299], dtype=np.int64)
    searcher.remove(removed)
    assert len(searcher) == 1197 and not np.isin(removed, searcher.keys).any()
    assert searcher.keys.tolist() == [k for k in range(100, 1300) if k not in removed.tolist()]
    _, keys = searcher.search(vectors[[0, 455, 1199]], 5)
    assert not np.isin(keys, removed).any()
    new = clustered(1203)[1200:]  # fresh rows from the same distribution
    searcher.replace(np.array([101, 102, 103]), new)
    assert searcher.keys[:3].tolist() == [101, 102, 103]  # gallery position kept
    back = searcher.reconstruct(np.array([101, 102, 103]))
    if kind == "ivfpq":  # PQ codes approximate the vectors
        assert np.all(np.sum(back * new, axis=1) / np.linalg.norm(back, axis=1) > 0.8)
    else:
        np.testing.assert_allclose(back, new, atol=1e-6)
    searcher.add(np.array([5000]), new[:1])
    assert searcher.keys[-1] == 5000
    with pytest.raises(KeyError, match="already present"):
        searcher.add(np.array([5000]), new[:1])
    with pytest.raises(KeyError, match="not in the searcher"):
        searcher.remove(np.array([100]))
    with pytest.raises(KeyError, match="not in the searcher"):
        searcher.reconstruct(np.array([100]))


@pytest.mark.parametrize("kind", KINDS)
def test_scores_cover_every_row_in_gallery_order(kind):
    searcher, vectors = filled(kind, rows=600)
    queries = clustered(4, seed=3)
    scores = searcher.scores(queries)
    assert scores.shape == (4, 600)
    expected = queries @ searcher.reconstruct(searcher.keys).T
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_small_galleries_and_k_larger_than_the_gallery():
    searcher, vectors = filled("ivf", rows=20)
    scores, keys = searcher.search(vectors[:2], 50, nprobe=1)  # one list cannot hold all 20: exhaustive fallback
    assert keys.shape == (2, 20) and (keys >= 0).all() and sorted(keys[0].tolist()) == list(range(100, 120))
    empty = create_searcher("hnsw", DIM, "fp32")
    assert empty.search(vectors[:1], 5)[1].shape == (1, 0)


def test_ivfpq_refuses_a_gallery_too_small_to_train():
    searcher, _ = filled("ivfpq", rows=100)
    with pytest.raises(InputError, match="at least 256 images"):
        searcher.search(clustered(1), 5)


@pytest.mark.parametrize("kind, params, message", [
    ("ivf", {"nprobe": 0}, "nprobe must be between 1"),
    ("ivf", {"nprobe": 10**9}, "nprobe must be between 1"),
    ("ivf", {"ef": 10}, r"takes \['nprobe'\]"),
    ("hnsw", {"ef": 0}, "ef must be between 1"),
    ("hnsw", {"ef": 10**9}, "ef must be between 1"),
    ("hnsw", {"nprobe": 4}, r"takes \['ef'\]"),
    ("ivf", {"device": "tpu"}, "device must be one of"),
])
def test_search_settings_out_of_range_are_refused(kind, params, message):
    searcher, vectors = filled(kind, rows=500)
    with pytest.raises(InputError, match=message):
        searcher.search(vectors[:1], 5, **params)


@pytest.mark.parametrize("kind, settings, message", [
    ("ivf", {"nlist": 0}, "nlist must be"), ("ivf", {"bogus": 1}, "unknown ivf searcher settings"),
    ("hnsw", {"M": 1000}, "M must be between"), ("exact", {"nlist": 3}, "takes no settings"),
    ("annoy", {}, "unknown searcher"),
])
def test_bad_build_settings_are_refused(kind, settings, message):
    with pytest.raises(InputError, match=message):
        create_searcher(kind, DIM, "fp32", **settings)


def test_missing_faiss_is_an_unavailable_error_with_the_install_command(monkeypatch):
    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(UnavailableError, match=r"galr\[faiss\]"):
        create_searcher("ivf", DIM, "fp32")


def test_auto_is_exact_for_small_galleries_and_approximate_beyond():
    assert resolve_searcher_kind("auto", 1000) == "exact"
    assert resolve_searcher_kind("auto", 10**7) == "ivf"
    assert resolve_searcher_kind("hnsw", 10) == "hnsw"


# ---------------------------------------------------------------------------------------------
# In a gallery index and its file


def gallery(kind: str, rows: int = 800, storage: str = "fp32", **settings) -> tuple[GalleryIndex, np.ndarray]:
    index = GalleryIndex("model-1", DIM, storage, searcher=kind, searcher_params=settings)
    vectors = clustered(rows)
    index.add([ImageRecord(f"img{i:04d}.png", f"/data/img{i:04d}.png", 256, 256) for i in range(rows)], vectors)
    return index, vectors


@pytest.mark.parametrize("kind, storage", [("ivf", "fp32"), ("ivf", "fp16"), ("ivfpq", "fp32"), ("hnsw", "fp16")])
def test_index_file_round_trip_gives_the_same_answers(tmp_path, kind, storage):
    index, vectors = gallery(kind, storage=storage)
    index.remove(["img0003.png"])
    queries = clustered(8, seed=5)
    before = index.search(queries, 10)
    index.save(tmp_path / "g.gidx")
    loaded = load_index(tmp_path / "g.gidx", expected_model_hash="model-1")
    assert loaded.images.kind == kind and loaded.storage == storage and len(loaded) == 799
    after = loaded.search(queries, 10)
    assert after.ids == before.ids
    np.testing.assert_allclose(after.scores, before.scores, atol=1e-6)
    loaded.add([ImageRecord("late.png", "/data/late.png", 1, 1)], clustered(1, seed=11))
    assert loaded.search(clustered(1, seed=11), 1).ids == [["late.png"]]
    with pytest.raises(UnknownIdError):
        loaded.remove(["img0003.png"])


def test_change_searcher_moves_every_image_and_keeps_ids(tmp_path):
    index, vectors = gallery("exact")
    queries = clustered(5, seed=2)
    exact = index.search(queries, 5)
    index.change_searcher("ivf", nlist=4)
    assert index.images.kind == "ivf" and index.ids == exact.ids[0][:0] + index.ids
    assert index.search(queries, 5, nprobe=4).ids == exact.ids  # every list probed: exact answers


def _rewrite_member(path, name, data: bytes) -> None:
    """Replace a member's bytes but keep the header's recorded hash (as damage would)."""
    with zipfile.ZipFile(path) as source:
        members = {info.filename: source.read(info.filename) for info in source.infolist()}
    members[name] = data
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for member, payload in members.items():
            target.writestr(member, payload)


def test_a_damaged_or_missing_faiss_member_is_refused(tmp_path):
    index, _ = gallery("ivf")
    path = index.save(tmp_path / "g.gidx")
    with zipfile.ZipFile(path) as archive:
        blob = archive.read("images/faiss.index")
    flipped = bytearray(blob)
    flipped[len(flipped) // 2] ^= 0xFF
    _rewrite_member(path, "images/faiss.index", bytes(flipped))
    with pytest.raises(IndexFormatError, match="faiss.index"):
        load_index(path)
    with zipfile.ZipFile(path) as source:
        members = {i.filename: source.read(i.filename) for i in source.infolist() if i.filename != "images/faiss.index"}
    with zipfile.ZipFile(path, "w") as target:
        for member, payload in members.items():
            target.writestr(member, payload)
    with pytest.raises(IndexFormatError, match="missing"):
        load_index(path)


@pytest.mark.parametrize("problem, message", [
    ("dimension", "16-dimensional vectors, the index 32"),
    ("count", "holds 800 vectors, the header 900"),
    ("kind", "structure is a IndexIVFFlat"),
])
def test_a_faiss_structure_that_does_not_fit_the_header_is_refused(tmp_path, problem, message):
    if problem == "dimension":
        other = IvfSearcher(16)
        rng = np.random.default_rng(0).standard_normal((800, 16))
        other.add(np.arange(800), (rng / np.linalg.norm(rng, axis=1, keepdims=True)).astype(np.float32))
    else:
        other, _ = filled("ivf", rows=800)
    path = tmp_path / "parts.zip"
    with ContainerWriter(path) as writer:
        params = other.save(writer, "images/")
        entries = writer.entries
    count = 900 if problem == "count" else 800
    loader = HnswSearcher if problem == "kind" else IvfSearcher
    if problem == "kind":
        params = {**params, "settings": {}}
    with ContainerReader(path, error=IndexFormatError, fix="rebuild it") as reader:
        if problem == "count":
            with pytest.raises(IndexFormatError, match="keys.npy|holds 800"):
                loader.load(reader, entries, "images/", dim=DIM, storage="fp32", count=count, params=params)
            return
        with pytest.raises((IndexFormatError, InputError), match=message):
            loader.load(reader, entries, "images/", dim=DIM, storage="fp32", count=count, params=params)


def test_ivf_with_a_given_nlist_trains_once_its_sample_has_arrived():
    vectors = clustered(400)
    searcher = create_searcher("ivf", DIM, "fp32", nlist=4, train_size=150)
    searcher.add(np.arange(100), vectors[:100])
    assert not searcher.trained
    searcher.add(np.arange(100, 200), vectors[100:200])
    assert searcher.trained  # 200 rows waited >= train_size: trained and flushed
    searcher.add(np.arange(200, 400), vectors[200:])
    assert len(searcher) == 400 and searcher.search(vectors[:3], 1, nprobe=4)[1][:, 0].tolist() == [0, 1, 2]
    auto = create_searcher("ivf", DIM, "fp32", train_size=150)
    auto.add(np.arange(400), vectors)
    assert not auto.trained  # nlist depends on the final size: waits for the first search or save


@pytest.mark.parametrize("kind", KINDS)
def test_an_emptied_index_saves_loads_and_fills_again(tmp_path, kind):
    index = GalleryIndex("model-1", DIM, searcher=kind)
    index.save(tmp_path / "empty.gidx")
    loaded = load_index(tmp_path / "empty.gidx")
    assert len(loaded) == 0 and loaded.images.kind == kind
    assert loaded.search(clustered(2), 5).ids == [[], []]
    rows = 300 if kind == "ivfpq" else 40
    loaded.add([ImageRecord(f"{i}.png", f"/{i}.png", 1, 1) for i in range(rows)], clustered(rows))
    loaded.remove([f"{i}.png" for i in range(rows)])
    loaded.save(tmp_path / "emptied.gidx")
    assert len(load_index(tmp_path / "emptied.gidx")) == 0


# ---------------------------------------------------------------------------------------------
# FAISS on a GPU: the logic around it, with a stand-in for faiss-gpu's cloner (no GPU here)


@pytest.fixture
def fake_faiss_gpu(monkeypatch):
    """faiss-gpu's three entry points, the "GPU copy" being a CPU clone that counts its searches."""
    copies: list[dict] = []

    class CountingCopy:
        def __init__(self, index, options):
            self.index, self.searches = faiss.clone_index(index), 0
            copies.append({"copy": self, "options": options})

        def search(self, queries, k, params=None):
            self.searches += 1
            return self.index.search(queries, k, params=params)

    class ClonerOptions:
        useFloat16 = False

    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "GpuClonerOptions", ClonerOptions, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda resources, device, index, options=None:
                        CountingCopy(index, options), raising=False)
    return copies


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_ivf_kinds_search_on_faiss_gpu_copies_that_follow_edits(fake_faiss_gpu, kind):
    searcher, vectors = filled(kind, nprobe=8)
    queries = clustered(6, seed=5)
    on_cpu = searcher.search(queries, 5, device="cpu")
    on_gpu = searcher.search(queries, 5, device="cuda")
    np.testing.assert_array_equal(on_gpu[1], on_cpu[1])
    assert len(fake_faiss_gpu) == 1 and fake_faiss_gpu[0]["copy"].searches == 1
    assert fake_faiss_gpu[0]["options"] is None if kind == "ivf" else fake_faiss_gpu[0]["options"].useFloat16
    searcher.search(queries, 5)  # auto takes the GPU too, with the same copy
    assert len(fake_faiss_gpu) == 1 and fake_faiss_gpu[0]["copy"].searches == 2
    searcher.add(np.array([1]), queries[:1])  # an edit makes the copy stale
    assert 1 in searcher.search(queries[:1], 10, device="cuda")[1][0] and len(fake_faiss_gpu) == 2
    searcher.search(queries, 5, device="cuda", allowed=searcher.keys[:50])  # ID selectors: the CPU
    searcher.search(queries, 3000, device="cuda")  # wider than FAISS's GPU k
    assert fake_faiss_gpu[1]["copy"].searches == 1


def test_hnsw_and_cpu_only_faiss_refuse_cuda_but_auto_falls_back(monkeypatch, fake_faiss_gpu):
    from galr.runtime.backends.base import BackendUnavailableError

    graph, _ = filled("hnsw", rows=400)
    with pytest.raises(BackendUnavailableError, match="no GPU form of HNSW"):
        graph.search(clustered(1), 3, device="cuda")
    assert graph.search(clustered(1), 3)[1].shape == (1, 3) and not fake_faiss_gpu
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    lists, _ = filled("ivf", rows=400)
    with pytest.raises(BackendUnavailableError, match="FAISS sees no GPU"):
        lists.search(clustered(1), 3, device="cuda")
    monkeypatch.delattr(faiss, "StandardGpuResources")
    with pytest.raises(BackendUnavailableError, match="CPU-only"):
        lists.search(clustered(1), 3, device="cuda")
    assert lists.search(clustered(1), 3)[1].shape == (1, 3) and not fake_faiss_gpu


@pytest.mark.parametrize("rerank", [0, 3])
def test_ivfpq_answers_a_query_its_probes_cannot_fill_exhaustively(rerank):
    searcher, vectors = filled("ivfpq", rows=1200, nprobe=1, **({"rerank": rerank} if rerank else {}))
    scores, keys = searcher.search(clustered(2, seed=8), 1200)
    assert keys.shape == (2, 1200) and sorted(keys[0].tolist()) == list(range(100, 1300))


def test_a_new_index_sizes_its_ivf_lists_for_the_images_announced_and_trains_early():
    from galr.runtime.index import new_index

    class Model:
        model_hash, embed_dim = "m", DIM

    index = new_index(Model(), 10_000, searcher="ivf")
    assert index.images.settings.nlist == 100  # sqrt(10,000), so training need not wait for the last image
    vectors = clustered(10_000)
    index.add([ImageRecord(f"{n}", f"/{n}.png", 1, 1) for n in range(5000)], vectors[:5000])
    assert not index.images.trained  # 5,000 < 64 x 100 rows of sample
    index.add([ImageRecord(f"{n}", f"/{n}.png", 1, 1) for n in range(5000, 10_000)], vectors[5000:])
    assert index.images.trained and len(index) == 10_000 and not index.images._pending
    assert new_index(Model(), 4000, searcher="ivf", searcher_params={"nlist": 5}).images.settings.nlist == 5
