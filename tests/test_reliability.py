"""The adversarial corpus: what an attacker or a careless user does to galr, and what galr must do.

Every case of the reliability issue has a test here (numbers in the test names follow
docs/reliability.md): nothing already stored is lost, nothing grows without a bound, every bad input
ends in one line and the exit code of galr.errors, never a traceback. The byte-flip sweeps run a
sample here; the whole sweep over every structural byte is marked ``slow``.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
import time
import warnings
import weakref
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from galr.bundle import BundleError, read_bundle
from galr.container import sha256_bytes, table_sha256
from galr.errors import GalrError, exit_code_for
from galr.preprocess.image import ImageLoadError, ImagePreprocessConfig, ImageWarning, load_image
from galr.runtime.cli.index import main as index_main
from galr.runtime.cli.run import main as run_main
from galr.runtime.encoders import load_engine
from galr.runtime.index import load_index, scan_image_files
from galr.runtime.retriever import Retriever
from tests.test_bundle import manifest_and_members
from tests.test_index import FakeEngine, write_image
from tests.test_runtime_cli import deployment  # noqa: F401 - the shared module-scoped fixture

REPO = Path(__file__).resolve().parents[1]


def run(command, *args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith(("galr-run:", "galr-index:"))]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


# ---------------------------------------------------------------------------------------------------
# 1-3: data loss


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from tests.test_index import FakeEngine
    import galr.runtime.cli.index as cli

    class SlowEngine(FakeEngine):
        def encode_images(self, images, local=None):
            time.sleep({delay})  # both writers are mid-update at once
            return super().encode_images(images, local)

    cli.load_engine = lambda *a, **k: SlowEngine()
    cli.main.main(args=sys.argv[1:], prog_name="galr-index")
""")


def test_1_two_writers_of_one_index_take_turns_and_lose_nothing(tmp_path):
    for folder, seeds in (("base", (1, 2)), ("first", (3, 4, 5)), ("second", (6, 7, 8))):
        for seed in seeds:
            write_image(tmp_path / folder / f"{folder}_{seed}.png", seed)
    (tmp_path / "galr.plan").write_bytes(b"placeholder: the writer script fakes load_engine")
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=str(REPO), delay=1.0))
    common = ["--no-progress", "--engine", str(tmp_path / "galr.plan"), "-o", str(tmp_path / "g.gidx")]
    subprocess.run([sys.executable, str(script), str(tmp_path / "base"), *common], check=True, cwd=tmp_path,
                   capture_output=True)
    writers = [subprocess.Popen([sys.executable, str(script), str(tmp_path / folder), "--update", "--root",
                                 str(tmp_path), *common], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for folder in ("first", "second")]
    outputs = [writer.communicate(timeout=120) for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], outputs
    assert any("is being written by process" in err for _, err in outputs), outputs  # one waited for the other
    ids = set(load_index(tmp_path / "g.gidx").ids)
    assert {f"first/first_{s}.png" for s in (3, 4, 5)} | {f"second/second_{s}.png" for s in (6, 7, 8)} <= ids
    assert len(ids) == 8


def test_1_a_writer_that_cannot_get_the_lock_in_time_changes_nothing(tmp_path, monkeypatch):
    from galr.atomic import exclusive_lock
    from galr.runtime.cli import index as cli

    write_image(tmp_path / "images" / "a.png", 1)
    (tmp_path / "galr.plan").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load_engine", lambda *a, **k: FakeEngine())
    assert run(index_main, "images", "--no-progress").exit_code == 0
    before = (tmp_path / "gallery.gidx").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time; sys.path.insert(0, {str(REPO)!r})
        from galr.atomic import exclusive_lock
        with exclusive_lock({str(tmp_path / 'gallery.gidx')!r}, timeout=5):
            print('held', flush=True); time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run(index_main, "images", "--update", "--lock-timeout", "0.3", "--no-progress")
        one_line_error(result, 2, "is being written by another process", "nothing was changed")
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "gallery.gidx").read_bytes() == before
    with exclusive_lock(tmp_path / "gallery.gidx", timeout=1):  # the dead holder's lock is gone
        pass


def test_2_reports_are_written_atomically_and_their_folder_is_checked_first(deployment, tmp_path, monkeypatch):  # noqa: F811
    base = [deployment["queries"], "--engine", deployment["bundle"], "--index", deployment["index"]]
    started = []
    monkeypatch.setattr(Retriever, "open", classmethod(lambda *a, **k: started.append(1)))
    result = run(run_main, *base, "--json", tmp_path / "missing" / "out.json")
    one_line_error(result, 2, "does not exist")
    assert started == []  # refused before any model or index was opened
    monkeypatch.undo()
    report = tmp_path / "out.json"
    report.write_text("previous report")

    def full_disk(source, target):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr("galr.atomic.os.replace", full_disk)
    result = run(run_main, *base, "--json", report)
    one_line_error(result, 2, "No space left on device")
    assert report.read_text() == "previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary file left


def test_3_an_existing_index_is_only_replaced_when_asked(tmp_path, monkeypatch):
    from galr.runtime.cli import index as cli

    for seed in range(3):
        write_image(tmp_path / "many" / f"{seed}.png", seed)
    write_image(tmp_path / "few" / "x.png", 9)
    (tmp_path / "galr.plan").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load_engine", lambda *a, **k: FakeEngine())
    assert run(index_main, "many", "--no-progress").exit_code == 0
    result = run(index_main, "few", "--no-progress")
    one_line_error(result, 2, "already exists", "--update", "--overwrite")
    assert len(load_index("gallery.gidx")) == 3
    assert run(index_main, "few", "--overwrite", "--no-progress").exit_code == 0
    assert load_index("gallery.gidx").ids == ["x.png"]


# ---------------------------------------------------------------------------------------------------
# 4-8: bounds


def test_4_queries_are_answered_in_bounded_blocks_with_the_same_results(deployment, monkeypatch):  # noqa: F811
    import galr.runtime.retriever as retriever_module

    encoders = load_engine(deployment["bundle"], backend="onnxruntime", device="cpu")
    index = load_index(deployment["index"])
    retriever = Retriever(encoders, index)
    queries = [f"{a} {b} planes" for a in ("two", "many", "white", "green") for b in ("water", "grass", "runway")]
    whole = retriever.search_text(queries, top_k=5)
    sizes = []
    real = retriever_module._order_with_rerank

    def spy(values, bank_values, config, top_k):
        sizes.append(bank_values.size)
        return real(values, bank_values, config, top_k)

    per_query = len(index.text_bank) * min(len(index), 30)  # bank rows x MR candidates
    monkeypatch.setattr(retriever_module, "_order_with_rerank", spy)
    monkeypatch.setattr(retriever_module, "BLOCK_ELEMENTS", 3 * per_query)  # 3 queries' bank scores per block
    blocked = retriever.search_text(queries, top_k=5)
    assert len(sizes) == 4 and max(sizes) <= 3 * per_query
    # Same answers; scores to float32 rounding (a block pads its token rows to its own longest query).
    assert [[h.id for h in r.hits] for r in blocked] == [[h.id for h in r.hits] for r in whole]
    np.testing.assert_allclose([[h.rerank_score for h in r.hits] for r in blocked],
                               [[h.rerank_score for h in r.hits] for r in whole], rtol=1e-6)


def test_5_decoded_bytes_are_bounded_before_decoding(tmp_path, monkeypatch):
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "bands.tif"
    tifffile.imwrite(path, np.zeros((128, 128, 64), np.uint16), compression="zlib", planarconfig="contig")
    assert path.stat().st_size < 100_000  # small on disk, 2 MiB decoded
    decoded = []
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *a, **k: decoded.append(1))
    config = ImagePreprocessConfig(max_decoded_bytes=1 << 20)
    with pytest.raises(ImageLoadError, match=r"64 band\(s\) of 16 bits.*2 MiB > max_decoded_bytes=1 MiB"):
        load_image(path, config)
    assert decoded == []
    big = tmp_path / "wide.png"
    Image.new("RGB", (2048, 1024)).save(big)
    with pytest.raises(ImageLoadError, match="decodes to 6 MiB"):
        load_image(big, ImagePreprocessConfig(max_decoded_bytes=4 << 20))


def test_6_a_batch_holds_one_full_resolution_image_at_a_time(deployment, tmp_path, monkeypatch):  # noqa: F811
    import galr.preprocess.image as image_module

    paths = [tmp_path / f"big_{i}.png" for i in range(4)]
    for i, path in enumerate(paths):
        Image.new("RGB", (1500, 1200), (i * 40, 10, 10)).save(path)
    alive: list[weakref.ref] = []
    peak = []
    real = image_module.load_image

    def tracked(source, config=None):
        picture = real(source, config)
        alive.append(weakref.ref(picture))
        peak.append(sum(ref() is not None for ref in alive))
        return picture

    monkeypatch.setattr(image_module, "load_image", tracked)
    encoders = load_engine(deployment["bundle"], backend="onnxruntime", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no detections: the documented fallback
        embeddings = encoders.encode_images(paths)
    assert embeddings.shape == (4, encoders.embed_dim) and max(peak) == 1


def test_7_members_are_checked_before_anything_is_inflated(tmp_path):
    manifest, members = manifest_and_members()
    from galr.bundle import write_bundle

    good = write_bundle(tmp_path / "good.plan", manifest, members)
    with zipfile.ZipFile(good) as archive:
        raw = {info.filename: archive.read(info) for info in archive.infolist()}
    compressed = tmp_path / "deflated.plan"
    with zipfile.ZipFile(compressed, "w") as archive:
        for name, data in raw.items():
            archive.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if name.endswith(".onnx") else None)
    with pytest.raises(BundleError, match="compressed .*stores members uncompressed"):
        read_bundle(compressed).onnx_bytes("text")
    table = json.loads(raw["manifest.json"])
    table["members"]["onnx/fp32/text.onnx"]["size"] = 10 ** 9  # declares 1 GB: refused by the zip's own size
    table["manifest_sha256"] = table_sha256(table, "manifest_sha256")
    lying = tmp_path / "lying.plan"
    with zipfile.ZipFile(lying, "w") as archive:
        for name, data in {**raw, "manifest.json": json.dumps(table).encode()}.items():
            archive.writestr(name, data)
    with pytest.raises(BundleError, match=r"is \d+ bytes, the table says 1000000000"):
        read_bundle(lying).onnx_bytes("text")
    huge = tmp_path / "huge.plan"
    with zipfile.ZipFile(huge, "w") as archive:
        archive.writestr("manifest.json", b" " * (17 << 20), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(BundleError, match="compressed|implausibly large"):
        read_bundle(huge)


def test_8_a_megabyte_query_line_is_cut_with_a_warning(deployment, tmp_path):  # noqa: F811
    queries = tmp_path / "q.txt"
    queries.write_text("two planes\n" + "a. " * 350_000 + "\nmany ships\n", encoding="utf-8")
    result = run(run_main, queries, "--engine", deployment["bundle"], "--index", deployment["index"])
    assert result.exit_code == 0, result.output
    assert "warning: line 2" in result.output and "longer than 2048 characters" in result.output
    assert "[3] many ships" in result.output


# ---------------------------------------------------------------------------------------------------
# 9-14: wrong results and tracebacks


def _rewritten_bundle(source: Path, target: Path, replace: dict[str, bytes], rehash_members: bool = True) -> Path:
    """A copy of a bundle with members replaced, their hashes (and the manifest's own) updated to match."""
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(members["manifest.json"])
    members.update(replace)
    if rehash_members:
        for name, data in replace.items():
            manifest["members"][name] = {"sha256": sha256_bytes(data), "size": len(data)}
    manifest["manifest_sha256"] = table_sha256(manifest, "manifest_sha256")
    members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return target


def test_9_a_graph_swapped_under_the_manifest_is_refused(deployment, tmp_path):  # noqa: F811
    from galr.config import GaLRConfig
    from galr.export.onnx_export import export_graph
    from galr.model import GaLR

    other = export_graph(GaLR(GaLRConfig.small(vocab_size=11)).eval(), "text").SerializeToString()
    swapped = _rewritten_bundle(deployment["bundle"], tmp_path / "swapped.plan", {"onnx/fp32/text.onnx": other})
    read_bundle(swapped, verify=True)  # every member passes its own hash...
    result = run(run_main, deployment["queries"], "--engine", swapped, "--index", deployment["index"])
    one_line_error(result, 2, "not the model its manifest names")  # ...but the model is another one


def _flip_outcome(path: Path, position: int, value: int, baseline, probe) -> str:
    data = bytearray(path.read_bytes())
    data[position] ^= value
    damaged = path.with_name("flipped" + path.suffix)
    damaged.write_bytes(bytes(data))
    try:
        outcome = probe(damaged)
    except (GalrError, OSError) as exc:
        assert exit_code_for(exc) == 2 and str(exc), (position, value, exc)
        return "refused"
    assert outcome == baseline, f"byte {position} ^ {value:#x} changed the results and was accepted"
    return "same"


def _structural_positions(path: Path) -> list[int]:
    """Bytes outside member payloads: zip headers, names, the directory, the table of contents."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    size = path.stat().st_size
    payload = np.zeros(size, dtype=bool)
    for info in infos:
        if info.filename in ("manifest.json", "header.json", "records.json", "text_bank.json"):
            continue
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        payload[start + 128:start + info.compress_size] = True  # a .npy header stays structural
    return np.flatnonzero(~payload).tolist()


def _bundle_probe(bundle: Path):
    def probe(path: Path):
        with load_engine(path, backend="onnxruntime", device="cpu", precision="fp32") as encoders:
            return np.round(encoders.encode_text(["two white planes"]), 5).tolist()
    return probe, probe(bundle)


def _index_probe(index: Path, queries: np.ndarray):
    def probe(path: Path):
        loaded = load_index(path)
        found = loaded.search(queries, 5, device="cpu")
        return found.ids, np.round(found.scores, 5).tolist(), loaded.text_bank_texts
    return probe, probe(index)


def _sample(positions: list[int], count: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(positions, size=min(count, len(positions)), replace=False).tolist())


def test_10_byte_flips_in_a_bundle_give_the_same_answer_or_exit_2(deployment):  # noqa: F811
    probe, baseline = _bundle_probe(deployment["bundle"])
    positions = _structural_positions(deployment["bundle"])
    structural = set(positions)
    payload = [p for p in range(deployment["bundle"].stat().st_size) if p not in structural]
    outcomes = [_flip_outcome(deployment["bundle"], p, v, baseline, probe)
                for p in _sample(positions, 30, 1) + _sample(payload, 6, 2) for v in (0xFF,)]
    assert "refused" in outcomes


def test_10_byte_flips_in_an_index_give_the_same_answer_or_exit_2(deployment):  # noqa: F811
    queries = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32)
    probe, baseline = _index_probe(deployment["index"], queries)
    positions = _structural_positions(deployment["index"])
    outcomes = [_flip_outcome(deployment["index"], p, v, baseline, probe)
                for p in _sample(positions, 60, 4) for v in (0x01, 0x80)]
    assert outcomes.count("refused") > len(outcomes) // 2


@pytest.mark.slow
@pytest.mark.parametrize("which", ["bundle", "index"])
def test_10_every_structural_byte_flip_gives_the_same_answer_or_exit_2(deployment, which):  # noqa: F811
    path = deployment[which]
    queries = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32)
    probe, baseline = _bundle_probe(path) if which == "bundle" else _index_probe(path, queries)
    for position in _structural_positions(path):
        for value in (0x01, 0x20, 0xFF):
            _flip_outcome(path, position, value, baseline, probe)


def test_10_zip_level_damage_is_refused_in_one_line(deployment, tmp_path):  # noqa: F811
    data = deployment["bundle"].read_bytes()
    eocd = data.rindex(b"PK\x05\x06")
    first = zipfile.ZipFile(deployment["bundle"]).infolist()[0]
    cases = {
        "encrypted": (first.header_offset + 6, 0x01),  # general purpose flag, bit 0
        "method": (first.header_offset + 8, 0x63),  # an unknown compression method
        "entries": (eocd + 10, 0x40),  # the directory's entry count
        "directory offset": (eocd + 16, 0x10),
    }
    for name, (position, value) in cases.items():
        damaged = bytearray(data)
        damaged[position] ^= value
        path = tmp_path / f"{name}.plan"
        path.write_bytes(bytes(damaged))
        result = run(run_main, deployment["queries"], "--engine", path, "--index", deployment["index"])
        assert result.exit_code in (0, 2), (name, result.output)
        if result.exit_code == 2:
            one_line_error(result, 2, str(path))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: [], "a list, not an object"),
        (lambda m: None, "a NoneType, not an object"),
        (lambda m: {**m, "members": list(m["members"])}, "'members' must be an object"),
        (lambda m: {**m, "members": {**m["members"], "onnx/fp32/text.onnx": {"size": 1}}}, "sha256 must be 64"),
        (lambda m: {**m, "colour": "red"}, "unknown fields ['colour']"),
        (lambda m: {**m, "format_version": "1"}, "version '1' is not supported"),
        (lambda m: {**m, "vocab": {"word2idx": {"a": 1}}}, "no '<unk>' entry"),
        (lambda m: {**m, "onnx": {"fp32": {"text": "onnx/fp32/text.onnx"}}}, "must name the graphs"),
        (lambda m: {**m, "preprocess": {**m["preprocess"], "size": "big"}}, "inconsistent"),
    ],
)
def test_11_manifests_of_the_wrong_shape_say_what_is_wrong(tmp_path, change, message):
    from galr.bundle import write_bundle

    good = write_bundle(tmp_path / "good.plan", *manifest_and_members())
    with zipfile.ZipFile(good) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(members.pop("manifest.json"))
    manifest.pop("manifest_sha256")
    path = tmp_path / "bad.plan"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("manifest.json", json.dumps(change(manifest)))
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(BundleError) as raised:
        read_bundle(path)
    assert message in str(raised.value) and str(path) in str(raised.value)


def test_12_a_corrupt_graph_with_a_matching_hash_is_one_line(deployment, tmp_path, monkeypatch):  # noqa: F811
    bundle = _rewritten_bundle(deployment["bundle"], tmp_path / "junk.plan", {"onnx/fp32/local.onnx": b"not onnx"})
    monkeypatch.setattr("galr.bundle.archive.Bundle.verify_model_hash", lambda self: None)  # past the model hash
    result = run(run_main, deployment["queries"], "--engine", bundle, "--index", deployment["index"])
    one_line_error(result, 2, "onnxruntime could not load")
    images = deployment["root"] / "images"
    result = run(index_main, images, "--engine", bundle, "-o", tmp_path / "g.gidx", "--no-progress")
    one_line_error(result, 2, "onnxruntime could not load")


def test_13_write_failures_are_one_line_and_keep_the_old_index(tmp_path, monkeypatch):
    from galr.runtime.cli import index as cli

    write_image(tmp_path / "images" / "a.png", 1)
    write_image(tmp_path / "more" / "b.png", 2)
    (tmp_path / "galr.plan").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load_engine", lambda *a, **k: FakeEngine())
    assert run(index_main, "images", "--no-progress").exit_code == 0
    before = (tmp_path / "gallery.gidx").read_bytes()
    for code, text in ((errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")):
        def fail(source, target, code=code, text=text):
            raise OSError(code, text, str(target))

        monkeypatch.setattr("galr.atomic.os.replace", fail)
        result = run(index_main, "more", "--update", "--root", ".", "--no-progress")
        one_line_error(result, 2, text)
        assert (tmp_path / "gallery.gidx").read_bytes() == before
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load_engine", lambda *a, **k: FakeEngine())
    result = run(index_main, "images", "-o", "no/such/folder/g.gidx", "--no-progress")
    one_line_error(result, 2, "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery.gidx", "gallery.gidx.lock", "galr.plan", "images",
                                                          "more"]


def test_14_a_folder_as_the_query_file_is_one_line(deployment, tmp_path):  # noqa: F811
    result = run(run_main, tmp_path, "--engine", deployment["bundle"], "--index", deployment["index"])
    one_line_error(result, 2, "is a folder")


# ---------------------------------------------------------------------------------------------------
# 15-18: errors people can use


def test_15_unusable_lines_are_skipped_with_their_line_number_in_order(deployment, tmp_path):  # noqa: F811
    queries = tmp_path / "q.txt"
    queries.write_text("# queries\ntwo planes\n!!!\nxyzzy qwerty\n\n?.,\nmany ships\n", encoding="utf-8")
    result = run(run_main, queries, "--engine", deployment["bundle"], "--index", deployment["index"])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert [w.split()[1] for w in warned] == ["line", "line", "line"]
    assert [w.split()[2] for w in warned] == ["3", "4", "6"]
    assert "skipped" in warned[0] and "no word in the model's vocabulary" in warned[1] and "skipped" in warned[2]
    assert "[1] two planes" in result.output and "[3] many ships" in result.output
    only_punctuation = tmp_path / "p.txt"
    only_punctuation.write_text("!!!\n", encoding="utf-8")
    result = run(run_main, only_punctuation, "--engine", deployment["bundle"], "--index", deployment["index"])
    assert result.exit_code == 1 and "none of the 1 queries" in result.output


def test_16_a_single_string_is_one_query(deployment):  # noqa: F811
    encoders = load_engine(deployment["bundle"], backend="onnxruntime", device="cpu")
    assert encoders.encode_text("two planes").shape == (1, encoders.embed_dim)
    retriever = Retriever(encoders, load_index(deployment["index"]))
    results = retriever.search_text("two planes", top_k=3)
    assert len(results) == 1 and results[0].query == "two planes" and len(results[0].hits) == 3


def test_17_names_and_queries_cannot_forge_rows_or_reach_the_terminal(deployment, tmp_path, monkeypatch):  # noqa: F811
    queries = tmp_path / "q.txt"
    queries.write_text("two planes \x1b]0;owned\x07 \x1b[2J\n", encoding="utf-8")
    index = load_index(deployment["index"])
    from galr.runtime.index import ImageRecord

    record = index.records[0]
    index.update([ImageRecord(record.id, record.path, 8, 8)], index.image_vectors()[:1])
    forged = ImageRecord("evil\n  1   0.999   -  forged.png\x1b[31m", record.path, 8, 8)
    index.add([forged], index.image_vectors()[:1])
    path = index.save(tmp_path / "g.gidx")
    result = run(run_main, queries, "--engine", deployment["bundle"], "--index", path, "--top-k", "13")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "evil\\n  1   0.999" in result.output and not any(line.strip().startswith("1   0.999   -  forged")
                                                                for line in result.output.splitlines())


def test_18_a_loop_of_links_is_listed_as_skipped(tmp_path):
    write_image(tmp_path / "a.png", 1)
    (tmp_path / "loop1.png").symlink_to(tmp_path / "loop2.png")
    (tmp_path / "loop2.png").symlink_to(tmp_path / "loop1.png")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    found, skipped = scan_image_files(tmp_path)
    assert [p.name for p in found] == ["a.png"]
    assert [Path(s.path).name for s in skipped] == ["dangling.jpg", "loop1.png", "loop2.png"]
    assert all("cannot be read" in s.reason for s in skipped)


def test_18_pillows_own_warnings_become_one_galr_warning_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "large.png"
    Image.new("RGB", (300, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 200 - 1)  # Pillow warns between 1x and 2x this
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_image(path, ImagePreprocessConfig(max_pixels=10 ** 9))
    assert [w.category for w in caught] == [ImageWarning]
    assert str(caught[0].message).startswith(f"{path}: Image size (60000 pixels) exceeds limit")


def test_18_a_refused_checkpoint_says_why_in_whole_sentences(tmp_path):
    import os

    import torch

    from galr.model import CheckpointError, load_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(tmp_path / "evil.pt")
    message = str(raised.value)
    assert "asks to run code (posix.system), which galr never does" in message
    assert message.endswith("unless you trust its source") and "[...]" not in message


def test_the_lock_timeout_is_a_busy_error(tmp_path):
    from galr.atomic import exclusive_lock
    from galr.errors import BusyError

    started = time.monotonic()
    with exclusive_lock(tmp_path / "x", timeout=1):
        child = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import sys; sys.path.insert(0, {str(REPO)!r})
            from galr.atomic import exclusive_lock
            from galr.errors import BusyError
            try:
                with exclusive_lock({str(tmp_path / 'x')!r}, timeout=0.2):
                    print('got it')
            except BusyError as exc:
                print('busy', exc.exit_code)
        """)], capture_output=True, text=True, timeout=60)
    assert child.stdout.strip() == "busy 2", child.stderr
    assert issubclass(BusyError, GalrError) and time.monotonic() - started < 60
