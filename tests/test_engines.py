"""TensorRT engines inside the bundle: building (with a fake TensorRT), keying, selection, refusals,
and serving them through ``load_engine(backend="tensorrt")`` with the fakes injected.

No real TensorRT runs here; these tests check the logic around it.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from galr import graphs
from galr.bundle import EngineMismatchError, read_bundle, select_engine_entry
from galr.config import GaLRConfig
from galr.export import engines as engines_module
from galr.export.cli import build_main
from galr.export.cli import main as export_main
from galr.export.pipeline import ExportSettings, export_bundle
from galr.model import GaLR, save_checkpoint
from galr.preprocess.text import Vocabulary
from galr.runtime.backends.device import GpuInfo, TensorRTInfo
from galr.runtime.backends.registry import Environment
from galr.runtime.backends.tensorrt import TensorRTOptions, TensorRTRunner
from galr.runtime.encoders import load_engine
from tests.fake_tensorrt import V10, V11, IOTensor, add_engine, make_fake_tensorrt
from tests.test_backend_tensorrt import make_fake_cupy

H200 = GpuInfo("NVIDIA H200", "sm_90")
L4 = GpuInfo("NVIDIA L4", "sm_89")
CONFIG = GaLRConfig.small(vocab_size=5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(root / "m.pt", GaLR(CONFIG).eval(), Vocabulary.from_words(["a", "b", "c", "d"]))
    bundle = root / "galr.plan"
    export_bundle(ExportSettings(checkpoint=checkpoint, output=bundle, fp16=True, tensorrt="no"), log=lambda _: None)
    return checkpoint, bundle


@pytest.fixture
def bundle_copy(exported, tmp_path):
    path = tmp_path / "galr.plan"
    path.write_bytes(exported[1].read_bytes())
    return path


@pytest.mark.parametrize("version", [V10, V11])
def test_engines_are_built_keyed_and_selected(bundle_copy, version):
    fake = make_fake_tensorrt(version)
    entries = engines_module.build_bundle_engines(bundle_copy, ["fp16"], trt=fake, log=lambda _: None,
                                                  gpu_probe=lambda: H200)
    assert [e.key.precision for e in entries] == ["fp16"]
    assert entries[0].key_string.startswith(f"sm_90-trt{version}-fp16-")
    bundle = read_bundle(bundle_copy, verify=True)
    entry = select_engine_entry(bundle, "fp16", H200.compute_capability, version)
    assert set(entry.members) == {"global", "local", "fusion", "text"}
    assert bundle.read_member(entry.members["text"]) == b"FAKE-PLAN"
    assert entry.profiles["text"]["tokens"][2] == [32, 64]  # max batch 32, the bundle's max text length 64
    assert bundle.precisions == ["fp32", "fp16"]  # the ONNX graphs are kept beside the engines


def test_rebuilding_replaces_the_same_key(bundle_copy):
    for _ in range(2):
        engines_module.build_bundle_engines(bundle_copy, ["fp32"], trt=make_fake_tensorrt(V11), log=lambda _: None,
                                            gpu_probe=lambda: H200)
    bundle = read_bundle(bundle_copy, verify=True)
    assert len(bundle.engine_entries) == 1
    assert len([m for m in bundle.manifest["members"] if m.startswith("engines/")]) == 4


def test_mismatched_engine_is_refused_with_the_rebuild_command(bundle_copy):
    engines_module.build_bundle_engines(bundle_copy, ["fp16"], trt=make_fake_tensorrt(V10), log=lambda _: None,
                                        gpu_probe=lambda: H200)
    bundle = read_bundle(bundle_copy)
    with pytest.raises(EngineMismatchError, match=r"sm_90.*sm_89.*galr-build"):
        select_engine_entry(bundle, "fp16", L4.compute_capability, V10)
    with pytest.raises(EngineMismatchError, match=r"TensorRT.*galr-build"):
        select_engine_entry(bundle, "fp16", H200.compute_capability, "10.13.3")
    with pytest.raises(EngineMismatchError, match="no TensorRT fp32 engines.*galr-build"):
        select_engine_entry(bundle, "fp32", H200.compute_capability, V10)


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
    assert result.exit_code == 3 and "bundle is unchanged" in result.output
    assert bundle_copy.read_bytes() == before


def test_export_with_tensorrt_required_fails_without_it(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(engines_module, "probe_tensorrt", lambda: None)
    checkpoint, _ = exported
    out = tmp_path / "g.plan"
    result = CliRunner().invoke(export_main, ["--checkpoint", str(checkpoint), "-o", str(out), "--tensorrt", "yes"])
    assert result.exit_code == 3 and "TensorRT is not installed" in result.output and not out.exists()
    auto = CliRunner().invoke(export_main, ["--checkpoint", str(checkpoint), "-o", str(out)])
    assert auto.exit_code == 0, auto.output
    assert "galr-build" in auto.output and read_bundle(out).engine_entries == []


# ---------------------------------------------------------------------------------------------------
# Serving the engines: load_engine(backend="tensorrt") on the fakes

def _plan_per_graph(network) -> bytes:
    return f"PLAN-{network.inputs[0].name}".encode()


def _serving_fakes(bundle_path, skip: str | None = None):
    """Build fake engines into the bundle, one plan per graph, and register an engine for each plan
    that computes a fixed function of its inputs (all but ``skip``)."""
    fake = make_fake_tensorrt(V10, build_result=_plan_per_graph)
    engines_module.build_bundle_engines(bundle_path, ["fp16"], trt=fake, log=lambda _: None, gpu_probe=lambda: H200)
    cupy = make_fake_cupy()
    synchronized = []
    cupy.cuda = types.SimpleNamespace(Stream=lambda non_blocking=False: types.SimpleNamespace(
        ptr=77, synchronize=lambda: synchronized.append(1)))
    d, n, f, s = CONFIG.embed_dim, CONFIG.num_objects, CONFIG.object_dim, CONFIG.image_size
    batch = ((1, 1), (8, 1), (32, 1))

    def profile(*rest):
        return tuple(tuple([b[0], *rest]) for b in batch)

    def rows(value):
        return lambda feeds: {value[0]: np.full((len(next(iter(feeds.values()))), d), value[1], np.float32)}

    engines = {
        graphs.GLOBAL: ([IOTensor(graphs.IMAGE, "float32", (-1, 3, s, s), True, profile(3, s, s)),
                         IOTensor(graphs.GLOBAL_FEATURE, "float32", (-1, d), False)], rows((graphs.GLOBAL_FEATURE, 1.0))),
        graphs.LOCAL: ([IOTensor(graphs.LOCAL_REP, "float32", (-1, n, f), True, profile(n, f)),
                        IOTensor(graphs.LOCAL_ADJ, "float32", (-1, n, n), True, profile(n, n)),
                        IOTensor(graphs.LOCAL_FEATURE, "float32", (-1, d), False)], rows((graphs.LOCAL_FEATURE, 2.0))),
        graphs.FUSION: ([IOTensor(graphs.GLOBAL_FEATURE, "float32", (-1, d), True, profile(d)),
                         IOTensor(graphs.LOCAL_FEATURE, "float32", (-1, d), True, profile(d)),
                         IOTensor(graphs.IMAGE_EMBEDDING, "float32", (-1, d), False)],
                        lambda feeds: {graphs.IMAGE_EMBEDDING: feeds[graphs.GLOBAL_FEATURE] + feeds[graphs.LOCAL_FEATURE]}),
        graphs.TEXT: ([IOTensor(graphs.TOKENS, "int64", (-1, -1), True, ((1, 1), (8, 32), (32, 64))),
                       IOTensor(graphs.TEXT_EMBEDDING, "float32", (-1, d), False)], rows((graphs.TEXT_EMBEDDING, 3.0))),
    }
    first_input = {graphs.GLOBAL: graphs.IMAGE, graphs.LOCAL: graphs.LOCAL_REP, graphs.FUSION: graphs.GLOBAL_FEATURE,
                   graphs.TEXT: graphs.TOKENS}
    for name, (io, compute) in engines.items():
        if name != skip:
            add_engine(fake, f"PLAN-{first_input[name]}".encode(), io, compute, cupy.memory)
    environment = Environment(gpu=H200, tensorrt=TensorRTInfo(V10, 10), cupy_available=True,
                              onnxruntime_providers=("CPUExecutionProvider",))
    options = [TensorRTOptions(trt=fake, cupy=cupy, gpu_probe=lambda: H200)]
    return fake, environment, options, synchronized


def test_load_engine_serves_the_bundles_engines_on_tensorrt(bundle_copy):
    fake, environment, options, _ = _serving_fakes(bundle_copy)
    with load_engine(bundle_copy, backend="tensorrt", options=options, environment=environment) as encoders:
        assert (encoders.info.backend, encoders.info.device, encoders.info.precision) == ("tensorrt", "cuda", "fp16")
        assert all(isinstance(runner, TensorRTRunner) for runner in encoders.runners.values())
        text = encoders.encode_text(["a b", "c"])
        np.testing.assert_allclose(text, np.full((2, CONFIG.embed_dim), 1 / np.sqrt(CONFIG.embed_dim)), rtol=1e-6)
        image = encoders.encode_image_arrays(np.zeros((3, 3, 64, 64), np.float32),
                                             np.zeros((3, 20, 20), np.float32), np.zeros((3, 20, 20), np.float32))
        np.testing.assert_allclose(image, np.full((3, CONFIG.embed_dim), 1 / np.sqrt(CONFIG.embed_dim)), rtol=1e-6)
    assert len([c for c in fake.calls if c[0] == "deserialize_cuda_engine"]) == 4


def test_auto_prefers_tensorrt_when_the_machine_has_it(bundle_copy):
    _, environment, options, _ = _serving_fakes(bundle_copy)
    with load_engine(bundle_copy, options=options, environment=environment) as encoders:
        assert encoders.info.backend == "tensorrt" and "NVIDIA H200" in encoders.info.describe()


def test_a_runner_that_fails_to_start_closes_the_ones_already_started(bundle_copy):
    fake, environment, options, synchronized = _serving_fakes(bundle_copy, skip=graphs.TEXT)
    with pytest.raises(EngineMismatchError, match="could not deserialize"):
        load_engine(bundle_copy, backend="tensorrt", options=options, environment=environment)
    started = len([c for c in fake.calls if c[0] == "create_execution_context"])
    assert started == 3 and len(synchronized) == 3  # global, local, fusion started, then each closed
