"""galr.bundle: the galr.plan format, its schema, engine keys, and what a corrupt or foreign file does."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from galr.bundle import (
    Bundle,
    BundleError,
    EngineEntry,
    EngineKey,
    EngineMismatchError,
    build_bundle,
    check_engine_compatible,
    engine_key,
    engine_member,
    graphs_sha256,
    model_hash,
    onnx_member,
    read_bundle,
    select_engine_entry,
    update_bundle,
    write_bundle,
)
from galr.config import GaLRConfig
from galr.errors import NotFoundError
from galr.graphs import GRAPH_NAMES
from galr.preprocess.spec import PreprocessSpec
from galr.preprocess.text import Vocabulary

CONFIG = GaLRConfig.small(vocab_size=3)
GRAPHS = {name: f"{name}-graph-bytes".encode() for name in GRAPH_NAMES}


def manifest_and_members(precisions=("fp32",)) -> tuple[dict, dict[str, bytes]]:
    """A schema-valid manifest (no torch needed) and its members; graph bytes are placeholders."""
    members = {onnx_member(p, name): data + p.encode() for p in precisions for name, data in GRAPHS.items()}
    manifest = {
        "model": CONFIG.to_dict(),
        "model_hash": model_hash({name: members[onnx_member("fp32", name)] for name in GRAPH_NAMES}),
        "vocab": Vocabulary.from_words(["a", "b"]).to_json_dict(),
        **PreprocessSpec.for_model(CONFIG).to_dict(),
        "onnx": {p: {name: onnx_member(p, name) for name in GRAPH_NAMES} for p in precisions},
    }
    return manifest, members


@pytest.fixture
def bundle_path(tmp_path) -> Path:
    return write_bundle(tmp_path / "galr.plan", *manifest_and_members())


def test_round_trip_reads_members_without_extracting(bundle_path, tmp_path):
    bundle = read_bundle(bundle_path, verify=True)
    assert bundle.onnx_bytes("text") == b"text-graph-bytesfp32"
    assert bundle.precisions == ["fp32"] and bundle.config == CONFIG
    assert bundle.spec == PreprocessSpec.for_model(CONFIG) and bundle.vocab.unk_id == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["galr.plan"]  # nothing extracted, no temp files
    with zipfile.ZipFile(bundle_path) as archive:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())


def test_model_hash_is_the_fp32_graphs_in_graph_order():
    manifest, members = manifest_and_members()
    joined = b"".join(members[onnx_member("fp32", name)] for name in GRAPH_NAMES)
    import hashlib

    assert manifest["model_hash"] == hashlib.sha256(joined).hexdigest()


def test_an_in_memory_bundle_is_written_once_as_it_was_checked(tmp_path):
    manifest, members = manifest_and_members(("fp32", "fp16"))
    target = tmp_path / "out.plan"
    bundle = build_bundle(target, manifest, members)
    assert not target.exists() and bundle.precisions == ["fp32", "fp16"]
    assert bundle.onnx_bytes("global", "fp16") == b"global-graph-bytesfp16"
    on_disk = bundle.save()
    assert on_disk.manifest == bundle.manifest
    assert on_disk.path == target and on_disk.onnx_bytes("global", "fp16") == b"global-graph-bytesfp16"


def test_new_bundle_gets_the_usual_file_mode(tmp_path):
    import os

    previous = os.umask(0o022)
    try:
        path = write_bundle(tmp_path / "mode.plan", *manifest_and_members())
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_missing_precision_names_the_export_flag(bundle_path):
    with pytest.raises(BundleError, match="galr-export --fp16"):
        read_bundle(bundle_path).onnx_bytes("text", "fp16")


def test_corrupt_member_fails_its_hash(bundle_path):
    data = bundle_path.read_bytes().replace(b"text-graph-bytes", b"text-graph-BYTES")
    bundle_path.write_bytes(data)
    with pytest.raises(BundleError, match="damaged.*Re-export"):
        read_bundle(bundle_path).onnx_bytes("text")


def test_truncated_file_is_refused(bundle_path):
    bundle_path.write_bytes(bundle_path.read_bytes()[:-40])
    with pytest.raises(BundleError, match="not a readable zip|damaged"):
        read_bundle(bundle_path)


def _raw_bundle(path: Path, manifest: object, members: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("manifest.json", json.dumps(manifest))
        for name, data in (members or {}).items():
            archive.writestr(name, data)
    return path


def test_missing_member_and_wrong_version(tmp_path):
    manifest, members = manifest_and_members()
    full = write_bundle(tmp_path / "full.plan", manifest, members)
    written = json.loads(zipfile.ZipFile(full).read("manifest.json"))
    path = _raw_bundle(tmp_path / "b.plan", written)
    with pytest.raises(BundleError, match="members missing"):
        read_bundle(path)
    _raw_bundle(path, dict(written, format_version=99))
    with pytest.raises(BundleError, match="version 99 is not supported"):
        read_bundle(path)


def test_not_a_bundle(tmp_path):
    with pytest.raises(NotFoundError, match="not found.*galr-export"):
        read_bundle(tmp_path / "none.plan")
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(BundleError, match="no manifest"):
        read_bundle(other)


def test_failed_write_keeps_previous_bundle(bundle_path, monkeypatch):
    def broken_writestr(self, name, data, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", broken_writestr)
    with pytest.raises(OSError):
        write_bundle(bundle_path, *manifest_and_members(("fp32", "fp16")))
    monkeypatch.undo()
    assert read_bundle(bundle_path, verify=True).precisions == ["fp32"]
    assert [p.name for p in bundle_path.parent.iterdir()] == ["galr.plan"]


# ---------------------------------------------------------------------------------------------------
# Engine keys and entries

def _entry(bundle: Bundle, precision="fp32", capability="sm_90", version="10.16.1", **extra) -> EngineEntry:
    key = engine_key(bundle, precision, capability, version)
    return EngineEntry(key, "NVIDIA H200", "2026-12-05T00:00:00+00:00",
                       {name: engine_member(key.as_string(), name) for name in GRAPH_NAMES}, **extra)


def test_engine_key_hashes_the_precisions_four_graphs(bundle_path):
    bundle = read_bundle(bundle_path)
    import hashlib

    joined = b"".join(bundle.onnx_bytes(name) for name in GRAPH_NAMES)
    assert graphs_sha256(bundle, "fp32") == hashlib.sha256(joined).hexdigest()
    key = engine_key(bundle, "fp32", "sm_90", "10.16.1")
    assert key.as_string() == f"sm_90-trt10.16.1-fp32-{key.graphs_sha256[:12]}"
    assert EngineKey.from_dict(key.to_dict()) == key
    with pytest.raises(ValueError, match="precision"):
        EngineKey("sm_90", "10.16.1", "bf16", key.graphs_sha256)
    with pytest.raises(ValueError, match="sm_90"):
        EngineKey("9.0", "10.16.1", "fp16", key.graphs_sha256)


def test_engine_entries_round_trip_through_the_bundle(bundle_path):
    bundle = read_bundle(bundle_path)
    entry = _entry(bundle)
    plans = {member: f"plan-{graph}".encode() for graph, member in entry.members.items()}
    updated = update_bundle(bundle, {"engines": [entry.to_dict()]}, plans)
    updated.verify()
    assert updated.engine_entries == [entry]
    assert updated.read_member(entry.members["text"]) == b"plan-text"
    assert select_engine_entry(updated, "fp32", "sm_90", "10.16.1") == entry


@pytest.mark.parametrize(
    "capability, version, expected",
    [
        ("sm_89", "10.16.1", "GPU architecture: engine sm_90, this GPU sm_89"),
        ("sm_90", "11.4.0", "TensorRT: engine built with 10.16.1, installed 11.4.0"),
        ("sm_86", "10.0.1", "GPU architecture.*; TensorRT"),
    ],
)
def test_mismatches_say_what_differs_and_how_to_rebuild(bundle_path, capability, version, expected):
    entry = _entry(read_bundle(bundle_path))
    with pytest.raises(EngineMismatchError, match=expected) as raised:
        check_engine_compatible(entry, capability, version, bundle="models/galr.plan")
    assert "`galr-build models/galr.plan`" in str(raised.value) and raised.value.exit_code == 3


def test_an_engine_from_other_graphs_is_refused(bundle_path):
    entry = _entry(read_bundle(bundle_path))
    with pytest.raises(EngineMismatchError, match=f"ONNX graphs: engine from {entry.key.graphs_sha256[:12]}"):
        check_engine_compatible(entry, "sm_90", "10.16.1", current_graphs_sha256="f" * 64)


def test_version_compatible_engines_load_on_newer_tensorrt_only(bundle_path):
    entry = _entry(read_bundle(bundle_path), version_compatible=True)
    check_engine_compatible(entry, "sm_90", "11.4.0")
    with pytest.raises(EngineMismatchError, match="installed 10.3.0"):
        check_engine_compatible(entry, "sm_90", "10.3.0")


def test_no_engine_of_a_precision_names_the_build_command(bundle_path):
    with pytest.raises(EngineMismatchError, match="no TensorRT fp16 engines.*galr-build"):
        select_engine_entry(read_bundle(bundle_path), "fp16", "sm_90", "10.16.1")
