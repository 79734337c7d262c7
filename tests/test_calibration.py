"""INT8 calibration (galr.calibration.readers and .int8) on a tiny random GaLR exported in memory."""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import calibrate
from PIL import Image

from galr import graphs
from galr.calibration.int8 import (
    CalibrationError,
    CalibrationSettings,
    collect_ranges,
    output_normalisation_nodes,
    quantize_bundle_graphs,
    quantize_graph,
    verify_qdq,
)
from galr.calibration.readers import (
    FeedReader,
    calibration_set_hash,
    choose_images,
    graph_readers,
    load_calibration_inputs,
    subset_inputs,
)
from galr.config import GaLRConfig
from galr.data import RetrievalSplit, write_split
from galr.export.onnx_export import export_all
from galr.model import GaLR
from galr.preprocess.spec import PreprocessSpec
from galr.preprocess.text import Tokenizer, Vocabulary
from galr.retrieval.evaluate import SplitInputs
from galr.retrieval.parity import INT8_GATE

IMAGES = 12
# Small histograms keep each quantisation around a second on two cores; 12 images in batches of 5
# leave a short last batch, which ORT's histogram collectors must not see mixed in.
FAST = {"batch_size": 5, "histogram_bins": 256}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Tiny:
    fp32: dict[str, bytes]
    vocab: Vocabulary
    spec: PreprocessSpec
    inputs: SplitInputs


def _min_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Smallest row-wise cosine, computed here rather than with galr's own comparison."""
    dots = np.einsum("ij,ij->i", reference.astype(np.float64), candidate.astype(np.float64))
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    return float((dots / norms).min())


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    torch.manual_seed(0)
    config = GaLRConfig.small()
    model = GaLR(config).eval()
    fp32 = {name: proto.SerializeToString() for name, proto in export_all(model).items()}
    vocab = Vocabulary.from_words([f"w{i}" for i in range(config.vocab_size - 1)])  # + <unk>
    rng = np.random.default_rng(0)
    n, s = IMAGES, config.image_size
    captions = tuple(" ".join(rng.choice(vocab.words(), size=rng.integers(3, 9))) for _ in range(n * 5))
    inputs = SplitInputs(
        tuple(f"img_{i}.png" for i in range(n)), rng.standard_normal((n, 3, s, s), dtype=np.float32),
        rng.random((n, config.num_objects, config.object_dim), dtype=np.float32),
        rng.random((n, config.num_objects, config.num_objects), dtype=np.float32) / config.num_objects, captions)
    return Tiny(fp32, vocab, PreprocessSpec.for_model(config), inputs)


@pytest.fixture(scope="module", params=["minmax", "entropy", "percentile"])
def quantized(request, tiny: Tiny) -> tuple[dict[str, bytes], dict, CalibrationSettings]:
    settings = CalibrationSettings(method=request.param, **FAST)
    int8, report = quantize_bundle_graphs(tiny.fp32, tiny.vocab, tiny.spec, settings, log=lambda _: None,
                                          inputs=tiny.inputs)
    return int8, report, settings


def _run(graph: bytes, reader: FeedReader) -> np.ndarray:
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feeds)[0] for feeds in reader])


def _qdq_facts(model: onnx.ModelProto) -> tuple[list[np.ndarray], set[str]]:
    """All Q/DQ zero points, and the op types that read a DequantizeLinear output (independent of verify_qdq)."""
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [constants[n.input[2]] for n in model.graph.node if n.op_type in QDQ_OPS and len(n.input) > 2]
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    readers = {n.op_type for n in model.graph.node if any(i in dq_outputs for i in n.input)}
    return zero_points, readers


# ---------------------------------------------------------------------------------------------- readers


def test_feed_reader_follows_the_ort_contract():
    reader = FeedReader([{"x": np.full((2, 3), i, dtype=np.float32)} for i in range(5)])
    served = [reader.get_next()["x"][0, 0] for _ in range(5)]
    assert served == [0, 1, 2, 3, 4] and reader.get_next() is None
    reader.rewind()
    assert reader.get_next()["x"][0, 0] == 0
    assert [len(chunk) for chunk in reader.chunks(2)] == [2, 2, 1]
    # ORT's histogram collectors stack a chunk's tensors: a chunk never mixes shapes.
    ragged = FeedReader([{"x": np.zeros((n, 3), dtype=np.float32)} for n in (4, 4, 4, 2, 4)])
    assert [[f["x"].shape[0] for f in chunk] for chunk in ragged.chunks(8)] == [[4, 4, 4], [2], [4]]


def test_image_choice_is_bounded_seeded_and_sorted():
    chosen = choose_images(100, 16, seed=3)
    assert len(chosen) == 16 and len(set(chosen.tolist())) == 16 and np.all(np.diff(chosen) > 0)
    assert np.array_equal(chosen, choose_images(100, 16, seed=3))
    assert not np.array_equal(chosen, choose_images(100, 16, seed=4))
    assert np.array_equal(choose_images(5, 16), np.arange(5))
    with pytest.raises(ValueError, match="max_images"):
        choose_images(5, 0)


def test_readers_feed_each_graph_what_it_sees_when_serving(tiny: Tiny):
    readers = graph_readers(tiny.inputs, tiny.fp32, batch_size=5, tokenizer=Tokenizer(tiny.vocab),
                            names=graphs.GRAPH_NAMES)
    assert [len(readers[n]) for n in graphs.GRAPH_NAMES] == [3, 3, 3, 12]  # 12 images / 5, 60 captions / 5
    assert next(iter(readers[graphs.GLOBAL]))[graphs.IMAGE].shape[0] == 5
    # Fusion is calibrated on the FP32 encoders' real outputs.
    fusion_global = np.concatenate([f[graphs.GLOBAL_FEATURE] for f in readers[graphs.FUSION]])
    np.testing.assert_allclose(fusion_global, _run(tiny.fp32[graphs.GLOBAL], readers[graphs.GLOBAL]), rtol=1e-6)
    assert next(iter(readers[graphs.TEXT]))[graphs.TOKENS].dtype == np.int64
    with pytest.raises(ValueError, match="tokenizer"):
        graph_readers(tiny.inputs, tiny.fp32, names=(graphs.TEXT,))


def test_calibration_set_hash_follows_the_data(tiny: Tiny):
    inputs = tiny.inputs
    base = calibration_set_hash(inputs, "minmax")
    assert base == calibration_set_hash(subset_inputs(inputs, range(IMAGES)), "minmax")  # same content, new arrays
    images = inputs.images.copy()
    images[3, 0, 0, 0] += 0.5
    variants = [
        SplitInputs(inputs.image_names, images, inputs.local_rep, inputs.local_adj, inputs.captions),
        SplitInputs(("other.png",) + inputs.image_names[1:], inputs.images, inputs.local_rep, inputs.local_adj, inputs.captions),
        SplitInputs(inputs.image_names, inputs.images, inputs.local_rep, inputs.local_adj, ("x",) + inputs.captions[1:]),
        subset_inputs(inputs, range(IMAGES - 1)),
    ]
    hashes = {calibration_set_hash(v, "minmax") for v in variants} | {calibration_set_hash(inputs, "entropy")}
    assert base not in hashes and len(hashes) == 5


def test_dataset_calibration_reads_only_the_chosen_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "detections").mkdir()
    names = tuple(f"scene_{i}.png" for i in range(6))
    for i, name in enumerate(names):
        Image.fromarray(np.full((40, 40, 3), 20 * i, dtype=np.uint8)).save(tmp_path / "images" / name)
    captions = tuple(f"scene {i} caption {j}" for i in range(6) for j in range(5))
    write_split(RetrievalSplit(names, captions), tmp_path, name="train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no detection files: the documented all-zero DREA fallback
        chosen = load_calibration_inputs(tmp_path, "train", 3, PreprocessSpec.for_model(GaLRConfig.small()), seed=1)
    picked = choose_images(6, 3, seed=1).tolist()
    assert chosen.image_names == tuple(names[i] for i in picked)
    assert chosen.captions[:5] == captions[picked[0] * 5:picked[0] * 5 + 5]
    assert chosen.images.shape == (3, 3, 64, 64)


# ---------------------------------------------------------------------------------------------- INT8 graphs


def test_int8_graphs_run_on_ort_close_to_fp32(quantized, tiny: Tiny):
    int8, report, settings = quantized
    readers = graph_readers(tiny.inputs, tiny.fp32, batch_size=5)
    for name in (graphs.GLOBAL, graphs.LOCAL, graphs.FUSION):
        fp32_out, int8_out = _run(tiny.fp32[name], readers[name]), _run(int8[name], readers[name])
        cosine = _min_cosine(fp32_out, int8_out)
        # INT8_GATE (cosine >= 0.99 per row) is the export's own INT8 gate. The tiny random model
        # measures >= 0.999 on every graph; a broken scale, zero point or channel axis falls far below.
        assert cosine >= INT8_GATE.min_cosine, (settings.method, name, cosine)
        assert np.abs(fp32_out - int8_out).max() > 0, f"{name}: INT8 output equals FP32, nothing was quantised"
        assert report["graphs"][name]["vs_fp32"]["min_cosine"] == pytest.approx(cosine, abs=1e-6)
    assert report["image_end_to_end_vs_fp32"]["min_cosine"] >= INT8_GATE.min_cosine


def test_int8_graphs_follow_tensorrt_qdq_rules(quantized):
    int8, _, settings = quantized
    for name in (graphs.GLOBAL, graphs.LOCAL, graphs.FUSION):
        model = onnx.load_from_string(int8[name])
        zero_points, dq_readers = _qdq_facts(model)
        assert zero_points and all(zp.dtype == np.int8 and not zp.any() for zp in zero_points), name
        assert dq_readers and dq_readers <= set(settings.op_types), (name, dq_readers)
        assert verify_qdq(model, settings.op_types).activation_pairs > 0
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["galr.precision"] == "int8" and meta["galr.calibration.method"] == settings.method_tag


def test_report_describes_the_int8_set(quantized, tiny: Tiny):
    int8, report, settings = quantized
    assert report["images"] == IMAGES and report["method"] == settings.method_tag
    set_hash = report["calibration_set_hash"]
    assert len(set_hash) == 64 and int(set_hash, 16) >= 0
    stamped = {p.key: p.value for p in onnx.load_from_string(int8[graphs.GLOBAL]).metadata_props}
    assert stamped["galr.calibration.set_hash"] == set_hash  # the graph says which set calibrated it
    assert report["quantized_graphs"] == [graphs.GLOBAL, graphs.LOCAL, graphs.FUSION]
    assert report["fp32_graphs"] == [graphs.TEXT] and any("GRU" in note for note in report["notes"])
    assert int8[graphs.TEXT] == tiny.fp32[graphs.TEXT]  # the FP32 text graph travels in the int8 set
    assert report["graphs"][graphs.GLOBAL]["qdq"]["activation_pairs"] > 0


def test_normalisation_and_sensitive_nodes_stay_fp32(tiny: Tiny):
    local = onnx.load_from_string(tiny.fp32[graphs.LOCAL])
    norm = set(output_normalisation_nodes(local))
    by_name = {n.name: n for n in local.graph.node}
    assert {by_name[n].op_type for n in norm} == {"Pow", "ReduceSum", "Sqrt", "Add", "Div"}
    assert any(graphs.LOCAL_FEATURE in by_name[n].output for n in norm)
    settings = CalibrationSettings(method="minmax", **FAST)
    reader = graph_readers(tiny.inputs, tiny.fp32, batch_size=5, names=(graphs.LOCAL,))[graphs.LOCAL]
    result = quantize_graph(tiny.fp32[graphs.LOCAL], reader, settings, "set", graphs.LOCAL, log=lambda _: None)
    model = onnx.load_from_string(result.graph)
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    # The GCN's three adjacency products (activation x activation) are kept FP32: no DQ feeds them.
    adjacency = [n for n in model.graph.node if n.op_type == "MatMul" and n.name in result.excluded_nodes]
    assert len(adjacency) == 3 and not any(i in dq_outputs for n in adjacency for i in n.input)
    assert norm <= set(result.excluded_nodes)


def test_text_graph_is_quantised_only_when_asked(tiny: Tiny):
    settings = CalibrationSettings(method="minmax", quantize_text=True, **FAST)
    int8, report = quantize_bundle_graphs(tiny.fp32, tiny.vocab, tiny.spec, settings, log=lambda _: None,
                                          inputs=tiny.inputs)
    assert graphs.TEXT in report["quantized_graphs"] and report["captions"] == IMAGES * 5
    model = onnx.load_from_string(int8[graphs.TEXT])
    assert {n.op_type for n in model.graph.node if n.op_type == "GRU"} == {"GRU"}
    assert verify_qdq(model, settings.op_types).quantized_nodes == 1  # the output Gemm; the GRU stays FP32
    assert report["graphs"][graphs.TEXT]["vs_fp32"]["min_cosine"] >= INT8_GATE.min_cosine


# ---------------------------------------------------------------------------------------------- cache


def test_cached_ranges_skip_collection(tiny: Tiny, tmp_path, monkeypatch):
    settings = CalibrationSettings(method="percentile", cache_dir=tmp_path, **FAST)
    reader = graph_readers(tiny.inputs, tiny.fp32, batch_size=5, names=(graphs.LOCAL,))[graphs.LOCAL]
    first = quantize_graph(tiny.fp32[graphs.LOCAL], reader, settings, "set-a", graphs.LOCAL, log=lambda _: None)
    assert not first.cache_hit and len(list(tmp_path.glob("*.json"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("calibration data was collected again")

    monkeypatch.setattr(calibrate, "create_calibrator", refuse)
    # quantize_static's own module too (the package re-exports a function named `quantize`).
    monkeypatch.setattr(importlib.import_module("onnxruntime.quantization.quantize"), "create_calibrator", refuse)
    second = quantize_graph(tiny.fp32[graphs.LOCAL], reader, settings, "set-a", graphs.LOCAL, log=lambda _: None)
    assert second.cache_hit and second.graph == first.graph
    # Another calibration set, method or graph is another key: collection would run (and here fails).
    for changed, set_hash in ((settings, "set-b"), (CalibrationSettings(method="minmax", cache_dir=tmp_path, **FAST), "set-a")):
        with pytest.raises(AssertionError, match="collected again"):
            quantize_graph(tiny.fp32[graphs.LOCAL], reader, changed, set_hash, graphs.LOCAL, log=lambda _: None)


def test_unreadable_cache_is_ignored_and_rewritten(tiny: Tiny, tmp_path):
    settings = CalibrationSettings(method="minmax", cache_dir=tmp_path, **FAST)
    reader = graph_readers(tiny.inputs, tiny.fp32, batch_size=5, names=(graphs.LOCAL,))[graphs.LOCAL]
    quantize_graph(tiny.fp32[graphs.LOCAL], reader, settings, "set", graphs.LOCAL, log=lambda _: None)
    (cache_file,) = tmp_path.glob("*.json")
    cache_file.write_text("{not json", encoding="utf-8")
    messages: list[str] = []
    again = quantize_graph(tiny.fp32[graphs.LOCAL], reader, settings, "set", graphs.LOCAL, log=messages.append)
    assert not again.cache_hit and any("ignoring calibration cache" in m for m in messages)
    assert cache_file.read_text(encoding="utf-8").startswith("{")


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("overrides", "message"), [
    ({"method": "kmeans"}, "unknown calibration method 'kmeans'"),
    ({"split": "test"}, "refusing to calibrate on 'test'"),
    ({"op_types": ("Conv", "Relu")}, "op_types must be a non-empty subset"),
    ({"histogram_bins": 128}, "histogram_bins must be at least 256"),
    ({"max_images": 0}, "max_images"),
])
def test_bad_settings_are_refused_with_a_clear_message(overrides, message):
    with pytest.raises(CalibrationError, match=message):
        CalibrationSettings(**overrides)


def test_settings_round_trip_through_dicts(tmp_path):
    settings = CalibrationSettings(dataset=str(tmp_path), method="percentile", cache_dir=tmp_path / "cache")
    assert settings.dataset == tmp_path
    assert CalibrationSettings.from_dict(settings.to_dict()) == settings
    with pytest.raises(CalibrationError, match="unknown CalibrationSettings fields"):
        CalibrationSettings.from_dict({"methd": "minmax"})


def test_empty_or_missing_calibration_data_is_an_error(tiny: Tiny, tmp_path):
    empty = subset_inputs(tiny.inputs, [])
    with pytest.raises(CalibrationError, match="calibration set is empty"):
        quantize_bundle_graphs(tiny.fp32, tiny.vocab, tiny.spec, CalibrationSettings(**FAST), log=lambda _: None,
                               inputs=empty)
    with pytest.raises(CalibrationError, match="needs data"):
        quantize_bundle_graphs(tiny.fp32, tiny.vocab, tiny.spec, CalibrationSettings(**FAST), log=lambda _: None)
    with pytest.raises(CalibrationError, match="lacks the graphs"):
        quantize_bundle_graphs({graphs.GLOBAL: tiny.fp32[graphs.GLOBAL]}, tiny.vocab, tiny.spec,
                               CalibrationSettings(**FAST), log=lambda _: None, inputs=tiny.inputs)
    with pytest.raises(CalibrationError, match="calibration set is empty"):
        collect_ranges(tmp_path / "unused.onnx", FeedReader([]), CalibrationSettings(**FAST), tmp_path)


def _qdq_model(zero_point: int, consumer: str) -> onnx.ModelProto:
    """x -> Q -> DQ -> consumer(x_dq, w) -> y: a hand-made Q/DQ graph to check the verifier on."""
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "scale")
    zp = numpy_helper.from_array(np.array(zero_point, dtype=np.int8), "zp")
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["x_q"], name="q"),
             helper.make_node("DequantizeLinear", ["x_q", "scale", "zp"], ["x_dq"], name="dq"),
             helper.make_node(consumer, ["x_dq", "w"] if consumer == "MatMul" else ["x_dq"], ["y"], name="op")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [scale, zp, weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_verifier_rejects_what_tensorrt_rejects():
    assert verify_qdq(_qdq_model(0, "MatMul"), ["MatMul"]).activation_pairs == 1
    with pytest.raises(CalibrationError, match="non-zero zero point"):
        verify_qdq(_qdq_model(3, "MatMul"), ["MatMul"])
    with pytest.raises(CalibrationError, match="feeds Relu 'op'"):
        verify_qdq(_qdq_model(0, "Relu"), ["MatMul"])
