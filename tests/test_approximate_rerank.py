"""ivfpq with an exact re-rank from vectors kept beside the codes (memory-mapped when read)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss", reason="approximate searchers need faiss-cpu")

from galr.runtime.index import GalleryIndex, ImageRecord, load_index  # noqa: E402
from galr.runtime.index.searchers import create_searcher  # noqa: E402

DIM = 32


def _vectors(rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, DIM))
    x = (centres[rng.integers(0, 30, rows)] + 0.5 * rng.standard_normal((rows, DIM))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def test_reranked_pq_finds_more_of_the_true_neighbours_and_reports_exact_scores():
    vectors = _vectors(6000)
    keys = np.arange(6000, dtype=np.int64) * 3
    queries = vectors[:40] + 0.05 * _vectors(40, seed=9)
    truth = keys[np.argsort(-(queries @ vectors.T), axis=1)[:, :10]]
    plain = create_searcher("ivfpq", DIM, "fp32", m=4, nprobe=16)
    reranked = create_searcher("ivfpq", DIM, "fp32", m=4, nprobe=16, rerank=8)
    plain.add(keys, vectors)
    reranked.add(keys, vectors)
    plain_scores, plain_keys = plain.search(queries, 10)
    scores, found = reranked.search(queries, 10)
    assert _recall(found, truth) > _recall(plain_keys, truth) + 0.1 and _recall(found, truth) >= 0.9
    rows = found // 3
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, vectors[rows]), atol=1e-5)
    np.testing.assert_allclose(reranked.reconstruct(keys[:5]), vectors[:5], atol=0)


def test_reranked_pq_saves_maps_its_exact_rows_and_edits_them(tmp_path):
    vectors = _vectors(3000, seed=1)
    index = GalleryIndex("m", DIM, "fp16", searcher="ivfpq", searcher_params={"m": 4, "rerank": 4})
    index.add([ImageRecord(f"i{n}", f"/x/{n}.png", 8, 8) for n in range(3000)], vectors)
    before = index.search(vectors[:5], 5).ids
    path = index.save(tmp_path / "p.gidx")
    loaded = load_index(path)
    assert isinstance(loaded.images._exact_store.array(), np.memmap) and loaded.search(vectors[:5], 5).ids == before
    loaded.remove(["i1", "i2"])
    loaded.update([ImageRecord("i3", "/x/3.png", 8, 8)], vectors[10:11])
    fresh = _vectors(1, seed=77)
    loaded.add([ImageRecord("new", "/x/new.png", 8, 8)], fresh)
    assert len(loaded.images._exact_store) == len(loaded) == 2999
    np.testing.assert_allclose(loaded.images.reconstruct([loaded.key_of("i3")]), vectors[10:11], atol=1e-3)
    again = load_index(loaded.save(tmp_path / "q.gidx"))
    assert again.search(fresh, 1).ids[0] == ["new"]


def test_exact_rows_past_the_spill_size_live_in_a_temporary_file_and_answer_alike(monkeypatch):
    from galr.runtime.index.searchers import exact_rows

    vectors = _vectors(4000, seed=2)
    keys = np.arange(4000, dtype=np.int64)
    queries = _vectors(12, seed=3)
    in_memory = create_searcher("ivfpq", DIM, "fp16", m=4, nprobe=8, nlist=16, rerank=5)
    spilled = create_searcher("ivfpq", DIM, "fp16", m=4, nprobe=8, nlist=16, rerank=5)
    for start in range(0, 4000, 500):
        in_memory.add(keys[start:start + 500], vectors[start:start + 500])
    monkeypatch.setattr(exact_rows, "SPILL_BYTES", 100 * DIM * 2)  # spills after 100 rows
    for start in range(0, 4000, 500):
        spilled.add(keys[start:start + 500], vectors[start:start + 500])
    assert spilled._exact_store._file is not None and in_memory._exact_store._file is None
    assert isinstance(spilled._exact_store.array(), np.memmap)
    for searcher in (in_memory, spilled):
        searcher.remove(keys[100:300])
        searcher.replace(keys[:2], vectors[2000:2002])
    first, second = in_memory.search(queries, 10), spilled.search(queries, 10)
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_allclose(spilled.reconstruct(keys[:2]), vectors[2000:2002], atol=1e-3)
    assert len(spilled._exact_store) == len(spilled) == 3800


def test_rerank_depth_can_be_chosen_per_search():
    vectors = _vectors(5000, seed=4)
    keys = np.arange(5000, dtype=np.int64)
    queries = vectors[:30] + 0.05 * _vectors(30, seed=5)
    truth = keys[np.argsort(-(queries @ vectors.T), axis=1)[:, :10]]
    searcher = create_searcher("ivfpq", DIM, "fp32", m=4, nprobe=16, rerank=2)
    searcher.add(keys, vectors)
    shallow = _recall(searcher.search(queries, 10, rerank=1)[1], truth)
    deep = _recall(searcher.search(queries, 10, rerank=20)[1], truth)
    pq_only = _recall(searcher.search(queries, 10, rerank=0)[1], truth)
    assert deep > shallow and deep > pq_only and deep >= 0.95
    with pytest.raises(ValueError, match="rerank must be between 1 and 1000"):
        searcher.search(queries, 10, rerank=5000)
    without = create_searcher("ivfpq", DIM, "fp32", m=4, nprobe=16)
    without.add(keys, vectors)
    with pytest.raises(ValueError, match="keeps no exact vectors"):
        without.search(queries, 10, rerank=4)
