"""The ``int8-cpu`` set (issue 16): graphs for ONNX Runtime's CPU kernels, its gates, and its choice at runtime."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from galr import graphs
from galr.bundle import EngineKey, build_bundle, read_bundle
from galr.calibration.int8 import CalibrationError, CalibrationSettings, cpu_text
from galr.calibration.int8.cpu import (
    CPU_INT8,
    CpuInt8Settings,
    build_cpu_int8_graphs,
    optimised_op_counts,
)
from galr.calibration.int8.cpu_text import CpuTextSettings, build_cpu_text_graph
from galr.config import GaLRConfig
from galr.data import RetrievalSplit, write_split
from galr.errors import InputError
from galr.export import pipeline
from galr.export.onnx_export import export_all
from galr.model import GaLR, save_checkpoint
from galr.preprocess.spec import PreprocessSpec
from galr.preprocess.text import Vocabulary
from galr.retrieval.evaluate import SplitInputs
from galr.retrieval.parity import ParityError
from galr.runtime.backends.registry import BackendChoice, Environment
from galr.runtime.encoders import _resolve_precision, load_engine

torch.set_grad_enabled(False)
CPU_ONLY = Environment(gpu=None, tensorrt=None, cupy_available=False, onnxruntime_providers=("CPUExecutionProvider",))
WORDS = 39
NOISY_MR = {"max_mr_drop_int8": 100.0, "max_mr_drop_int8_cpu": 100.0, "max_mr_drop_cpu_text": 100.0}


def _cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    dots = np.einsum("ij,ij->i", reference.astype(np.float64), candidate.astype(np.float64))
    return dots / (np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1))


def _session(graph: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(graph, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = GaLRConfig.small(vocab_size=WORDS + 1)
    model = GaLR(config).eval()
    fp32 = {name: proto.SerializeToString() for name, proto in export_all(model).items()}
    return model, fp32


def _tokens(config: GaLRConfig) -> np.ndarray:
    """Rows of several lengths: full, half padded, one token, and no token at all (the quirk's row)."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, config.vocab_size + 1, (5, 9)).astype(np.int64)
    tokens[1, 5:] = 0
    tokens[2, 1:] = 0
    tokens[3, :] = 0
    return tokens


# ---------------------------------------------------------------------------------------------- text graph


def test_loop_text_graph_without_quantisation_is_the_fp32_graph(tiny):
    model, fp32 = tiny
    tokens = _tokens(model.config)
    expected = _session(fp32[graphs.TEXT]).run(None, {graphs.TOKENS: tokens})[0]
    for large in (None, "fp32"):  # one loop; and the If on the batch size (5 rows: its large branch)
        loop = build_cpu_text_graph(fp32[graphs.TEXT], CpuTextSettings(kernel="fp32", quantize_input=False,
                                                                       large_batch_kernel=large))
        got = _session(loop).run(None, {graphs.TOKENS: tokens})[0]
        np.testing.assert_allclose(got, expected, atol=2e-6)
        np.testing.assert_allclose(got, model.encode_text(torch.from_numpy(tokens)).numpy(), atol=2e-6)
        for row in range(len(tokens)):  # batch 1, the If's small branch
            one = _session(loop).run(None, {graphs.TOKENS: tokens[row:row + 1]})[0]
            np.testing.assert_allclose(one, expected[row:row + 1], atol=2e-6)


@pytest.mark.parametrize("kernel, large", [("matmulnbits", None), ("dynamic", None), ("matmulnbits", "dynamic")])
@pytest.mark.parametrize("quantize_output", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_int8_text_graph_stays_close_to_torch(tiny, kernel, large, quantize_output, rows):
    model, fp32 = tiny
    tokens = _tokens(model.config)[:rows]
    graph = build_cpu_text_graph(fp32[graphs.TEXT], CpuTextSettings(kernel=kernel, block_size=16, large_batch_kernel=large,
                                                                    quantize_output=quantize_output))
    got = _session(graph).run(None, {graphs.TOKENS: tokens})[0]
    reference = model.encode_text(torch.from_numpy(tokens)).numpy()
    assert got.shape == reference.shape
    assert _cosines(reference, got).min() >= 0.999
    assert not np.array_equal(got, reference)  # the weights really are INT8
    assert {p.key: p.value for p in onnx.load_from_string(graph).metadata_props}[graphs.META_GRAPH] == graphs.TEXT


def test_nbits_packing_round_trips_within_half_a_step():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((40, 6)).astype(np.float32)  # K = 40 pads to 3 blocks of 16
    blobs, scales = cpu_text._nbits_weights(weight, 16)
    assert blobs.dtype == np.uint8 and blobs.shape == (6, 3, 16) and scales.shape == (18,)
    per_block = scales.reshape(6, 3)
    restored = ((blobs.astype(np.float32) - 128.0) * per_block[:, :, None]).reshape(6, 48).T[:40]
    steps = np.repeat(per_block.T, 16, axis=0)[:40]
    assert np.all(np.abs(restored - weight) <= steps / 2 + 1e-7)


def test_matmulnbits_node_multiplies_like_numpy():
    """The packed weight through ORT's own MatMulNBits kernel, against numpy."""
    rng = np.random.default_rng(1)
    weight, x = rng.standard_normal((64, 24)).astype(np.float32), rng.standard_normal((3, 64)).astype(np.float32)
    builder = cpu_text._Builder("t")
    out = cpu_text._matmul(builder, "x", weight, "matmulnbits", 32, "w")
    graph = helper.make_graph(builder.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [3, 24])],
                              initializer=builder.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    got = _session(model.SerializeToString()).run(None, {"x": x})[0]
    assert _cosines(x @ weight, got).min() >= 0.999


def test_text_graph_from_a_foreign_graph_is_refused(tiny):
    _, fp32 = tiny
    with pytest.raises(CalibrationError, match="exactly one GRU"):
        build_cpu_text_graph(fp32[graphs.FUSION])
    with pytest.raises(CalibrationError, match="kernel must be one of"):
        CpuTextSettings(kernel="int4")
    with pytest.raises(CalibrationError, match="large_batch_from must be at least 2"):
        CpuTextSettings(large_batch_from=1)


# ---------------------------------------------------------------------------------------------- kernels


@pytest.fixture(scope="module")
def cpu_set(tiny):
    model, fp32 = tiny
    config = model.config
    vocab = Vocabulary.from_words([f"word{i}" for i in range(WORDS)])
    rng = np.random.default_rng(0)
    n = 10
    captions = tuple(" ".join(rng.choice(vocab.words(), size=rng.integers(3, 9))) for _ in range(n * 5))
    inputs = SplitInputs(tuple(f"img_{i}.png" for i in range(n)),
                         rng.standard_normal((n, 3, config.image_size, config.image_size), dtype=np.float32),
                         rng.random((n, config.num_objects, config.object_dim), dtype=np.float32),
                         rng.random((n, config.num_objects, config.num_objects), dtype=np.float32) / config.num_objects,
                         captions)
    settings = CpuInt8Settings(text=CpuTextSettings(block_size=16))
    return build_cpu_int8_graphs(fp32, vocab, PreprocessSpec.for_model(config), CalibrationSettings(batch_size=5),
                                 settings, log=lambda _: None, inputs=inputs)


def test_ort_runs_integer_kernels_on_the_cpu_set(cpu_set, tiny):
    graphs_, report = cpu_set
    _, fp32 = tiny
    global_ops = optimised_op_counts(graphs_[graphs.GLOBAL])
    assert global_ops.get("QLinearConv", 0) >= 10 and "Conv" not in global_ops  # every convolution is integer
    assert "QLinearAdd" in global_ops  # residual additions stay INT8 between convolutions
    text_ops = optimised_op_counts(graphs_[graphs.TEXT])
    assert text_ops.get("MatMulNBits", 0) >= 2 and "GRU" not in text_ops and text_ops.get("Loop") == 1
    assert "If" not in text_ops and "DynamicQuantizeMatMul" not in text_ops  # one loop by default
    both = optimised_op_counts(build_cpu_text_graph(fp32[graphs.TEXT], CpuTextSettings(large_batch_kernel="dynamic")))
    assert both.get("Loop") == 2 and "If" in both and both.get("DynamicQuantizeMatMul", 0) >= 2
    assert "GRU" in optimised_op_counts(fp32[graphs.TEXT])  # the FP32 graph: no integer kernel
    assert report["graphs"][graphs.GLOBAL]["integer_kernels"]["QLinearConv"] == global_ops["QLinearConv"]
    assert graphs_[graphs.LOCAL] == fp32[graphs.LOCAL] and report["fp32_graphs"] == [graphs.LOCAL, graphs.FUSION]


def test_cpu_image_graph_uses_u8_activations_and_s8_per_channel_weights(cpu_set):
    graphs_, report = cpu_set
    model = onnx.load_from_string(graphs_[graphs.GLOBAL])
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    activation_points = [constants[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activation_points and all(p.dtype == np.uint8 for p in activation_points)
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants
                 and constants[n.input[0]].dtype == np.int8]
    assert weight_dq and any(constants[n.input[1]].size > 1 for n in weight_dq)  # per-channel scales
    assert {p.key: p.value for p in model.metadata_props}[graphs.META_PRECISION] == CPU_INT8
    assert report["graphs"][graphs.GLOBAL]["vs_fp32"]["min_cosine"] >= 0.99


# ---------------------------------------------------------------------------------------------- export and runtime


@pytest.fixture(scope="module")
def dataset_and_checkpoint(tmp_path_factory, tiny):
    model, _ = tiny
    root = tmp_path_factory.mktemp("cpu-int8-data")
    (root / "images").mkdir()
    (root / "detections").mkdir()
    rng = np.random.default_rng(5)
    words = [f"word{i}" for i in range(WORDS)]
    for split, count in (("train", 8), ("test", 6)):
        names = tuple(f"{split}_{i}.png" for i in range(count))
        for name in names:
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / "images" / name)
        captions = tuple(" ".join(rng.choice(words, size=5)) for _ in range(count * 5))
        write_split(RetrievalSplit(names, captions), root, name=split)
    checkpoint = root / "small.pt"
    save_checkpoint(checkpoint, model, Vocabulary.from_words(words), metadata={"note": "random weights"})
    return root, checkpoint


def _export(dataset_and_checkpoint, out: Path, **overrides):
    root, checkpoint = dataset_and_checkpoint
    settings = pipeline.ExportSettings(checkpoint=checkpoint, output=out, dataset=root, tensorrt="no",
                                       calibration_images=8, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no detection files: the documented all-zero DREA fallback
        return pipeline.export_bundle(settings, log=lambda _: None)


@pytest.fixture(scope="module")
def exported(dataset_and_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu-int8-bundle") / "galr.plan"
    # A random model's mR on 6 images is noise (near-equal scores swap ranks under any change), so the
    # mR limits are opened here; the gates' refusals are tested below, the cosine gates stay as they are.
    report = _export(dataset_and_checkpoint, out, int8=True, int8_cpu=True, **NOISY_MR)
    return out, report


def test_export_adds_a_gated_int8_cpu_set(exported):
    out, report = exported
    bundle = read_bundle(out, verify=True)
    assert bundle.precisions == ["fp32", "int8", CPU_INT8]
    accuracy = report.accuracy[CPU_INT8]
    assert accuracy["text_only"]["vs_fp32_text"]["min_cosine"] >= 0.999
    assert "mr_drop" in accuracy["text_only"] and accuracy["vs_fp32_image"]["min_cosine"] >= 0.99
    reports = bundle.manifest["reports"]
    assert reports["calibration_int8_cpu"]["graphs"][graphs.TEXT]["integer_kernels"]["MatMulNBits"] >= 2
    assert reports["accuracy"][CPU_INT8]["mr_drop"] == pytest.approx(accuracy["mr_drop"])
    # Each set was scored as itself: the int8 row is the Q/DQ set, not the CPU flavour standing in for it.
    assert report.accuracy["int8"]["vs_fp32_image"] != accuracy["vs_fp32_image"]
    assert report.accuracy["int8"]["vs_fp32_text"]["max_abs_error"] == 0.0  # the Q/DQ set keeps the FP32 text graph
    # The TensorRT set is untouched by the CPU flavour: still Q/DQ with zero points 0.
    int8_global = onnx.load_from_string(bundle.onnx_bytes(graphs.GLOBAL, "int8"))
    assert {p.key: p.value for p in int8_global.metadata_props}[graphs.META_PRECISION] == "int8"


def test_runtime_chooses_the_cpu_flavour_on_onnxruntime_cpu_and_says_so(exported):
    out, _ = exported
    for requested in ("auto", "int8", CPU_INT8):
        with load_engine(out, backend="onnxruntime", device="cpu", precision=requested, environment=CPU_ONLY) as enc:
            assert enc.info.precision == CPU_INT8, requested
            assert "int8" in enc.info.describe() and "CPU" in enc.info.describe()
            embedded = enc.encode_text(["word1 word2 word3"])
            assert embedded.shape == (1, enc.embed_dim)
    with load_engine(out, backend="onnxruntime", device="cpu", precision="fp32", environment=CPU_ONLY) as enc:
        assert enc.info.precision == "fp32"
    with load_engine(out, backend="onnxruntime", device="cpu", precision="int8", environment=CPU_ONLY,
                     cpu_int8=False) as enc:
        assert enc.info.precision == "int8"  # exactly what was named, for gates and benchmarks


def test_tensorrt_and_cuda_keep_their_sets(exported):
    bundle = read_bundle(exported[0])
    for backend, device in (("tensorrt", "cuda"), ("onnxruntime", "cuda")):
        choice = BackendChoice(backend, device, "auto", "test", str(bundle.path))
        assert _resolve_precision("int8", choice, bundle) == ("int8", "")
        assert _resolve_precision("auto", choice, bundle) == ("fp32", "")
        with pytest.raises(InputError, match="only on ONNX Runtime's CPU provider"):
            _resolve_precision(CPU_INT8, choice, bundle)
    with pytest.raises(InputError, match="int8-cpu is for ONNX Runtime"):
        EngineKey("sm_90", "10.16.1", CPU_INT8, "0" * 64)


def test_bundles_without_the_cpu_flavour_behave_as_before(exported):
    bundle = read_bundle(exported[0])
    manifest = dict(bundle.manifest)
    manifest["onnx"] = {p: g for p, g in manifest["onnx"].items() if p != CPU_INT8}
    manifest["onnx_sha256"] = {p: g for p, g in manifest["onnx_sha256"].items() if p != CPU_INT8}
    old = build_bundle(bundle.path, manifest, bundle.members(drop=[m for m in bundle.manifest["members"]
                                                                    if m.startswith(f"onnx/{CPU_INT8}/")]))
    assert old.precisions == ["fp32", "int8"]
    for requested, expected in (("auto", "fp32"), ("int8", "int8"), ("fp32", "fp32")):
        with load_engine(old, backend="onnxruntime", device="cpu", precision=requested, environment=CPU_ONLY) as enc:
            assert enc.info.precision == expected and "int8-cpu" not in enc.info.reason
    with pytest.raises(InputError, match="galr-export --int8-cpu"):
        load_engine(old, backend="onnxruntime", device="cpu", precision=CPU_INT8, environment=CPU_ONLY)


def test_gate_refuses_a_text_graph_that_drifts_and_writes_nothing(dataset_and_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "galr.plan"
    out.write_bytes(b"previous bundle")
    real = cpu_text._text_weights

    def drifted(model):
        weights = real(model)
        noisy = weights.r + np.random.default_rng(0).standard_normal(weights.r.shape).astype(np.float32) * 0.5
        return cpu_text._TextWeights(weights.embedding, weights.w, noisy, weights.bias, weights.gemm, weights.hidden)

    monkeypatch.setattr(cpu_text, "_text_weights", drifted)
    with pytest.raises(ParityError, match="int8-cpu text graph vs FP32"):
        _export(dataset_and_checkpoint, out, int8_cpu=True, **NOISY_MR)
    assert out.read_bytes() == b"previous bundle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["galr.plan"]


def test_gate_refuses_an_mr_loss_above_the_limit(dataset_and_checkpoint, tmp_path):
    out = tmp_path / "galr.plan"
    # A limit below any achievable loss (the set would have to *gain* 200 mR): the gate must trip.
    with pytest.raises(ParityError, match="int8-cpu loses .* mR against FP32"):
        _export(dataset_and_checkpoint, out, int8_cpu=True, **{**NOISY_MR, "max_mr_drop_int8_cpu": -200.0})
    with pytest.raises(ParityError, match="int8-cpu text graph loses .* with FP32 image embeddings"):
        _export(dataset_and_checkpoint, out, int8_cpu=True, **{**NOISY_MR, "max_mr_drop_cpu_text": -200.0})
    assert not out.exists()


def test_int8_cpu_needs_calibration_data(dataset_and_checkpoint, tmp_path):
    _, checkpoint = dataset_and_checkpoint
    with pytest.raises(InputError, match="pass --dataset"):
        pipeline.export_bundle(pipeline.ExportSettings(checkpoint=checkpoint, output=tmp_path / "x.plan",
                                                       int8_cpu=True, tensorrt="no"), log=lambda _: None)


@pytest.mark.parametrize("allow, expected", [(True, "1"), (False, "0")])
def test_spinning_option_reaches_the_session(allow, expected):
    from galr.runtime.backends.onnxruntime import OnnxRuntimeOptions, _session_options

    options = _session_options(ort, OnnxRuntimeOptions(allow_spinning=allow))
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == expected
    default = _session_options(ort, OnnxRuntimeOptions())
    with pytest.raises(RuntimeError):  # not set: ONNX Runtime's own default applies
        default.get_session_config_entry("session.intra_op.allow_spinning")
