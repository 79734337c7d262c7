"""fp16 exact search through FAISS's scalar-quantiser scan: the same answers as the numpy block scan."""

from __future__ import annotations

import numpy as np
import pytest

from galr.runtime.index.searchers import exact as exact_module
from galr.runtime.index.searchers.exact import TIE_MARGIN, ExactSearcher

pytest.importorskip("faiss", reason="the fp16 fast path needs faiss-cpu (pip install 'galr[faiss]')")

DIM = 24


def unit_rows(rows: int, seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)
    return values / np.linalg.norm(values, axis=1, keepdims=True)


def pair(rows: np.ndarray, keys: np.ndarray | None = None, monkeypatch=None) -> tuple[ExactSearcher, ExactSearcher]:
    """The same rows in a FAISS-backed fp16 searcher and in a numpy-only one."""
    keys = np.arange(len(rows), dtype=np.int64) * 7 + 3 if keys is None else keys
    fast = ExactSearcher(DIM, "fp16")
    fast.add(keys, rows)
    monkeypatch.setattr(exact_module, "_faiss_or_none", lambda: None)
    plain = ExactSearcher(DIM, "fp16")
    monkeypatch.undo()
    plain.add(keys, rows)
    assert fast._faiss is not None and plain._faiss is None
    return fast, plain


def assert_same_answers(fast: ExactSearcher, plain: ExactSearcher, queries: np.ndarray, k: int, **kwargs) -> None:
    fast_scores, fast_keys = fast.search(queries, k, device="cpu", **kwargs)
    plain_scores, plain_keys = plain.search(queries, k, device="cpu", **kwargs)
    np.testing.assert_array_equal(fast_keys, plain_keys)
    np.testing.assert_allclose(fast_scores, plain_scores, atol=1e-6)


def test_faiss_scan_finds_what_the_block_scan_finds(monkeypatch):
    fast, plain = pair(unit_rows(500, seed=1), monkeypatch=monkeypatch)
    queries = unit_rows(9, seed=2)
    for k in (1, 10, 499, 500, 900):
        assert_same_answers(fast, plain, queries, k)
    assert fast._scan_index is not None  # the FAISS path really ran


def test_ties_are_broken_by_gallery_order_even_past_the_short_list(monkeypatch):
    rows = unit_rows(200, seed=3)
    twin = rows[5].copy()
    few, many = [40, 90, 150], list(range(100, 100 + TIE_MARGIN + 30))
    rows[few] = twin  # ties that fit in FAISS's short list
    fast, plain = pair(rows, monkeypatch=monkeypatch)
    assert_same_answers(fast, plain, twin[None, :], 3)
    assert fast.search(twin[None, :], 4, device="cpu")[1][0].tolist() == fast.keys[[5, 40, 90, 150]].tolist()
    rows[many] = twin  # more equal rows than the short list holds: the block scan decides
    fast, plain = pair(rows, monkeypatch=monkeypatch)
    block_scans = []
    block_top_k = fast._block_top_k
    monkeypatch.setattr(fast, "_block_top_k", lambda queries, *rest: block_scans.append(len(queries)) or
                        block_top_k(queries, *rest))
    for k in (2, 20, TIE_MARGIN + 10):
        assert_same_answers(fast, plain, np.stack([twin, rows[0]]), k)
    assert block_scans == [1, 1, 1]  # only the tied query, each time


def test_filtered_search_and_edits_agree(monkeypatch):
    fast, plain = pair(unit_rows(300, seed=4), monkeypatch=monkeypatch)
    queries = unit_rows(5, seed=5)
    allowed = fast.keys[::7]
    assert_same_answers(fast, plain, queries, 10, allowed=allowed)
    assert_same_answers(fast, plain, queries, 10, allowed=allowed[:3])  # fewer allowed than k
    for searcher in (fast, plain):
        searcher.remove(searcher.keys[10:60])
        searcher.replace(searcher.keys[:3], unit_rows(3, seed=6))
        searcher.add(np.array([10_001, 10_002]), unit_rows(2, seed=7))
    assert_same_answers(fast, plain, queries, 25)
    assert_same_answers(fast, plain, queries, 10, allowed=fast.keys[-5:])


def test_views_taken_before_the_rows_grow_stay_valid():
    searcher = ExactSearcher(DIM, "fp16")
    searcher.add(np.arange(10), unit_rows(10, seed=8))
    early = searcher.vectors
    expected = early.copy()
    for block in range(1, 30):  # many regrowths: each moves the rows into a new FAISS index
        searcher.add(np.arange(block * 10, block * 10 + 10), unit_rows(10, seed=8 + block))
    np.testing.assert_array_equal(early, expected)
    assert early.dtype == np.float16 and not early.flags.writeable


def test_a_memory_mapped_store_is_copied_in_by_the_first_search(tmp_path, monkeypatch):
    fast, plain = pair(unit_rows(120, seed=9), monkeypatch=monkeypatch)
    np.save(tmp_path / "vectors.npy", fast.vectors)
    mapped = np.load(tmp_path / "vectors.npy", mmap_mode="r")  # what a .gidx opened with mapped=True hands over
    loaded = ExactSearcher(DIM, "fp16")
    loaded.load_arrays(np.array(fast.keys), mapped)
    assert not loaded.vectors.flags.writeable and loaded._scan_index is None
    assert_same_answers(loaded, plain, unit_rows(4, seed=10), 8)
    assert loaded._scan_index is not None
    np.testing.assert_array_equal(loaded.vectors, plain.vectors)
