"""TensorRT engines inside the bundle: building (with a fake TensorRT), keying, selection, refusals.

No real TensorRT runs here; these tests check the logic around it.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from galr.config import GaLRConfig
from galr.export import engines as engines_module
from galr.export.cli import build_main, main as export_main
from galr.export.pipeline import ExportSettings, export_bundle
from galr.model import GaLR, save_checkpoint
from galr.preprocess.text import Vocabulary
from galr.runtime.backends.device import GpuInfo, TensorRTInfo
from galr.runtime.backends.tensorrt import EngineMismatchError
from galr.runtime.bundle import read_bundle
from galr.runtime.encoders import select_engine
from tests.fake_tensorrt import V10, V11, make_fake_tensorrt

H200 = GpuInfo("NVIDIA H200", "sm_90")
L4 = GpuInfo("NVIDIA L4", "sm_89")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(root / "m.pt", GaLR(GaLRConfig.small(vocab_size=5)).eval(),
                                 Vocabulary.from_words(["a", "b", "c", "d"]))
    bundle = root / "galr.plan"
    export_bundle(ExportSettings(checkpoint=checkpoint, output=bundle, fp16=True, tensorrt="no"), log=lambda _: None)
    return checkpoint, bundle


@pytest.fixture
def bundle_copy(exported, tmp_path):
    path = tmp_path / "galr.plan"
    path.write_bytes(exported[1].read_bytes())
    return path


@pytest.mark.parametrize("version", [V10, V11])
def test_engines_are_built_keyed_and_selected(bundle_copy, monkeypatch, version):
    monkeypatch.setattr(engines_module, "probe_gpu", lambda: H200)
    fake = make_fake_tensorrt(version)
    entries = engines_module.build_bundle_engines(bundle_copy, ["fp16"], trt=fake, log=lambda _: None)
    assert [e["key"]["precision"] for e in entries] == ["fp16"]
    assert entries[0]["key_string"].startswith(f"sm_90-trt{version}-fp16-")
    bundle = read_bundle(bundle_copy, verify=True)
    entry = select_engine(bundle, "fp16", gpu=H200, trt_version=version)
    assert set(entry["members"]) == {"global", "local", "fusion", "text"}
    assert bundle.read_member(entry["members"]["text"]) == b"FAKE-PLAN"
    assert entry["profiles"]["text"]["tokens"][2] == [32, 64]  # max batch 32, max text length 64
    assert bundle.precisions == ["fp32", "fp16"]  # the ONNX graphs are kept beside the engines


def test_rebuilding_replaces_the_same_key(bundle_copy, monkeypatch):
    monkeypatch.setattr(engines_module, "probe_gpu", lambda: H200)
    for _ in range(2):
        engines_module.build_bundle_engines(bundle_copy, ["fp32"], trt=make_fake_tensorrt(V11), log=lambda _: None)
    bundle = read_bundle(bundle_copy, verify=True)
    assert len(bundle.engines()) == 1 and len([m for m in bundle.manifest["members"] if m.startswith("engines/")]) == 4


def test_mismatched_engine_is_refused_with_the_rebuild_command(bundle_copy, monkeypatch):
    monkeypatch.setattr(engines_module, "probe_gpu", lambda: H200)
    engines_module.build_bundle_engines(bundle_copy, ["fp16"], trt=make_fake_tensorrt(V10), log=lambda _: None)
    bundle = read_bundle(bundle_copy)
    with pytest.raises(EngineMismatchError, match=r"sm_90.*sm_89.*galr-build"):
        select_engine(bundle, "fp16", gpu=L4, trt_version=V10)
    with pytest.raises(EngineMismatchError, match=r"TensorRT.*galr-build"):
        select_engine(bundle, "fp16", gpu=H200, trt_version="10.13.3")
    with pytest.raises(EngineMismatchError, match="no TensorRT fp32 engines.*galr-build"):
        select_engine(bundle, "fp32", gpu=H200, trt_version=V10)


def test_no_tensorrt_or_no_gpu_is_reported_plainly(bundle_copy, monkeypatch):
    before = bundle_copy.read_bytes()
    monkeypatch.setattr(engines_module, "probe_tensorrt", lambda: None)
    with pytest.raises(engines_module.EngineBuildUnavailable, match="TensorRT is not installed"):
        engines_module.build_bundle_engines(bundle_copy, log=lambda _: None)
    monkeypatch.setattr(engines_module, "probe_tensorrt", lambda: TensorRTInfo("10.16.1", 10))
    monkeypatch.setattr(engines_module, "probe_gpu", lambda: None)
    with pytest.raises(engines_module.EngineBuildUnavailable, match="no CUDA GPU"):
        engines_module.build_bundle_engines(bundle_copy, log=lambda _: None)
    result = CliRunner().invoke(build_main, [str(bundle_copy)])
    assert result.exit_code == 4 and "bundle is unchanged" in result.output
    assert bundle_copy.read_bytes() == before


def test_export_with_tensorrt_required_fails_without_it(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(engines_module, "probe_tensorrt", lambda: None)
    checkpoint, _ = exported
    out = tmp_path / "g.plan"
    result = CliRunner().invoke(export_main, ["--checkpoint", str(checkpoint), "-o", str(out), "--tensorrt", "yes"])
    assert result.exit_code == 4 and "cannot run here" in result.output and not out.exists()
    auto = CliRunner().invoke(export_main, ["--checkpoint", str(checkpoint), "-o", str(out)])
    assert auto.exit_code == 0, auto.output
    assert "galr-build" in auto.output and read_bundle(out).engines() == []
