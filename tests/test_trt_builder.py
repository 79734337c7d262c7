"""Tests for galr.export.tensorrt against a fake TensorRT module (no GPU, no TensorRT needed)."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the builder tests make tiny ONNX graphs with the onnx package")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from galr.config import GaLRConfig  # noqa: E402
from galr.export.tensorrt import (  # noqa: E402
    DEFAULT_WORKSPACE_BYTES,
    TensorRTBuildConfig,
    TensorRTBuildError,
    build_engine,
    default_profiles,
    onnx_precision,
    plan_typing,
)
from galr.graphs import GRAPH_NAMES, graph_io  # noqa: E402
from galr.runtime.backends.device import GpuInfo  # noqa: E402
from tests.fake_tensorrt import V10, V11, called, make_fake_tensorrt  # noqa: E402

H200 = GpuInfo(name="NVIDIA H200", compute_capability="sm_90")
#: TensorRT's NetworkDefinitionCreationFlag.STRONGLY_TYPED is 1 (EXPLICIT_BATCH is 0), so 1 << 1.
STRONGLY_TYPED_FLAGS = 1 << 1
PROFILE_X = {"x": ((1, 4), (8, 4), (32, 4))}


def _model(nodes, initializers=(), input_type=TensorProto.FLOAT, input_shape=("batch", 4)) -> bytes:
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", input_type, list(input_shape))],
        [helper.make_tensor_value_info("y", input_type, list(input_shape))],
        initializer=list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def fp32_onnx(input_shape=("batch", 4)) -> bytes:
    return _model([helper.make_node("Relu", ["x"], ["y"])], input_shape=input_shape)


def fp16_onnx() -> bytes:
    """AutoCast style: FP32 I/O around an FP16 body."""
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
        helper.make_node("Relu", ["x16"], ["r16"]),
        helper.make_node("Cast", ["r16"], ["y"], to=TensorProto.FLOAT),
    ]
    return _model(nodes)


def fp16_initializer_onnx() -> bytes:
    weight = numpy_helper.from_array(np.ones((4,), dtype=np.float16), "w")
    nodes = [
        helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "w32"], ["y"]),
    ]
    return _model(nodes, initializers=[weight])


def qdq_onnx() -> bytes:
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "scale")
    zero = numpy_helper.from_array(np.array(0, dtype=np.int8), "zero")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"]),
    ]
    return _model(nodes, initializers=[scale, zero])


def build(fake, onnx_bytes: bytes, **config) -> bytes:
    config.setdefault("profiles", PROFILE_X)
    return build_engine(onnx_bytes, TensorRTBuildConfig(**config), trt=fake, gpu_probe=lambda: H200)


def builder_config(fake):
    return fake.builders[-1].config


# ---------------------------------------------------------------------------------------------------
# What the ONNX carries


@pytest.mark.parametrize(
    "make, expected",
    [(fp32_onnx, "fp32"), (fp16_onnx, "fp16"), (fp16_initializer_onnx, "fp16"), (qdq_onnx, "int8")],
)
def test_onnx_precision_reads_the_graph(make, expected):
    assert onnx_precision(make()) == expected


def test_onnx_precision_looks_inside_subgraphs():
    branch = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["b"], to=TensorProto.FLOAT16)],
        "branch", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT16, None)],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    outer = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)],
        "outer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)], initializer=[cond],
    )
    model = helper.make_model(outer, opset_imports=[helper.make_opsetid("", 17)])
    # The only FP16 is the If output and the branch; drop the outer output type to prove the branch counts.
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT
    assert onnx_precision(model.SerializeToString()) == "fp16"


def test_onnx_precision_rejects_garbage():
    with pytest.raises(TensorRTBuildError, match="not a readable ONNX model"):
        onnx_precision(b"\xff\xfe not onnx")


# ---------------------------------------------------------------------------------------------------
# Typing decisions


@pytest.mark.parametrize(
    "major, precision, source, strongly_typed, legacy_fp16",
    [
        (10, "fp32", "fp32", True, False),
        (10, "fp16", "fp16", True, False),
        (10, "fp16", "fp32", False, True),
        (10, "int8", "int8", True, False),
        (11, "fp32", "fp32", True, False),
        (11, "fp16", "fp16", True, False),
        (11, "int8", "int8", True, False),
    ],
)
def test_plan_typing_buildable_combinations(major, precision, source, strongly_typed, legacy_fp16):
    plan = plan_typing(major, precision, source)
    assert (plan.strongly_typed, plan.legacy_fp16_flag) == (strongly_typed, legacy_fp16)


@pytest.mark.parametrize(
    "major, precision, source, message",
    [
        (11, "fp16", "fp32", "TensorRT 11 has no FP16 builder flag"),
        (10, "int8", "fp32", "implicit INT8 calibration"),
        (11, "int8", "fp16", "Q/DQ"),
        (10, "fp32", "fp16", "carries fp16"),
        (9, "fp32", "fp32", "not supported"),
    ],
)
def test_plan_typing_refuses_with_a_reason(major, precision, source, message):
    with pytest.raises(TensorRTBuildError, match=message):
        plan_typing(major, precision, source)


# ---------------------------------------------------------------------------------------------------
# Builds on the fake


def test_v11_is_strongly_typed_and_never_touches_builder_flags():
    fake = make_fake_tensorrt(V11)
    plan = build(fake, fp16_onnx(), precision="fp16")
    assert plan == b"FAKE-PLAN"
    assert called(fake, "create_network") == [("create_network", STRONGLY_TYPED_FLAGS)]
    assert called(fake, "BuilderFlag") == []
    assert builder_config(fake).flags == []


def test_v11_refuses_fp32_onnx_as_fp16_before_making_a_builder():
    fake = make_fake_tensorrt(V11)
    with pytest.raises(TensorRTBuildError, match="export an FP16 ONNX"):
        build(fake, fp32_onnx(), precision="fp16")
    assert fake.builders == []


def test_v10_fp32_onnx_as_fp16_uses_the_legacy_flag(caplog):
    fake = make_fake_tensorrt(V10)
    with caplog.at_level(logging.WARNING, logger="galr.export.tensorrt"):
        build(fake, fp32_onnx(), precision="fp16")
    assert called(fake, "create_network") == [("create_network", 0)]
    assert builder_config(fake).flags == ["FP16"]
    assert "legacy BuilderFlag.FP16" in caplog.text


@pytest.mark.parametrize("make, precision", [(fp16_onnx, "fp16"), (qdq_onnx, "int8"), (fp32_onnx, "fp32")])
def test_v10_onnx_with_its_precision_is_strongly_typed(make, precision):
    fake = make_fake_tensorrt(V10)
    build(fake, make(), precision=precision)
    assert called(fake, "create_network") == [("create_network", STRONGLY_TYPED_FLAGS)]
    assert builder_config(fake).flags == []


@pytest.mark.parametrize("version", [V10, V11])
def test_int8_without_qdq_is_refused(version):
    fake = make_fake_tensorrt(version)
    with pytest.raises(TensorRTBuildError, match="galr's calibration"):
        build(fake, fp32_onnx(), precision="int8")
    assert fake.builders == []


def test_explicit_source_precision_skips_detection():
    fake = make_fake_tensorrt(V11)
    with pytest.raises(TensorRTBuildError, match="this graph is fp32"):
        build_engine(qdq_onnx(), TensorRTBuildConfig(precision="int8", profiles=PROFILE_X), trt=fake,
                     source_precision="fp32", gpu_probe=lambda: H200)


def test_parser_errors_surface_in_the_message():
    fake = make_fake_tensorrt(V10, parse_errors=["node 3 (GRU): unsupported attribute", "node 7: bad shape"])
    with pytest.raises(TensorRTBuildError, match="2 error") as excinfo:
        build(fake, fp32_onnx())
    assert "node 3 (GRU): unsupported attribute" in str(excinfo.value)
    assert "node 7: bad shape" in str(excinfo.value)


def test_an_op_without_an_importer_fails_the_parse_with_its_name():
    graph = helper.make_graph([helper.make_node("GalrMystery", ["x"], ["y"], domain="com.example")], "custom",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    custom = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                     helper.make_opsetid("com.example", 1)]).SerializeToString()
    fake = make_fake_tensorrt(V11)
    with pytest.raises(TensorRTBuildError, match="TensorRT's ONNX parser rejected the graph") as excinfo:
        build(fake, custom)
    assert "No importer registered for op: GalrMystery" in str(excinfo.value)
    assert called(fake, "build_serialized_network") == []


def test_failed_build_is_an_error():
    fake = make_fake_tensorrt(V11, build_result=None)
    with pytest.raises(TensorRTBuildError, match="returned no engine"):
        build(fake, fp32_onnx())


def test_no_gpu_refuses_before_constructing_a_builder():
    fake = make_fake_tensorrt(V10)
    with pytest.raises(TensorRTBuildError, match="needs an NVIDIA GPU"):
        build_engine(fp32_onnx(), TensorRTBuildConfig(profiles=PROFILE_X), trt=fake, gpu_probe=lambda: None)
    assert fake.builders == []
    assert called(fake, "Builder") == []


def test_missing_tensorrt_explains_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ImportError, match=r"galr\[tensorrt\].*NVIDIA GPU"):
        build_engine(fp32_onnx(), TensorRTBuildConfig(profiles=PROFILE_X), gpu_probe=lambda: H200)


def test_config_settings_reach_the_builder():
    fake = make_fake_tensorrt(V10)
    build(fake, fp32_onnx(), workspace_bytes=1 << 20, builder_optimization_level=5, version_compatible=True)
    config = builder_config(fake)
    assert config.memory_limits == {"WORKSPACE": 1 << 20}
    assert config.builder_optimization_level == 5
    assert config.flags == ["VERSION_COMPATIBLE"]


# ---------------------------------------------------------------------------------------------------
# Profiles


def two_input_onnx() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "two",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_profiles_are_set_for_every_dynamic_input():
    fake = make_fake_tensorrt(V11)
    profiles = {"a": ((1, 4), (4, 4), (16, 4)), "b": ((1, 4), (4, 4), (16, 4))}
    build(fake, two_input_onnx(), profiles=profiles)
    (profile,) = builder_config(fake).profiles
    assert profile.shapes == profiles


@pytest.mark.parametrize(
    "profiles, message",
    [
        ({"a": ((1, 4), (4, 4), (16, 4))}, r"dynamic inputs \['b'\] need an optimization profile"),
        ({"a": ((1, 4),) * 3, "b": ((1, 4),) * 3, "c": ((1, 4),) * 3}, r"\['c'\], which are not network inputs"),
        ({"a": ((1, 4),) * 3, "b": ((1, 5), (2, 5), (3, 5))}, "does not fit its network shape"),
        ({"a": ((1, 4),) * 3, "b": ((1,), (2,), (3,))}, "does not fit its network shape"),
    ],
)
def test_bad_profiles_name_the_input(profiles, message):
    fake = make_fake_tensorrt(V11)
    with pytest.raises(TensorRTBuildError, match=message):
        build(fake, two_input_onnx(), profiles=profiles)


def test_static_graph_needs_no_profile():
    fake = make_fake_tensorrt(V11)
    build(fake, fp32_onnx(input_shape=(2, 4)), profiles={})
    assert builder_config(fake).profiles == []


# ---------------------------------------------------------------------------------------------------
# Timing cache


def test_timing_cache_round_trip(tmp_path):
    cache = tmp_path / "sm_90" / "trt11.4.0" / "timing.cache"
    for expected in (b"TIMING:1", b"TIMING:2"):
        fake = make_fake_tensorrt(V11)
        build(fake, fp32_onnx(), timing_cache=str(cache))
        assert cache.read_bytes() == expected
    assert called(fake, "create_timing_cache") == [("create_timing_cache", b"TIMING:1")]
    assert list(cache.parent.iterdir()) == [cache]  # no temporary file left behind


def test_rejected_timing_cache_starts_afresh(tmp_path, caplog):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"TIMING:7")
    fake = make_fake_tensorrt(V10, reject_timing_cache=True)
    with caplog.at_level(logging.WARNING, logger="galr.export.tensorrt"):
        build(fake, fp32_onnx(), timing_cache=str(cache))
    assert cache.read_bytes() == b"TIMING:1"
    assert "another device" in caplog.text


# ---------------------------------------------------------------------------------------------------
# Config and default profiles


def test_build_config_validates_and_round_trips():
    config = TensorRTBuildConfig(precision="fp16", profiles={"x": ([1, 4], [8, 4], [32, 4])}, timing_cache="t.cache")
    assert config.workspace_bytes == DEFAULT_WORKSPACE_BYTES == 2 << 30
    assert config.profiles == PROFILE_X
    assert TensorRTBuildConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="precision"):
        TensorRTBuildConfig(precision="bf16")
    with pytest.raises(ValueError, match="axis 0 needs 1 <= min <= opt <= max"):
        TensorRTBuildConfig(profiles={"x": ((8, 4), (1, 4), (32, 4))})
    with pytest.raises(ValueError, match="unknown TensorRTBuildConfig fields"):
        TensorRTBuildConfig.from_dict({"precision": "fp32", "int8_calibrator": "x"})


def test_default_profiles_cover_every_graph_input():
    config = GaLRConfig.small()
    for graph in GRAPH_NAMES:
        profiles = default_profiles(graph, config, 48, max_batch=16)
        assert list(profiles) == graph_io(config)[graph].input_names
        for low, opt, high in profiles.values():
            assert (low[0], opt[0], high[0]) == (1, 8, 16)
    assert default_profiles("text", config, 48)["tokens"] == ((1, 1), (8, 32), (32, 48))
    assert default_profiles("global", config, 48, max_batch=4)["image"] == ((1, 3, 64, 64), (4, 3, 64, 64),
                                                                           (4, 3, 64, 64))
    with pytest.raises(ValueError, match="valid graphs"):
        default_profiles("vision", config, 48)


def test_default_profiles_fit_a_real_graph():
    """default_profiles output is accepted by the builder's shape checks for an exported-like text graph."""
    config = GaLRConfig.small()
    graph = helper.make_graph(
        [helper.make_node("Cast", ["tokens"], ["text_embedding"], to=TensorProto.FLOAT)],
        "text", [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "length"])],
        [helper.make_tensor_value_info("text_embedding", TensorProto.FLOAT, ["batch", "length"])],
    )
    text = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    fake = make_fake_tensorrt(V11)
    build(fake, text, profiles=default_profiles("text", config, 64))
    assert builder_config(fake).profiles[0].shapes["tokens"] == ((1, 1), (8, 32), (32, 64))
