"""Tests for galr.runtime.detector: an ONNX graph shaped like an Ultralytics OBB export, built here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

onnx = pytest.importorskip("onnx", reason="building the test detector needs onnx")
pytest.importorskip("onnxruntime", reason="the detector runs on ONNX Runtime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from galr.errors import InputError  # noqa: E402
from galr.preprocess.detections import Detection, DetectionSet  # noqa: E402
from galr.preprocess.drea import DOTA_V1_CLASSES  # noqa: E402
from galr.preprocess.obb import DetectorModelError, corners  # noqa: E402
from galr.runtime.detector import DetectorSettings, load_detector  # noqa: E402
from tests.test_runtime_cli import deployment  # noqa: E402,F401  (the shared module fixture)

NAMES = {0: "plane", 1: "ship", 2: "storage tank", 3: "windmill"}
SIZE = 64
# Planted boxes in letterboxed input pixels: (cx, cy, w, h, angle), class, score.
PLANTED = [((20.0, 30.0, 12.0, 6.0, 0.4), 0, 0.9), ((44.0, 30.0, 8.0, 8.0, 1.2), 2, 0.7),
           ((20.5, 30.0, 12.0, 6.0, 0.4), 0, 0.5), ((50.0, 40.0, 6.0, 6.0, 0.0), 3, 0.95)]


def planted_output(nc: int = len(NAMES), rows: int = 30) -> np.ndarray:
    output = np.zeros((1, 4 + nc + 1, rows), np.float32)
    output[0, 4:4 + nc] = 0.01
    for column, ((cx, cy, w, h, angle), klass, score) in enumerate(PLANTED):
        output[0, :4, column] = (cx, cy, w, h)
        output[0, 4 + klass, column] = score
        output[0, -1, column] = angle
    return output


def write_detector(path: Path, *, metadata: dict[str, str] | None = None, output: np.ndarray | None = None) -> Path:
    """A graph with the export's input/output names and metadata whose output is the planted tensor
    (plus 0 x the input, so the input is used)."""
    output = planted_output() if output is None else output
    nodes = [
        helper.make_node("Constant", [], ["planted"], value=numpy_helper.from_array(output, "planted")),
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.float32), "zero")),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["planted", "nothing"], ["output0"]),
    ]
    graph = helper.make_graph(nodes, "obb", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                          [1, 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(output.shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    values = {"names": str(NAMES), "imgsz": f"[{SIZE}, {SIZE}]", "stride": "32", "task": "obb"}
    helper.set_model_props(model, values if metadata is None else metadata)
    onnx.save(model, path)
    return path


def expected_detections(image_size: tuple[int, int], source: str) -> DetectionSet:
    """The planted plane and storage tank in image pixels, computed here from the letterbox rule."""
    width, height = image_size
    gain = min(SIZE / height, SIZE / width)
    left, top = round((SIZE - round(width * gain)) / 2 - 0.1), round((SIZE - round(height * gain)) / 2 - 0.1)
    found = []
    for (cx, cy, w, h, angle), klass, score in PLANTED[:2]:  # the second plane is suppressed; windmill unmapped
        box = np.array([(cx - left) / gain, (cy - top) / gain, w / gain, h / gain, angle])
        label = {0: "plane", 2: "storage-tank"}[klass]
        found.append(Detection.from_polygon(label, score, corners(box)))
    return DetectionSet(tuple(found), width=width, height=height, source=source)


def test_detections_come_back_in_image_pixels_with_drea_labels(tmp_path):
    detector = load_detector(write_detector(tmp_path / "det.onnx"), drea_classes=DOTA_V1_CLASSES)
    assert detector.info.imgsz == (SIZE, SIZE) and detector.labels == ("plane", "ship", "storage-tank", None)
    image = Image.new("RGB", (128, 64), (30, 90, 60))
    found = detector.detect_one(image, "wide.png")
    want = expected_detections((128, 64), "x")
    assert [d.label for d in found.detections] == ["plane", "storage-tank"]
    for got, expected in zip(found.detections, want.detections):
        assert got.score == pytest.approx(expected.score)
        np.testing.assert_allclose(got.polygon, expected.polygon, atol=1e-4)
        np.testing.assert_allclose(got.box, expected.box, atol=1e-4)
    assert found.width == 128 and found.height == 64


def test_a_class_map_maps_other_names(tmp_path):
    settings = DetectorSettings(class_map={"windmill": "small vehicle"})
    detector = load_detector(write_detector(tmp_path / "det.onnx"), drea_classes=DOTA_V1_CLASSES, settings=settings)
    assert detector.labels[3] == "small-vehicle"
    assert "small-vehicle" in [d.label for d in detector.detect_one(Image.new("RGB", (64, 64))).detections]
    with pytest.raises(DetectorModelError, match="not DREA categories"):
        load_detector(tmp_path / "det.onnx", drea_classes=DOTA_V1_CLASSES,
                      settings=DetectorSettings(class_map={"windmill": "tower"}))


def test_drea_input_from_the_detector_equals_drea_from_the_same_boxes(deployment, tmp_path):  # noqa: F811
    engine = deployment["engine"]
    detector = load_detector(write_detector(tmp_path / "det.onnx"), drea_classes=engine.spec.drea.classes)
    path = deployment["root"] / "images" / "img_02.png"
    size = Image.open(path).size
    from_detector = engine.encode_images([path], local=detector)
    from_boxes = engine.encode_images([path], local=[expected_detections(size, str(path))])
    np.testing.assert_allclose(from_detector, from_boxes, atol=1e-6)
    with pytest.warns(UserWarning):
        without = engine.encode_images([path], local=None)
    assert not np.allclose(from_detector, without, atol=1e-4)  # the local branch really got the boxes
    with pytest.raises(InputError, match="not preprocessed arrays"):
        engine.encode_images(np.zeros((1, 3, 8, 8), np.float32), local=detector)


@pytest.mark.parametrize("make, error, message", [
    (lambda p: p.write_bytes(b"not an onnx model"), InputError, "could not load"),
    (lambda p: write_detector(p, metadata={"names": str(NAMES), "task": "detect"}), DetectorModelError,
     "'detect' model"),
    (lambda p: write_detector(p, metadata={}), DetectorModelError, "no Ultralytics metadata"),
    (lambda p: write_detector(p, output=np.zeros((1, 7, 30), np.float32)), DetectorModelError,
     "output of shape"),  # 4 classes need 9 channels
    (lambda p: write_detector(p, metadata={"names": "{0: 'windmill'}", "task": "obb", "imgsz": "[64, 64]"},
                              output=np.zeros((1, 6, 4), np.float32)), DetectorModelError, "none of"),
])
def test_bad_detector_files_are_refused(tmp_path, make, error, message):
    path = tmp_path / "bad.onnx"
    make(path)
    with pytest.raises(error, match=message):
        load_detector(path, drea_classes=DOTA_V1_CLASSES)


def test_nan_outputs_are_refused_when_detecting(tmp_path):
    output = planted_output()
    output[0, 0, 0] = math.nan
    detector = load_detector(write_detector(tmp_path / "nan.onnx", output=output), drea_classes=DOTA_V1_CLASSES)
    with pytest.raises(DetectorModelError, match="NaN"):
        detector.detect_one(Image.new("RGB", (64, 64)))


def test_galr_index_runs_the_detector_on_every_image(tmp_path, monkeypatch):
    from galr.runtime.cli import index as index_cli
    from tests.test_index import FakeEngine, write_image

    monkeypatch.chdir(tmp_path)
    for seed in range(3):
        write_image(tmp_path / "scenes" / f"{seed}.png", seed)
    Path("galr.plan").write_bytes(b"placeholder")
    engines: list[FakeEngine] = []
    monkeypatch.setattr(index_cli, "load_engine", lambda *a, **k: engines.append(FakeEngine()) or engines[-1])
    write_detector(tmp_path / "det.onnx")
    result = CliRunner().invoke(index_cli.main, ["--no-progress", "scenes", "--detector", "det.onnx"])
    assert result.exit_code == 0, result.output
    assert "detector: det.onnx (4 classes, input 64x64; 3 map to DREA)" in result.output
    assert all(hasattr(local, "detect_one") for _, local in engines[0].calls)
    both = CliRunner().invoke(index_cli.main, ["scenes", "--detector", "det.onnx", "--detections", "scenes"])
    assert both.exit_code == 2 and "give one of --detections, --local or --detector" in both.output


def test_galr_serve_runs_its_detector_on_uploaded_images(deployment, tmp_path):  # noqa: F811
    pytest.importorskip("fastapi", reason="galr-serve needs the serve extra")
    pytest.importorskip("httpx", reason="the FastAPI test client needs httpx")
    from galr.runtime.serve import ServeSettings, create_app
    from tests.test_serve import started

    engine = deployment["engine"]
    path = deployment["root"] / "images" / "img_02.png"
    detector_file = write_detector(tmp_path / "det.onnx")
    client = started(create_app(ServeSettings(bundle=deployment["bundle"], index=deployment["index"],
                                              detector=detector_file), encoders=engine))
    try:
        answer = client.post("/v1/embed/image", files={"image": ("img.png", path.read_bytes(), "image/png")}).json()
        detector = load_detector(detector_file, drea_classes=engine.spec.drea.classes)
        np.testing.assert_allclose(answer["embedding"], engine.encode_images([path], local=detector)[0], atol=1e-5)
        assert "det.onnx" in answer["note"]
        found = client.post("/v1/search/image", files={"image": ("img.png", path.read_bytes(), "image/png")}).json()
        assert found["images"] and "det.onnx" in found["note"]
    finally:
        client.__exit__(None, None, None)


def test_a_bundled_detector_is_checked_stored_and_used_by_default(deployment, tmp_path, monkeypatch):  # noqa: F811
    import zipfile

    from galr.bundle import DETECTOR_MEMBER, BundleError, read_bundle
    from galr.export.pipeline import ExportSettings, export_bundle
    from galr.runtime.cli import index as index_cli
    from galr.runtime.cli.run import main as run_main

    checkpoint = deployment["root"] / "m.pt"
    detector_file = write_detector(tmp_path / "det.onnx")
    bundle_path = tmp_path / "with-detector.plan"
    export_bundle(ExportSettings(checkpoint=checkpoint, output=bundle_path, tensorrt="no", detector=detector_file),
                  log=lambda _: None)
    bundle = read_bundle(bundle_path, verify=True)
    assert bundle.detector["source"] == "det.onnx" and bundle.detector["task"] == "obb"
    assert bundle.detector_bytes() == detector_file.read_bytes()
    # galr-index uses it by default and says so; --no-detector leaves it out
    images = deployment["root"] / "images"
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(deployment["bank"]) + "\n")
    used = CliRunner().invoke(index_cli.main, ["--no-progress", str(images), "--engine", str(bundle_path),
                                               "-o", str(tmp_path / "a.gidx"), "--text-bank", str(captions)])
    assert used.exit_code == 0, used.output
    assert "stored in the bundle by galr-export --detector" in used.output and "no-detection fallback" not in used.output
    left_out = CliRunner().invoke(index_cli.main, ["--no-progress", str(images), "--engine", str(bundle_path),
                                                   "-o", str(tmp_path / "b.gidx"), "--no-detector"])
    assert left_out.exit_code == 0 and "no-detection fallback" in left_out.output
    query = tmp_path / "q.txt"
    query.write_text(str(images / "img_02.png") + "\n")
    shown = CliRunner().invoke(run_main, [str(query), "--engine", str(bundle_path), "--index", str(tmp_path / "a.gidx"),
                                          "--mode", "image2text", "--no-rerank"])
    assert shown.exit_code == 0 and "stored in the bundle" in shown.output, shown.output
    # a detector whose classes are no DREA category is refused before anything is written
    foreign = write_detector(tmp_path / "foreign.onnx", metadata={"names": "{0: 'windmill'}", "task": "obb",
                                                                   "imgsz": "[64, 64]"},
                             output=np.zeros((1, 6, 4), np.float32))
    refused = tmp_path / "refused.plan"
    with pytest.raises(DetectorModelError, match="none of"):
        export_bundle(ExportSettings(checkpoint=checkpoint, output=refused, tensorrt="no", detector=foreign),
                      log=lambda _: None)
    assert not refused.exists()
    # a damaged detector member is refused when it is read
    damaged = tmp_path / "damaged.plan"
    with zipfile.ZipFile(bundle_path) as source, zipfile.ZipFile(damaged, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = source.read(info.filename)
            target.writestr(info, data[:-1] + bytes([data[-1] ^ 1]) if info.filename == DETECTOR_MEMBER else data)
    with pytest.raises(BundleError):
        read_bundle(damaged).detector_bytes()


def test_the_bundled_detector_gets_a_tensorrt_plan_from_galr_build_and_runs_on_it(deployment, tmp_path):  # noqa: F811
    """With a fake TensorRT: galr-build builds the detector's plan, keyed by GPU, TensorRT and detector;
    the runtime runs it when it fits and falls back (auto) or refuses (tensorrt) when it does not."""
    import types

    from galr.bundle import EngineMismatchError, read_bundle
    from galr.export import engines as engines_module
    from galr.export.pipeline import ExportSettings, export_bundle
    from galr.runtime.backends.device import GpuInfo
    from galr.runtime.backends.tensorrt import TensorRTOptions
    from galr.runtime.detector import bundled_detector
    from tests.fake_tensorrt import V10, IOTensor, add_engine, make_fake_tensorrt
    from tests.test_backend_tensorrt import make_fake_cupy

    h200, l4 = GpuInfo("NVIDIA H200", "sm_90"), GpuInfo("NVIDIA L4", "sm_89")
    bundle_path = tmp_path / "det.plan"
    export_bundle(ExportSettings(checkpoint=deployment["root"] / "m.pt", output=bundle_path, tensorrt="no",
                                 detector=write_detector(tmp_path / "det.onnx")), log=lambda _: None)
    fake = make_fake_tensorrt(V10, build_result=lambda network: f"PLAN-{network.inputs[0].name}".encode())
    engines_module.build_bundle_engines(bundle_path, ["fp32"], trt=fake, log=lambda _: None, gpu_probe=lambda: h200)
    bundle = read_bundle(bundle_path, verify=True)
    [plan_entry] = bundle.detector["engines"]
    assert plan_entry["key"].startswith(f"sm_90-trt{V10}-") and plan_entry["member"].startswith("engines/detector/")
    assert bundle.read_member(plan_entry["member"]) == b"PLAN-images"
    profiles = [profile.shapes for builder in fake.builders if builder.config is not None
                for profile in builder.config.profiles if "images" in profile.shapes]
    assert profiles == [{"images": ((1, 3, 64, 64),) * 3}]  # batch 1 at the detector's own input size

    cupy = make_fake_cupy()
    cupy.cuda = types.SimpleNamespace(Stream=lambda non_blocking=False: types.SimpleNamespace(
        ptr=5, synchronize=lambda: None))
    planted = planted_output()
    add_engine(fake, b"PLAN-images", [IOTensor("images", "float32", (1, 3, 64, 64), True),
                                      IOTensor("output0", "float32", planted.shape, False)],
               lambda feeds: {"output0": planted.copy()}, cupy.memory)
    engine = deployment["engine"]
    on_trt = bundled_detector(bundle, drea_classes=engine.spec.drea.classes, backend="tensorrt",
                              tensorrt=TensorRTOptions(trt=fake, cupy=cupy, gpu_probe=lambda: h200))
    picture = Image.new("RGB", (64, 64))
    on_ort = bundled_detector(bundle, drea_classes=engine.spec.drea.classes, backend="onnxruntime")
    assert "(TensorRT)" in on_trt.source and "(TensorRT)" not in on_ort.source
    assert [d.box for d in on_trt.detect_one(picture).detections] == [d.box for d in on_ort.detect_one(picture).detections]
    with pytest.raises(EngineMismatchError, match="galr-build"):
        bundled_detector(bundle, drea_classes=engine.spec.drea.classes, backend="tensorrt",
                         tensorrt=TensorRTOptions(trt=fake, cupy=cupy, gpu_probe=lambda: l4))
    fallback = bundled_detector(bundle, drea_classes=engine.spec.drea.classes, backend="auto",
                                tensorrt=TensorRTOptions(trt=fake, cupy=cupy, gpu_probe=lambda: l4))
    assert "(TensorRT)" not in fallback.source
