"""galr-run and the Retriever on a real (small, random-weight) bundle and index."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from galr.config import GaLRConfig, RerankConfig
from galr.export.pipeline import ExportSettings, export_bundle
from galr.model import GaLR, save_checkpoint
from galr.preprocess.text import Vocabulary, read_text_lines
from galr.retrieval.rerank import rerank_online
from galr.runtime.cli.run import main as run_main
from galr.runtime.encoders import QueryError, UnknownWordsWarning, load_engine
from galr.runtime.index import UnknownIdError, build_index, load_index
from galr.runtime.index.searchers.exact import ExactSearcher
from galr.runtime.retriever import RerankUnavailableWarning, Retriever

WORDS = ["plane", "ship", "runway", "harbor", "green", "white", "two", "many", "water", "grass"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A bundle, 12 images with detections, and an index with a 30-caption text bank."""
    root = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    model = GaLR(GaLRConfig.small(vocab_size=len(WORDS) + 1)).eval()
    checkpoint = save_checkpoint(root / "m.pt", model, Vocabulary.from_words(WORDS))
    bundle = root / "galr.plan"
    export_bundle(ExportSettings(checkpoint=checkpoint, output=bundle, tensorrt="no"), log=lambda _: None)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(images / f"img_{i:02d}.png")
    (images / "broken.png").write_bytes(b"not an image")
    engine = load_engine(bundle, backend="onnxruntime", device="cpu")
    paths = sorted(images.glob("*.png"))
    with pytest.warns(UserWarning):
        index, skipped = build_index(engine, paths, progress=False, root=images)
    assert [s.path for s in skipped] == [str(images / "broken.png")]
    bank = [" ".join(rng.choice(WORDS, 4)) for _ in range(30)]
    index.add_text_bank(bank, engine.encode_text(bank))
    index_path = index.save(root / "gallery.gidx")
    queries = root / "query.txt"
    queries.write_text("# demo queries\ntwo white planes on a runway\n\nmany ships in the harbor\n", encoding="utf-8")
    return {"root": root, "bundle": bundle, "index": index_path, "queries": queries, "engine": engine, "bank": bank}


def test_text_search_with_rerank_equals_the_online_mr_formula(deployment):
    retriever = Retriever.open(deployment["bundle"], deployment["index"], backend="onnxruntime", device="cpu",
                               rerank=RerankConfig(k=10))
    queries = ["two white planes on a runway", "many ships"]
    plain = retriever.search_text(queries, top_k=5, rerank=False)
    reranked = retriever.search_text(queries, top_k=5, rerank=True)
    q = retriever.encoders.encode_text(queries)
    gallery = retriever.index.image_vectors()
    sims = q @ gallery.T
    expected_order = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    assert [[h.id for h in r.hits] for r in plain] == [[retriever.index.ids[i] for i in row] for row in expected_order]
    dense = rerank_online(sims, retriever.index.text_bank_vectors() @ gallery.T, RerankConfig(k=10))
    for row, result in enumerate(reranked):
        best = np.argsort(-dense[row], kind="stable")[:5]
        assert [h.id for h in result.hits] == [retriever.index.ids[i] for i in best]
        np.testing.assert_allclose([h.rerank_score for h in result.hits], dense[row, best], atol=1e-5)
    assert all(r.reranked for r in reranked) and not plain[0].reranked


def test_image_to_text_search_returns_bank_captions(deployment):
    retriever = Retriever.open(deployment["bundle"], deployment["index"], backend="onnxruntime", device="cpu")
    image = deployment["root"] / "images" / "img_03.png"
    with pytest.warns(UserWarning):  # no detections for the query image: the documented fallback
        results = retriever.search_images([str(image)], top_k=3)
    assert len(results[0].hits) == 3 and all(h.id in deployment["bank"] for h in results[0].hits)


def test_a_search_looks_up_only_its_hits(deployment, monkeypatch):
    # Describing every record per query would cost time linear in the gallery; only the hits are read.
    from galr.runtime.index import ImageRecord

    retriever = Retriever(deployment["engine"], load_index(deployment["index"]))
    described = []
    original = ImageRecord.to_dict
    monkeypatch.setattr(ImageRecord, "to_dict", lambda record: described.append(record.id) or original(record))
    results = retriever.search_text(["two white planes on a runway", "many ships in the harbor"], top_k=2, rerank=True)
    assert sorted(described) == sorted(hit.id for result in results for hit in result.hits)
    assert all(hit.record["id"] == hit.id for result in results for hit in result.hits)


def test_load_engine_loads_the_tokenizer_up_front(deployment):
    # Loading NLTK is slow (BENCHMARKS.md); a server's first query should not pay it.
    from galr.preprocess import text

    text._nltk_tokenizers.cache_clear()
    engine = load_engine(deployment["bundle"], backend="onnxruntime", device="cpu")
    try:
        assert text._nltk_tokenizers.cache_info().currsize == 1
    finally:
        engine.close()


def test_records_by_key(deployment):
    index = load_index(deployment["index"])
    keys = index.images.keys
    assert index.record(int(keys[0])).id == index.ids[0] and index.record(int(keys[-1])).id == index.ids[-1]
    with pytest.raises(UnknownIdError, match="no image with key"):
        index.record(int(keys.max()) + 1)


class _LoopSearcher(ExactSearcher):
    """Another searcher behind the same seam: top-k by a Python loop over the stored rows."""

    kind = "loop"

    def search(self, queries, k, **params):
        rows = self.vectors.astype(np.float32)
        keys = self.keys
        found = [sorted(range(len(rows)), key=lambda i: (-float(rows[i] @ q), i))[:k] for q in queries]
        scores = np.array([[float(rows[i] @ q) for i in order] for q, order in zip(queries, found)], np.float32)
        return scores.reshape(len(queries), -1), np.array([[keys[i] for i in order] for order in found], np.int64)


def test_the_retriever_works_through_any_searcher(deployment):
    """Swap the index's image searcher for another implementation: same answers, MR included."""
    index = load_index(deployment["index"])
    reference = Retriever(deployment["engine"], index).search_text(["two white planes on a runway"], top_k=4)
    swapped = _LoopSearcher(index.embed_dim, index.storage)
    swapped.add(index.images.keys, index.images.vectors)
    index.images = swapped
    again = Retriever(deployment["engine"], index).search_text(["two white planes on a runway"], top_k=4)
    assert [(h.id, h.rerank_score) for h in again[0].hits] == [(h.id, h.rerank_score) for h in reference[0].hits]
    np.testing.assert_allclose([h.score for h in again[0].hits], [h.score for h in reference[0].hits], atol=1e-6)


def test_queries_that_cannot_be_encoded(deployment):
    engine = deployment["engine"]
    with pytest.raises(QueryError, match="empty"):
        engine.encode_text(["ok plane", "   "])
    with pytest.raises(QueryError, match="no words"):
        engine.encode_text(["?!"])
    with pytest.warns(UnknownWordsWarning, match="no word in the model's vocabulary"):
        engine.encode_text(["xyzzy qwerty"])


def test_rerank_without_text_bank_warns_and_ranks_by_cosine(deployment, tmp_path):
    index = load_index(deployment["index"])
    index.add_text_bank([], np.zeros((0, index.embed_dim), np.float32), replace=True)
    retriever = Retriever(deployment["engine"], index)
    with pytest.warns(RerankUnavailableWarning):
        result = retriever.search_text(["plane"], top_k=3, rerank=True)
    assert not result[0].reranked


def test_galr_run_prints_table_and_writes_json_and_html(deployment, tmp_path):
    out_json, out_html = tmp_path / "out.json", tmp_path / "out.html"
    result = CliRunner().invoke(run_main, [str(deployment["queries"]), "--engine", str(deployment["bundle"]),
                                           "--index", str(deployment["index"]), "--top-k", "3", "--json", str(out_json),
                                           "--html", str(out_html), "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    assert "onnxruntime on CPU at fp32" in result.output and "[2] many ships in the harbor" in result.output
    payload = json.loads(out_json.read_text())
    assert len(payload["results"]) == 2 and len(payload["results"][0]["hits"]) == 3
    page = out_html.read_text()
    assert page.count("<section>") == 2 and page.count("data:image/jpeg;base64,") == 6


def test_galr_run_no_rerank_and_image2text(deployment):
    image_queries = deployment["root"] / "images.txt"
    image_queries.write_text(str(deployment["root"] / "images" / "img_01.png") + "\n", encoding="utf-8")
    runner = CliRunner()
    base = ["--engine", str(deployment["bundle"]), "--index", str(deployment["index"])]
    result = runner.invoke(run_main, [str(deployment["queries"]), "--no-rerank", *base])
    assert result.exit_code == 0, result.output
    hit_rows = [line.split() for line in result.output.splitlines() if re.match(r"\s+\d+\s+-?\d\.\d{3}\s", line)]
    assert len(hit_rows) == 2 * 5 and all(row[2] == "-" for row in hit_rows)  # no MR score on any hit
    assert "rerank" not in result.output
    reranked = runner.invoke(run_main, [str(deployment["queries"]), *base])
    assert "rerank" in reranked.output
    result = runner.invoke(run_main, [str(image_queries), "--mode", "image2text", *base])
    assert result.exit_code == 0, result.output
    assert "caption" in result.output


@pytest.mark.parametrize("content, message", [(b"", "has no queries"), (b"# only a comment\n\n", "has no queries"),
                                              (b"caf\xe9 plane\n", "not UTF-8")])
def test_bad_query_files_exit_2(deployment, tmp_path, content, message):
    path = tmp_path / "q.txt"
    path.write_bytes(content)
    result = CliRunner().invoke(run_main, [str(path), "--engine", str(deployment["bundle"]), "--index", str(deployment["index"])])
    assert result.exit_code == 2 and message in result.output


def test_missing_files_and_foreign_index_exit_2(deployment, tmp_path):
    runner = CliRunner()
    q = str(deployment["queries"])
    result = runner.invoke(run_main, [str(tmp_path / "none.txt")])
    assert result.exit_code == 2 and "no such file" in result.output
    result = runner.invoke(run_main, [q, "--engine", str(tmp_path / "none.plan")])
    assert result.exit_code == 2 and "galr-export" in result.output
    result = runner.invoke(run_main, [q, "--engine", str(deployment["bundle"]), "--index", str(tmp_path / "none.gidx")])
    assert result.exit_code == 2 and "galr-index" in result.output
    foreign = load_index(deployment["index"])
    foreign._model_hash = "0" * 64  # an index made by another model
    foreign.save(tmp_path / "foreign.gidx")
    result = runner.invoke(run_main, [q, "--engine", str(deployment["bundle"]), "--index", str(tmp_path / "foreign.gidx")])
    assert result.exit_code == 2 and "built with model" in result.output


def test_read_queries_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("\ufeff# header\n  first query  \n\n#second\nthird\n", encoding="utf-8")
    assert [line.text for line in read_text_lines(path, "queries")] == ["first query", "third"]


def test_contact_sheet_renders_in_a_headless_browser(deployment, tmp_path):
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless Chromium installed (apt-get install chromium) to render the HTML page")
    page, shot = tmp_path / "sheet.html", tmp_path / "sheet.png"
    result = CliRunner().invoke(run_main, [str(deployment["queries"]), "--engine", str(deployment["bundle"]),
                                           "--index", str(deployment["index"]), "--html", str(page)])
    assert result.exit_code == 0, result.output
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,800", f"--screenshot={shot}",
                    page.as_uri()], capture_output=True, timeout=120)
    picture = Image.open(shot).convert("RGB")
    assert picture.size == (1200, 800)
    # Thumbnails render as real pixels: many distinct colours, not a blank or error page.
    pixels = np.asarray(picture.resize((300, 200))).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 500


def test_an_approximate_index_answers_like_the_exact_one_when_it_probes_everything(deployment, tmp_path):
    pytest.importorskip("faiss", reason="approximate search needs faiss-cpu (pip install 'galr[faiss]')")
    index = load_index(deployment["index"])
    queries = ["two white planes on a runway", "many ships in the harbor"]
    reference = Retriever(deployment["engine"], index).search_text(queries, top_k=4)
    index.change_searcher("ivf", nlist=3)
    path = index.save(tmp_path / "ivf.gidx")
    for search_params, same in (({"nprobe": 3}, True), ({"nprobe": 1}, None)):
        approximate = Retriever(deployment["engine"], load_index(path), search_params=search_params)
        results = approximate.search_text(queries, top_k=4)
        assert all(len(result.hits) == 4 and result.reranked for result in results)
        if same:  # every list probed: IVF-Flat is exact, and so is MR over its candidates
            for got, want in zip(results, reference):
                assert [(h.id, h.rerank_score) for h in got.hits] == [(h.id, h.rerank_score) for h in want.hits]
    result = CliRunner().invoke(run_main, [str(deployment["queries"]), "--engine", str(deployment["bundle"]),
                                           "--index", str(path), "--nprobe", "2", "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    assert "(ivf search)" in result.output
    result = CliRunner().invoke(run_main, [str(deployment["queries"]), "--engine", str(deployment["bundle"]),
                                           "--index", str(path), "--nprobe", "99", "--backend", "onnxruntime"])
    assert result.exit_code == 2 and "nprobe must be between 1 and 3" in result.output
    result = CliRunner().invoke(run_main, [str(deployment["queries"]), "--engine", str(deployment["bundle"]),
                                           "--index", str(path), "--exact-rerank", "4", "--backend", "onnxruntime"])
    assert result.exit_code == 2 and "the ivf searcher takes ['nprobe'], not ['rerank']" in result.output


def test_a_result_as_json_is_what_dataclasses_would_give_and_a_copy():
    import dataclasses

    from galr.runtime.retriever import Hit, QueryResult

    record = {"path": "/x.png", "footprint": [[1, 2], [3, 4]], "tags": {"port": True}}
    result = QueryResult("ships", [Hit(0, "x.png", 0.9, 0.5, record), Hit(1, "y.png", 0.8)], True, {"encode": 1.5},
                         ["a notice"])
    data = result.to_dict()
    assert data == dataclasses.asdict(result)
    data["hits"][0]["record"].pop("path")
    data["notices"].append("more")
    assert "path" in result.hits[0].record and result.notices == ["a notice"]
