"""Tests for galr.runtime.backends.onnxruntime, and backend resolution in galr.runtime.backends.

The graphs are built with ``onnx.helper`` (no torch) and run on the CPU provider; GPU providers are
exercised through a fake session that reproduces onnxruntime-gpu's silent CPU fallback.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install galr[cpu])")
onnx = pytest.importorskip("onnx", reason="the tests build tiny ONNX graphs with the onnx package")
from onnx import TensorProto, helper  # noqa: E402

from galr.errors import InputError  # noqa: E402
from galr.runtime.backends import (  # noqa: E402
    Environment,
    available_backends,
    resolve_backend,
)
from galr.runtime.backends.base import BackendUnavailableError, RunnerError  # noqa: E402
from galr.runtime.backends.device import GpuInfo, TensorRTInfo  # noqa: E402
from galr.runtime.backends.onnxruntime import (  # noqa: E402
    OnnxRuntimeOptions,
    OnnxRuntimeRunner,
    provider_list,
)


def _model(nodes, inputs, outputs) -> bytes:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by older onnxruntime releases too
    return model.SerializeToString()


def add_scale_onnx() -> bytes:
    """y = (a + b) * 2 over [batch, 4]; tokens int64 [batch, length] -> count of non-padding tokens."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    zero = helper.make_tensor("zero", TensorProto.INT64, [], [0])
    axis = helper.make_tensor("axis", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("Constant", [], ["two"], value=two),
        helper.make_node("Constant", [], ["zero"], value=zero),
        helper.make_node("Constant", [], ["axis"], value=axis),
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Mul", ["sum", "two"], ["y"]),
        helper.make_node("Greater", ["tokens", "zero"], ["mask"]),
        helper.make_node("Cast", ["mask"], ["mask_i"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["mask_i", "axis"], ["lengths"], keepdims=0),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("lengths", TensorProto.INT64, [None])],
    )


def half_onnx() -> bytes:
    return _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 3])],
    )


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return add_scale_onnx()


def feeds(batch: int = 3, length: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 9, size=(batch, length))
    tokens[0, 2:] = 0
    return {
        "a": rng.standard_normal((batch, 4)).astype(np.float32),
        "b": rng.standard_normal((batch, 4)).astype(np.float32),
        "tokens": tokens.astype(np.int64),
    }


# ---------------------------------------------------------------------------------------------------
# Running on the CPU


def test_runs_from_bytes_and_matches_numpy(model_bytes):
    data = feeds()
    with OnnxRuntimeRunner(model_bytes, options=OnnxRuntimeOptions(intra_op_threads=1)) as runner:
        out = runner.infer(data)
        assert runner.providers == ["CPUExecutionProvider"]
        assert runner.last_inference_time is not None
    np.testing.assert_allclose(out["y"], (data["a"] + data["b"]) * 2, rtol=1e-6)
    assert out["lengths"].tolist() == [2, 5, 5]


def test_runs_from_a_path_and_any_batch(model_bytes, tmp_path):
    path = tmp_path / "tiny.onnx"
    path.write_bytes(model_bytes)
    with OnnxRuntimeRunner(str(path)) as runner:
        for batch in (1, 7):
            assert runner.infer(feeds(batch))["y"].shape == (batch, 4)


def test_missing_path_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        OnnxRuntimeRunner(tmp_path / "nope.onnx")


def test_unreadable_model_is_a_runner_error():
    with pytest.raises(RunnerError, match="could not load"):
        OnnxRuntimeRunner(b"not an onnx model")


def test_specs_come_from_session_metadata(model_bytes):
    runner = OnnxRuntimeRunner(model_bytes)
    assert {name: (s.dtype, s.shape) for name, s in runner.inputs.items()} == {
        "a": ("float32", ("batch", 4)),
        "b": ("float32", ("batch", 4)),
        "tokens": ("int64", ("batch", None)),
    }
    assert runner.outputs["lengths"].dtype == "int64"
    half = OnnxRuntimeRunner(half_onnx())
    assert (half.inputs["x"].dtype, half.inputs["x"].shape) == ("float16", (2, 3))


def test_session_options_are_applied(model_bytes):
    options = OnnxRuntimeOptions(intra_op_threads=1, graph_optimization="basic")
    session_options = OnnxRuntimeRunner(model_bytes, options=options).session.get_session_options()
    assert session_options.intra_op_num_threads == 1
    assert session_options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.update(a=f["a"].astype(np.float64)), "input 'a' must be float32, got float64"),
        (lambda f: f.update(b=f["b"][:, :3]), "input 'b' axis 1 must be 4"),
        (lambda f: f.update(tokens=f["tokens"][0]), "input 'tokens' must have 2 dimensions"),
        (lambda f: f.pop("b"), r"missing \['b'\]"),
        (lambda f: f.update(extra=f["a"]), r"unexpected \['extra'\]"),
    ],
)
def test_bad_feeds_are_refused_with_the_input_name(model_bytes, change, message):
    data = feeds()
    change(data)
    with OnnxRuntimeRunner(model_bytes) as runner, pytest.raises(RunnerError, match=message):
        runner.infer(data)


def test_mismatched_dynamic_axes_fail_inside_the_graph_with_context(model_bytes):
    data = feeds()
    data["b"] = data["b"][:2]
    with OnnxRuntimeRunner(model_bytes) as runner, pytest.raises(RunnerError, match=r"a float32\[3, 4\]"):
        runner.infer(data)


def test_close_then_activate_recreates_the_session(model_bytes):
    runner = OnnxRuntimeRunner(model_bytes).activate()
    runner.close()
    assert runner.session is None and runner.providers == []
    with pytest.raises(RunnerError, match="not active"):
        runner.infer(feeds())
    with runner:
        assert runner.infer(feeds(2))["y"].shape == (2, 4)


# ---------------------------------------------------------------------------------------------------
# Providers and the loud fallback


def test_provider_lists_per_device(tmp_path):
    options = OnnxRuntimeOptions(device_id=1, trt_fp16=True, trt_engine_cache_dir=str(tmp_path / "engines"),
                                 trt_timing_cache_dir=str(tmp_path / "timing"), trt_max_workspace_bytes=1 << 30)
    assert provider_list("cpu", options) == [("CPUExecutionProvider", {})]
    assert [name for name, _ in provider_list("cuda", options)] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_list("cuda", options)[0][1] == {"device_id": 1}
    trt_name, trt_options = provider_list("tensorrt", options)[0]
    assert trt_name == "TensorrtExecutionProvider"
    assert trt_options == {
        "device_id": 1,
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(tmp_path / "engines"),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(tmp_path / "timing"),
        "trt_max_workspace_size": 1 << 30,
    }
    assert "trt_engine_cache_enable" not in provider_list("tensorrt", OnnxRuntimeOptions())[0][1]
    with pytest.raises(ValueError, match="device must be one of"):
        provider_list("gpu", options)


def test_options_validate_and_round_trip():
    options = OnnxRuntimeOptions(intra_op_threads=2, trt_engine_cache_dir="cache")
    assert OnnxRuntimeOptions.from_dict(options.to_dict()) == options
    with pytest.raises(ValueError, match="graph_optimization"):
        OnnxRuntimeOptions(graph_optimization="max")


class _FallbackSession:
    """What onnxruntime-gpu returns on a host without working CUDA: a CPU session."""

    def __init__(self, source, sess_options=None, providers=None):
        self.requested = providers

    def get_providers(self):
        return ["CPUExecutionProvider"]


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_silent_cpu_fallback_is_refused(model_bytes, monkeypatch, device):
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", _FallbackSession)
    with pytest.raises(BackendUnavailableError) as excinfo:
        OnnxRuntimeRunner(model_bytes, device=device)
    message = str(excinfo.value)
    assert f"device '{device}'" in message
    assert "runs on ['CPUExecutionProvider']" in message
    assert "onnxruntime-gpu" in message and "cuDNN" in message


def test_cpu_build_without_cuda_provider_says_what_to_install(model_bytes, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailableError, match=r"only has \['CPUExecutionProvider'\].*galr\[gpu\]"):
        OnnxRuntimeRunner(model_bytes, device="cuda")


def test_missing_onnxruntime_names_the_extras(model_bytes, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"galr\[cpu\].*galr\[gpu\]"):
        OnnxRuntimeRunner(model_bytes)


def test_unsupported_element_type_is_named():
    strings = _model(
        [helper.make_node("Identity", ["s"], ["t"])],
        [helper.make_tensor_value_info("s", TensorProto.STRING, [1])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, [1])],
    )
    with pytest.raises(RunnerError, match="tensor 's' has ONNX type tensor\\(string\\)"):
        OnnxRuntimeRunner(strings)


# ---------------------------------------------------------------------------------------------------
# Backend resolution (galr.runtime.backends), with the environment injected

H200 = GpuInfo(name="NVIDIA H200", compute_capability="sm_90")
TRT10 = TensorRTInfo(version="10.16.1", major=10)
ORT_CPU = ("CPUExecutionProvider",)
ORT_GPU = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def env(gpu=None, trt=None, cupy=False, ort_providers=ORT_CPU) -> Environment:
    return Environment(gpu=gpu, tensorrt=trt, cupy_available=cupy, onnxruntime_providers=ort_providers)


@pytest.mark.parametrize(
    "environment, requested, device, expected",
    [
        (env(), "auto", "auto", ("onnxruntime", "cpu", "tensorrt on cuda: TensorRT not installed")),
        (env(gpu=H200, trt=TRT10, cupy=True), "auto", "auto", ("tensorrt", "cuda", "NVIDIA H200 (sm_90)")),
        (env(gpu=H200, trt=TRT10, cupy=True), "auto", "cpu", ("onnxruntime", "cpu", "best available")),
        (env(gpu=H200, ort_providers=ORT_GPU), "auto", "auto", ("onnxruntime", "cuda", "TensorRT not installed")),
        (env(H200, TRT10, ort_providers=ORT_GPU), "auto", "auto", ("onnxruntime", "cuda", "CuPy not installed")),
        (env(trt=TRT10, cupy=True, ort_providers=ORT_GPU), "auto", "auto", ("onnxruntime", "cpu", "no CUDA GPU")),
        (env(gpu=H200, ort_providers=ORT_GPU), "onnxruntime", "cuda", ("onnxruntime", "cuda", "requested")),
        (env(gpu=H200, ort_providers=ORT_GPU), "onnxruntime", "cpu", ("onnxruntime", "cpu", "requested")),
        (env(gpu=H200, trt=TRT10, cupy=True), "tensorrt", "auto", ("tensorrt", "cuda", "requested")),
    ],
)
def test_resolve_backend_picks_and_explains(environment, requested, device, expected):
    choice = resolve_backend(requested, device, environment=environment)
    assert (choice.backend, choice.device) == expected[:2]
    assert expected[2] in choice.reason


@pytest.mark.parametrize(
    "environment, requested, device, message",
    [
        (env(), "tensorrt", "auto", r"TensorRT not installed.*galr\[tensorrt\]"),
        (env(trt=TRT10, cupy=True), "tensorrt", "cuda", "no CUDA GPU visible"),
        (env(gpu=H200, trt=TRT10, cupy=True), "tensorrt", "cpu", "runs only on cuda"),
        (env(gpu=H200), "onnxruntime", "cuda", r"no CUDA provider.*galr\[gpu\]"),
        (env(ort_providers=ORT_GPU), "auto", "cuda", "no CUDA GPU visible"),
        (env(ort_providers=None), "auto", "auto", r"no backend can run here.*galr\[cpu\]"),
        (env(ort_providers=None), "onnxruntime", "cpu", "not installed"),
    ],
)
def test_unavailable_requests_raise_with_the_fix(environment, requested, device, message):
    with pytest.raises(BackendUnavailableError, match=message) as raised:
        resolve_backend(requested, device, environment=environment)
    assert raised.value.exit_code == 3


@pytest.mark.parametrize(
    "requested, device, message", [("torch", "auto", "valid backends"), ("auto", "gpu", "valid devices")]
)
def test_unknown_names_list_the_valid_ones(requested, device, message):
    with pytest.raises(InputError, match=message):
        resolve_backend(requested, device, environment=env())


def test_available_backends():
    assert available_backends(env(gpu=H200, trt=TRT10, cupy=True)) == ["tensorrt", "onnxruntime"]
    assert available_backends(env(trt=TRT10, cupy=True)) == ["onnxruntime"]
    assert available_backends(env(ort_providers=None)) == []


def test_the_environment_probes_only_what_a_backend_asks(monkeypatch):
    import galr.runtime.backends.registry as registry

    asked = []
    monkeypatch.setattr(registry, "probe_gpu", lambda: asked.append("gpu"))
    monkeypatch.setattr(registry, "probe_tensorrt", lambda: asked.append("tensorrt"))
    environment = registry.Environment(cupy_available=False, onnxruntime_providers=ORT_CPU)
    choice = resolve_backend("onnxruntime", "cpu", environment=environment)
    assert (choice.backend, choice.device, asked) == ("onnxruntime", "cpu", [])
    resolve_backend("auto", "cpu", environment=environment)
    assert asked == []  # TensorRT runs only on cuda: nothing to probe for the CPU


def test_every_backend_module_registers_itself():
    from galr.runtime.backends.registry import backend_names

    assert backend_names() == ("tensorrt", "onnxruntime")  # rank order: preferred first
