"""Tests for galr.runtime.backends.tensorrt (runner logic, the backend through load_engine) and
galr.runtime.backends.device.

Without a GPU the runner runs against ``tests/fake_tensorrt.py`` and a fake CuPy whose "device memory"
is host numpy arrays keyed by pointer, so shape bookkeeping, buffer reuse and profile checks are real
code paths. ``test_real_engine_round_trip`` is the one real-GPU test (marker ``trt``).
"""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest

from galr.bundle import EngineMismatchError
from galr.runtime.backends import device
from galr.runtime.backends.base import BackendUnavailableError, RunnerError
from galr.runtime.backends.device import (
    GpuInfo,
    parse_nvidia_smi,
    probe_gpu,
    probe_tensorrt,
)
from galr.runtime.backends.tensorrt import ProfileRange, TensorRTRunner
from tests.fake_tensorrt import V10, V11, IOTensor, called, make_fake_tensorrt

H200 = GpuInfo(name="NVIDIA H200", compute_capability="sm_90")
TEXT_PROFILE = ((1, 1), (8, 32), (32, 64))


class FakeDeviceArray:
    def __init__(self, cupy: "types.ModuleType", shape, dtype) -> None:
        self.host = np.zeros(shape, dtype=dtype)
        cupy.next_ptr += 256
        self.data = types.SimpleNamespace(ptr=cupy.next_ptr)
        cupy.memory[self.data.ptr] = self.host

    def set(self, array, stream=None) -> None:
        self.host[...] = array

    def get(self, stream=None) -> np.ndarray:
        return self.host.copy()


def make_fake_cupy() -> types.ModuleType:
    cupy = types.ModuleType("cupy")
    cupy.memory, cupy.next_ptr, cupy.allocations = {}, 4096, 0

    def empty(shape, dtype):
        cupy.allocations += 1
        return FakeDeviceArray(cupy, shape, dtype)

    stream = types.SimpleNamespace(ptr=77, synchronize=lambda: None)
    cupy.empty = empty
    cupy.cuda = types.SimpleNamespace(Stream=lambda non_blocking=False: stream)
    return cupy


def text_encoder(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stand-in for the text engine: a [B, 4] embedding from token sums."""
    total = feeds["tokens"].sum(axis=1, keepdims=True).astype(np.float32)
    return {"text_embedding": np.repeat(total, 4, axis=1)}


TEXT_IO = [
    IOTensor("tokens", "int64", (-1, -1), True, TEXT_PROFILE),
    IOTensor("text_embedding", "float32", (-1, 4), False),
]


def make_runner(version: str = V10, io=TEXT_IO, **runner_kwargs):
    cupy = make_fake_cupy()
    trt = make_fake_tensorrt(version, io_tensors=io, compute=text_encoder, memory=cupy.memory)
    runner = TensorRTRunner(b"FAKE-PLAN", trt=trt, cupy=cupy, gpu_probe=lambda: H200, **runner_kwargs)
    return runner, trt, cupy


def tokens(batch: int, length: int) -> dict[str, np.ndarray]:
    return {"tokens": np.arange(batch * length, dtype=np.int64).reshape(batch, length)}


# ---------------------------------------------------------------------------------------------------
# Runner on the fakes


@pytest.mark.parametrize("version", [V10, V11])
def test_runner_reads_io_and_profiles(version):
    runner, _, _ = make_runner(version)
    assert (runner.inputs["tokens"].dtype, runner.inputs["tokens"].shape) == ("int64", (None, None))
    assert (runner.outputs["text_embedding"].dtype, runner.outputs["text_embedding"].shape) == ("float32", (None, 4))
    assert runner.profiles["tokens"] == ProfileRange("tokens", *TEXT_PROFILE)
    assert runner.max_batch_size == 32


def test_runner_runs_and_copies_outputs_back():
    runner, trt, _ = make_runner()
    with runner:
        out = runner.infer(tokens(3, 5))["text_embedding"]
    np.testing.assert_array_equal(out, text_encoder(tokens(3, 5))["text_embedding"])
    assert called(trt, "execute_async_v3") == [("execute_async_v3", 77)]


def test_buffers_are_allocated_once_per_shape_and_rebound_on_change():
    runner, trt, cupy = make_runner()
    with runner:
        runner.infer(tokens(2, 5))
        runner.infer(tokens(2, 5))
        assert cupy.allocations == 2  # one input + one output buffer
        assert called(trt, "set_input_shape") == [("set_input_shape", "tokens", (2, 5))]
        runner.infer(tokens(4, 7))
        assert cupy.allocations == 4 and runner.cached_shape_count == 2
        out = runner.infer(tokens(2, 5))["text_embedding"]
        assert cupy.allocations == 4  # reused, but shape and addresses bound again
        assert called(trt, "set_input_shape")[-1] == ("set_input_shape", "tokens", (2, 5))
        assert len(called(trt, "set_tensor_address")) == 6
    np.testing.assert_array_equal(out, text_encoder(tokens(2, 5))["text_embedding"])


def test_rejected_shape_does_not_leave_a_stale_binding():
    runner, trt, _ = make_runner()
    with runner:
        runner.infer(tokens(2, 5))
        context = trt.contexts[-1]
        record_shape = context.set_input_shape
        context.set_input_shape = lambda name, shape: False
        with pytest.raises(RunnerError, match=r"TensorRT rejected shape \[3, 5\] for input 'tokens'"):
            runner.infer(tokens(3, 5))
        context.set_input_shape = record_shape
        runner.infer(tokens(2, 5))
    assert called(trt, "set_input_shape") == [("set_input_shape", "tokens", (2, 5))] * 2


def test_least_recently_used_shapes_are_evicted():
    runner, _, cupy = make_runner(max_cached_shapes=2)
    with runner:
        for length in (3, 4, 5, 3):
            runner.infer(tokens(1, length))
        assert runner.cached_shape_count == 2
        assert cupy.allocations == 8  # length 3 was evicted by 5, so it is allocated again


@pytest.mark.parametrize(
    "batch, length, advice",
    [
        (33, 8, "split the batch into chunks of at most 32 rows"),
        (2, 65, "rebuild the engine"),
        (0, 8, "at least 1 row"),
    ],
)
def test_out_of_profile_inputs_name_input_shape_and_range(batch, length, advice):
    runner, trt, _ = make_runner()
    with runner, pytest.raises(RunnerError) as excinfo:
        runner.infer(tokens(batch, length))
    message = str(excinfo.value)
    assert f"input 'tokens' has shape [{batch}, {length}]" in message
    assert "min [1, 1], max [32, 64]" in message and advice in message
    assert called(trt, "set_input_shape") == []


def test_static_engine_has_no_batch_limit():
    io = [IOTensor("x", "float32", (2, 4), True), IOTensor("y", "float32", (2, 4), False)]
    runner, _, _ = make_runner(io=io)
    assert runner.max_batch_size is None
    assert runner.profiles["x"] == ProfileRange("x", (2, 4), (2, 4), (2, 4))


def test_refused_enqueue_is_an_error():
    cupy = make_fake_cupy()
    trt = make_fake_tensorrt(V11, io_tensors=TEXT_IO, execute_result=False)
    with TensorRTRunner(b"FAKE-PLAN", trt=trt, cupy=cupy, gpu_probe=lambda: H200) as runner:
        with pytest.raises(RunnerError, match="refused to enqueue"):
            runner.infer(tokens(1, 3))


def test_close_releases_buffers_and_activate_makes_a_new_context():
    runner, trt, _ = make_runner()
    runner.activate()
    runner.infer(tokens(1, 3))
    runner.close()
    assert runner.cached_shape_count == 0
    with runner:
        runner.infer(tokens(1, 3))
    assert len(called(trt, "create_execution_context")) == 2


def test_undeserializable_plan_is_an_engine_mismatch():
    trt = make_fake_tensorrt(V10, io_tensors=TEXT_IO)
    with pytest.raises(EngineMismatchError, match="galr-build"):
        TensorRTRunner(b"plan from another TensorRT", trt=trt, cupy=make_fake_cupy(), gpu_probe=lambda: H200)


def test_version_compatible_plans_allow_host_code():
    _, trt, _ = make_runner(allow_host_code=True)
    assert called(trt, "deserialize_cuda_engine") == [("deserialize_cuda_engine", True)]


def test_bf16_tensor_is_refused_by_name():
    trt = make_fake_tensorrt(V11, io_tensors=TEXT_IO)
    trt.engine.get_tensor_dtype = lambda name: trt.DataType.BF16
    with pytest.raises(RunnerError, match="tensor 'tokens' has TensorRT type DataType.BF16"):
        TensorRTRunner(b"FAKE-PLAN", trt=trt, cupy=make_fake_cupy(), gpu_probe=lambda: H200)


def test_no_gpu_refuses_before_any_tensorrt_object():
    trt = make_fake_tensorrt(V10, io_tensors=TEXT_IO)
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
        TensorRTRunner(b"FAKE-PLAN", trt=trt, cupy=make_fake_cupy(), gpu_probe=lambda: None)
    assert trt.calls == []


@pytest.mark.parametrize(
    "missing, injected, message",
    [("tensorrt", "cupy", r"galr\[tensorrt\]"), ("cupy", "trt", r"CuPy.*galr\[tensorrt\].*cupy-cuda13x")],
)
def test_missing_dependencies_name_the_extra(monkeypatch, missing, injected, message):
    monkeypatch.setitem(sys.modules, missing, None)
    fakes = {"trt": make_fake_tensorrt(V10, io_tensors=TEXT_IO), "cupy": make_fake_cupy()}
    with pytest.raises(ImportError, match=message):
        TensorRTRunner(b"FAKE-PLAN", gpu_probe=lambda: H200, **{injected: fakes[injected]})


def test_profile_range_contains():
    profile = ProfileRange("tokens", *TEXT_PROFILE)
    assert profile.contains((1, 1)) and profile.contains((32, 64))
    assert not profile.contains((1, 1, 1)) and not profile.contains((32, 65))


# ---------------------------------------------------------------------------------------------------
# Device probing (no GPU here: the probes must answer None, never raise)


def _fake_cupy_runtime(monkeypatch, **runtime_functions) -> None:
    runtime = types.SimpleNamespace(**runtime_functions)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime)))


def _nvidia_smi(monkeypatch, run=None) -> None:
    """Pretend nvidia-smi is (``run`` given) or is not on PATH."""
    monkeypatch.setattr(device.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if run else None)
    if run is not None:
        monkeypatch.setattr(device.subprocess, "run", run)


def test_probe_gpu_without_anything_is_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    _nvidia_smi(monkeypatch)
    assert probe_gpu() is None


def test_probe_gpu_with_cupy(monkeypatch):
    _fake_cupy_runtime(
        monkeypatch,
        getDeviceCount=lambda: 2,
        getDeviceProperties=lambda index: {"name": b"NVIDIA H200", "major": 9, "minor": 0},
        driverGetVersion=lambda: 12080,
        runtimeGetVersion=lambda: 12040,
    )
    assert probe_gpu() == GpuInfo("NVIDIA H200", "sm_90", None, "12.8", "12.4", count=2, source="cupy")


def test_probe_gpu_with_a_broken_cuda_falls_through(monkeypatch):
    def fail():
        raise RuntimeError("cudaErrorNoDevice")

    _fake_cupy_runtime(monkeypatch, getDeviceCount=fail)
    _nvidia_smi(monkeypatch)
    assert probe_gpu() is None


def test_probe_gpu_with_nvidia_smi(monkeypatch):
    seen = {}

    def run(command, **kwargs):
        seen.update(command=command, timeout=kwargs["timeout"])
        return subprocess.CompletedProcess(command, 0, stdout="NVIDIA H200, 9.0, 570.86.15\n", stderr="")

    monkeypatch.setitem(sys.modules, "cupy", None)
    _nvidia_smi(monkeypatch, run)
    assert probe_gpu() == GpuInfo("NVIDIA H200", "sm_90", "570.86.15", count=1, source="nvidia-smi")
    assert "--query-gpu=name,compute_cap,driver_version" in seen["command"]
    assert seen["timeout"] <= 10


@pytest.mark.parametrize("failure", [subprocess.TimeoutExpired("nvidia-smi", 5), OSError("exec format error")])
def test_probe_gpu_survives_a_hanging_or_broken_nvidia_smi(monkeypatch, failure):
    def run(command, **kwargs):
        raise failure

    monkeypatch.setitem(sys.modules, "cupy", None)
    _nvidia_smi(monkeypatch, run)
    assert probe_gpu() is None


@pytest.mark.parametrize(
    "output, expected",
    [
        ("", None),
        ("NVIDIA GeForce GTX 1080, [N/A], 470.1\n", None),
        ("Orin, 8.7\n", GpuInfo("Orin", "sm_87", None, count=1, source="nvidia-smi")),
        ("A100, 8.0, 550.1\nA100, 8.0, 550.1\n", GpuInfo("A100", "sm_80", "550.1", count=2, source="nvidia-smi")),
    ],
)
def test_parse_nvidia_smi(output, expected):
    assert parse_nvidia_smi(output) == expected


def test_probe_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(V11))
    info = probe_tensorrt()
    assert (info.version, info.major) == (V11, 11)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert probe_tensorrt() is None


def test_gpu_info_round_trip():
    info = GpuInfo("NVIDIA H200", "sm_90", "570.86.15", "12.8", "12.4", count=8, source="cupy")
    assert GpuInfo.from_dict(info.to_dict()) == info


# ---------------------------------------------------------------------------------------------------
# Real GPU


@pytest.mark.trt
def test_real_engine_round_trip():
    """Build a tiny engine with the real TensorRT and run it through the runner (needs a GPU)."""
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install galr[tensorrt])")
    pytest.importorskip("cupy", reason="CuPy is not installed (pip install galr[gpu])")
    onnx = pytest.importorskip("onnx", reason="onnx builds the test graph")
    if probe_gpu() is None:
        pytest.skip("no CUDA GPU visible")
    from galr.export.tensorrt import TensorRTBuildConfig, build_engine

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "relu",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    config = TensorRTBuildConfig(profiles={"x": ((1, 4), (4, 4), (8, 4))}, workspace_bytes=1 << 28)
    plan = build_engine(model.SerializeToString(), config, trt=trt)
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    with TensorRTRunner(plan) as runner:
        assert runner.max_batch_size == 8
        np.testing.assert_array_equal(runner.infer({"x": x})["y"], np.maximum(x, 0))
