"""Detector: latency of an oriented-box detector in galr, and what it costs an index build.

No real YOLO-OBB weights can be downloaded here, so the detector is a stand-in of the same shape
and cost: a YOLO-like convolution stack (SiLU, strides 2 to 32, three heads at strides 8/16/32)
with random weights, sized to about the compute of Ultralytics' YOLO11n-OBB (~17 GFLOPs at its
1024 px input), exported like Ultralytics exports (input ``images [1, 3, S, S]``, output
``output0 [1, 4 + classes + 1, N]``, metadata ``names``/``imgsz``/``stride``/``task``). Its class
scores are pushed low so that, as with a trained model on empty ground, few boxes pass the
confidence threshold: post-processing cost is then realistic rather than a flood of boxes.

==============  ===========================================================================================
case            what is timed
==============  ===========================================================================================
latency         ``Detector.detect_one`` on a 256 px image and on a 1024 px tile (both letterboxed to
                ``imgsz``), per backend (ONNX Runtime CPU; TensorRT where installed, else not run)
indexing        ``Encoders.encode_images`` of ``images`` 256 px images without and with the detector,
                against the sum of the two measured separately (detection adds only its own time)
==============  ===========================================================================================
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from galr.bench.harness import STATUS_OK, Log, not_run, stopwatch

#: DOTA's 15 classes, as Ultralytics' DOTAv1 models name them.
DOTA_NAMES: tuple[str, ...] = ("plane", "ship", "storage tank", "baseball diamond", "tennis court",
                               "basketball court", "ground track field", "harbor", "bridge", "large vehicle",
                               "small vehicle", "helicopter", "roundabout", "soccer ball field", "swimming pool")


@dataclass(frozen=True)
class DetectorBenchSettings:
    """Sizes of the detector benchmark (see the module docstring)."""

    imgsz: int = 1024
    width: int = 40  # 17.4 GFLOPs at 1024 px, as YOLO11n-OBB's 17.2
    images: int = 16
    repeats: int = 5
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_standin_detector(path: Path, settings: DetectorBenchSettings) -> tuple[Path, float]:
    """Write the stand-in OBB ONNX; returns its path and its GFLOPs per image (multiply-adds x 2)."""
    import onnx
    import torch
    from torch import nn

    torch.manual_seed(settings.seed)
    w, classes = settings.width, len(DOTA_NAMES)
    outputs = 4 + classes + 1

    def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.SiLU(),
                             nn.Conv2d(c_out, c_out, 3, 1, 1), nn.SiLU())

    class StandIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, w // 2, 3, 2, 1), nn.SiLU())
            self.p2 = block(w // 2, w, 2)
            self.p3 = block(w, 2 * w, 2)
            self.p4 = block(2 * w, 4 * w, 2)
            self.p5 = block(4 * w, 8 * w, 2)
            self.heads = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.SiLU(), nn.Conv2d(c, outputs, 1))
                                       for c in (2 * w, 4 * w, 8 * w))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            p3 = self.p3(self.p2(self.stem(images)))
            p4 = self.p4(p3)
            p5 = self.p5(p4)
            parts = [head(level).flatten(2) for head, level in zip(self.heads, (p3, p4, p5))]
            raw = torch.cat(parts, 2)
            size = images.shape[-1]
            xywh = torch.sigmoid(raw[:, :4]) * size
            scores = torch.sigmoid(raw[:, 4:4 + classes] - 3.0)  # mostly below the 0.25 threshold
            angle = (torch.sigmoid(raw[:, -1:]) - 0.25) * torch.pi
            return torch.cat([xywh, scores, angle], 1)

    model = StandIn().eval()
    example = torch.zeros(1, 3, settings.imgsz, settings.imgsz)
    macs = 0

    def count(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            macs += output.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(example)
    for hook in hooks:
        hook.remove()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, chosen on purpose (opset 17)
        torch.onnx.export(model, example, str(path), input_names=["images"], output_names=["output0"],
                          opset_version=17, dynamo=False)
    proto = onnx.load(str(path))
    metadata = {"names": str(dict(enumerate(DOTA_NAMES))), "imgsz": str([settings.imgsz, settings.imgsz]),
                "stride": "32", "task": "obb", "batch": "1", "description": "galr-bench stand-in for YOLO11n-OBB"}
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))
    return path, 2 * macs / 1e9


def _best_ms(call: Any, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1e3 * float(np.median(times))


def run_detector_benchmarks(bench: Any | None, settings: DetectorBenchSettings, log: Log) -> dict[str, Any]:
    """The ``detector`` section (needs the benchmark model for the indexing case, and torch/onnx to build the graph)."""
    if bench is None:
        return not_run("the encoder section's model was not built (encoders not selected)")
    import warnings

    from PIL import Image

    from galr.runtime.backends.device import probe_gpu, probe_tensorrt
    from galr.runtime.detector import load_detector
    from galr.runtime.encoders import load_engine

    elapsed = stopwatch()
    rng = np.random.default_rng(settings.seed)
    with tempfile.TemporaryDirectory(prefix="galr-bench-detector-") as work:
        path, gflops = build_standin_detector(Path(work) / "standin-obb.onnx", settings)
        log(f"detector: stand-in OBB graph, {gflops:.1f} GFLOPs per {settings.imgsz} px input")
        images = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(settings.images)]
        tile = Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8))
        with load_engine(bench.bundle, backend="onnxruntime", device="cpu", precision="fp32") as encoders, \
                load_detector(path, drea_classes=encoders.spec.drea.classes) as detector, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            log("detector: latency on a 256 px image and a 1024 px tile")
            image_ms = _best_ms(lambda: detector.detect_one(images[0]), settings.repeats)
            tile_ms = _best_ms(lambda: detector.detect_one(tile), settings.repeats)
            log(f"detector: indexing {settings.images} images without and with the detector")
            without_ms = _best_ms(lambda: encoders.encode_images(images), 2)
            with_ms = _best_ms(lambda: encoders.encode_images(images, local=detector), 2)
            alone_ms = _best_ms(lambda: [detector.detect_one(image) for image in images], 2)
            boxes = sum(len(detector.detect_one(image)) for image in images[:4]) / 4
    tensorrt = ("not run: " + ("TensorRT is not installed" if probe_tensorrt() is None else "no GPU is visible")
                if probe_tensorrt() is None or probe_gpu() is None else "not run: no TensorRT detector runner yet")
    return {"status": STATUS_OK, "settings": settings.to_dict(), "gflops": gflops,
            "backends": {"onnxruntime-cpu": {"image_256_ms": image_ms, "tile_1024_ms": tile_ms},
                         "tensorrt": tensorrt},
            "indexing": {"images": settings.images, "without_ms": without_ms, "with_ms": with_ms,
                         "detector_alone_ms": alone_ms, "explained_ms": without_ms + alone_ms,
                         "images_per_s_without": settings.images / without_ms * 1e3,
                         "images_per_s_with": settings.images / with_ms * 1e3},
            "boxes_per_image": boxes, "seconds": round(elapsed(), 1)}


__all__ = ["DOTA_NAMES", "DetectorBenchSettings", "build_standin_detector", "run_detector_benchmarks"]
