"""galr.plan bundle integrity: what a corrupt, truncated or foreign file does."""

from __future__ import annotations

import json
import zipfile

import pytest

from galr.runtime.bundle import BundleError, read_bundle, update_bundle, write_bundle

MANIFEST = {"model": {"embed_dim": 4}, "vocab": {}, "model_hash": "abc", "onnx": {"fp32": {"text": "onnx/fp32/text.onnx"}}}


@pytest.fixture
def bundle_path(tmp_path):
    return write_bundle(tmp_path / "galr.plan", MANIFEST, {"onnx/fp32/text.onnx": b"graph-bytes"})


def test_round_trip_reads_members_without_extracting(bundle_path, tmp_path):
    bundle = read_bundle(bundle_path, verify=True)
    assert bundle.onnx_bytes("text") == b"graph-bytes"
    assert bundle.precisions == ["fp32"] and bundle.model_hash == "abc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["galr.plan"]  # nothing extracted, no temp files
    with zipfile.ZipFile(bundle_path) as archive:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())


def test_missing_precision_names_the_export_flag(bundle_path):
    with pytest.raises(BundleError, match="galr-export --fp16"):
        read_bundle(bundle_path).onnx_bytes("text", "fp16")


def test_corrupt_member_fails_its_hash(bundle_path):
    data = bundle_path.read_bytes().replace(b"graph-bytes", b"graph-BYTES")
    bundle_path.write_bytes(data)
    with pytest.raises(BundleError, match="damaged|SHA-256"):
        read_bundle(bundle_path).onnx_bytes("text")


def test_truncated_file_is_refused(bundle_path):
    bundle_path.write_bytes(bundle_path.read_bytes()[:-40])
    with pytest.raises(BundleError, match="truncated"):
        read_bundle(bundle_path)


def test_missing_member_and_wrong_version(tmp_path):
    path = tmp_path / "b.plan"
    with zipfile.ZipFile(path, "w") as archive:
        manifest = dict(MANIFEST, format="galr-bundle", format_version=1,
                        members={"onnx/fp32/text.onnx": {"sha256": "0" * 64, "size": 1}})
        archive.writestr("manifest.json", json.dumps(manifest))
    with pytest.raises(BundleError, match="members missing"):
        read_bundle(path)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("manifest.json", json.dumps(dict(manifest, format_version=99, members={})))
    with pytest.raises(BundleError, match="version 99 is not supported"):
        read_bundle(path)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not found.*galr-export"):
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
        write_bundle(bundle_path, MANIFEST, {"onnx/fp32/text.onnx": b"new"})
    monkeypatch.undo()
    assert read_bundle(bundle_path, verify=True).onnx_bytes("text") == b"graph-bytes"
    assert [p.name for p in bundle_path.parent.iterdir()] == ["galr.plan"]


def test_update_adds_members_and_keeps_hashes(bundle_path):
    bundle = update_bundle(read_bundle(bundle_path), {"engines": [{"key_string": "k"}]}, {"engines/k/text.plan": b"plan"})
    bundle.verify()
    assert bundle.read_member("engines/k/text.plan") == b"plan" and bundle.engines() == [{"key_string": "k"}]
