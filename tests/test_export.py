"""galr-export end to end on a small model: graphs, parity gates (and their failure), FP16, bundle."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from galr import graphs
from galr.bundle import read_bundle
from galr.config import GaLRConfig
from galr.export import pipeline
from galr.export.onnx_export import export_all, export_graph
from galr.model import GaLR, save_checkpoint
from galr.preprocess.text import Vocabulary
from galr.retrieval.parity import ParityError, compare
from galr.runtime.encoders import load_engine

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = GaLRConfig.small(vocab_size=40)
    model = GaLR(config).eval()
    vocab = Vocabulary.from_words([f"word{i}" for i in range(39)])
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    save_checkpoint(path, model, vocab, metadata={"note": "random weights"})
    return path, model, vocab


def test_graphs_are_valid_onnx_with_dynamic_axes(small_checkpoint):
    _, model, _ = small_checkpoint
    protos = export_all(model)
    assert set(protos) == set(graphs.GRAPH_NAMES)
    text = protos[graphs.TEXT]
    assert [n.op_type for n in text.graph.node].count("GRU") == 1  # the GRU stays one node
    dims = text.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "length"]
    meta = {p.key: p.value for p in text.metadata_props}
    assert meta["galr.graph"] == "text" and meta["galr.precision"] == "fp32"
    assert text.opset_import[0].version >= 17


def test_export_writes_a_gated_bundle_that_serves_like_pytorch(small_checkpoint, tmp_path):
    path, model, vocab = small_checkpoint
    out = tmp_path / "galr.plan"
    report = pipeline.export_bundle(pipeline.ExportSettings(checkpoint=path, output=out, fp16=True, tensorrt="no"),
                                    log=lambda _: None)
    for label, stats in report.parity["fp32"].items():
        assert stats["min_cosine"] >= 0.99999 and stats["max_abs_error"] <= 1e-4, label
    assert report.accuracy["fp16"]["vs_fp32_image"]["min_cosine"] >= 0.999
    bundle = read_bundle(out, verify=True)
    assert bundle.precisions == ["fp32", "fp16"]
    manifest = bundle.manifest
    assert manifest["vocab"]["word2idx"] == vocab.word2idx and GaLRConfig.from_dict(manifest["model"]) == model.config
    assert manifest["provenance"]["checkpoint_format"] == "galr" and manifest["reports"]["parity"]
    assert set(manifest["toolchain"]) >= {"galr", "torch", "onnx", "onnxruntime"}
    from galr.model import load_checkpoint

    assert bundle.spec == load_checkpoint(path).spec  # the preprocessing travels from checkpoint to bundle

    encoders = load_engine(out, backend="onnxruntime", device="cpu", precision="fp32")
    captions = ["word1 word2 word3", "word7 the word9"]
    tokens = encoders.tokenizer.encode_batch(captions).tokens
    np.testing.assert_allclose(encoders.encode_text(captions), model.encode_text(torch.from_numpy(tokens)).numpy(),
                               atol=1e-5)
    rng = np.random.default_rng(1)
    images = rng.standard_normal((3, 3, 64, 64)).astype(np.float32)
    rep, adj = rng.random((3, 20, 20), dtype=np.float32), rng.random((3, 20, 20), dtype=np.float32) / 20
    expected = model.encode_image(torch.from_numpy(images), torch.from_numpy(rep), torch.from_numpy(adj)).numpy()
    np.testing.assert_allclose(encoders.encode_images(images, local=(rep, adj)), expected, atol=1e-5)
    half = load_engine(out, backend="onnxruntime", device="cpu", precision="fp16")
    assert compare(expected, half.encode_images(images, local=(rep, adj))).min_cosine >= 0.999


def test_fp16_graph_keeps_io_fp32_and_sensitive_ops_fp32(small_checkpoint):
    from galr.calibration.fp16 import convert_to_fp16

    _, model, _ = small_checkpoint
    half = convert_to_fp16(export_graph(model, graphs.FUSION))
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    types = {i.data_type for i in half.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    # Reductions (LayerNorm statistics, L2 norm) are fed FP32: their inputs are never FP16 casts.
    produced_fp16 = {n.output[0] for n in half.graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16}
    for node in half.graph.node:
        if node.op_type in ("ReduceMean", "ReduceSum", "Sqrt", "Softmax"):
            assert not set(node.input) & produced_fp16, node.name


def test_parity_gate_fails_loudly_on_a_perturbed_graph_and_writes_nothing(small_checkpoint, tmp_path, monkeypatch):
    path, _, _ = small_checkpoint
    out = tmp_path / "galr.plan"
    out.write_bytes(b"previous bundle")
    real_export_all = pipeline.export_all

    def perturbed(model, options):
        protos = real_export_all(model, options)
        weights = protos[graphs.LOCAL].graph.initializer[0]
        array = numpy_helper.to_array(weights).copy()
        array.flat[0] += 0.5
        weights.CopyFrom(numpy_helper.from_array(array, weights.name))
        return protos

    monkeypatch.setattr(pipeline, "export_all", perturbed)
    with pytest.raises(ParityError, match="local"):
        pipeline.export_bundle(pipeline.ExportSettings(checkpoint=path, output=out, tensorrt="no"), log=lambda _: None)
    assert out.read_bytes() == b"previous bundle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["galr.plan"]


def test_export_writes_the_bundle_once_with_a_shareable_mode(small_checkpoint, tmp_path, monkeypatch):
    import os

    from galr import atomic

    path, _, _ = small_checkpoint
    writes = []
    real = atomic.atomic_output

    def counting(target):
        writes.append(str(target))
        return real(target)

    monkeypatch.setattr("galr.container.atomic_output", counting)
    previous = os.umask(0o022)
    try:
        out = tmp_path / "galr.plan"
        pipeline.export_bundle(pipeline.ExportSettings(checkpoint=path, output=out, tensorrt="no"), log=lambda _: None)
    finally:
        os.umask(previous)
    assert writes == [str(out)]  # gates ran on the bundle in memory; the file was written once
    assert out.stat().st_mode & 0o777 == 0o644  # 0666 & ~umask, as any new file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["galr.plan"]


def test_compare_statistics():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    stats = compare(a, np.array([[1.0, 0.1], [0.0, 2.0]]))
    assert stats.rows == 2 and stats.max_abs_error == pytest.approx(0.1)
    assert stats.min_cosine == pytest.approx(1 / np.sqrt(1.01))
    with pytest.raises(ParityError, match="shape"):
        compare(a, a[:1])


@pytest.mark.slow
def test_full_size_export_round_trip(tmp_path):
    model = GaLR(GaLRConfig(vocab_size=30)).eval()
    vocab = Vocabulary.from_words([f"w{i}" for i in range(29)])
    path = save_checkpoint(tmp_path / "full.pt", model, vocab)
    report = pipeline.export_bundle(pipeline.ExportSettings(checkpoint=path, output=tmp_path / "g.plan", fp16=True,
                                                            parity_images=4, tensorrt="no"), log=lambda _: None)
    assert report.parity["fp32"]["image end-to-end"]["min_cosine"] >= 0.99999
