"""An oriented-box detector run inside galr, so images get real DREA input without other tools.

>>> detector = load_detector("yolo11n-obb.onnx", drea_classes=encoders.spec.drea.classes)   # doctest: +SKIP
>>> encoders.encode_images(["scene.png"], local=detector)       # detections -> DREA -> the local branch

The detector is an Ultralytics YOLO-OBB ONNX export (``yolo export model=yolo11n-obb.pt
format=onnx``): its metadata names the classes and the input size, and its output is decoded by
:mod:`galr.preprocess.obb`. It runs on ONNX Runtime through the same runner as the encoders.
Detector classes become DREA categories by name (``normalize_label``: ``"storage tank"`` is
``storage-tank``), or through a class map; classes with no DREA category are dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from galr.errors import NotFoundError
from galr.preprocess.detections import DetectionSet, normalize_label
from galr.preprocess.obb import DetectorModelError, ObbModelInfo, decode, letterbox, to_detections


@dataclass(frozen=True)
class DetectorSettings:
    """Post-processing settings (Ultralytics' prediction defaults).

    Attributes:
        conf: a box is kept when its best class score is above this.
        iou: ProbIoU at or above which Fast-NMS drops the lower-scored box.
        max_det: boxes per image at most.
        class_map: detector class name -> DREA category (names are normalised first); classes
            neither mapped nor named like a DREA category are dropped.
    """

    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    class_map: Mapping[str, str] = field(default_factory=dict)


class Detector:
    """A loaded OBB detector (see the module docstring); made by :func:`load_detector`."""

    def __init__(self, runner: Any, info: ObbModelInfo, labels: Sequence[str | None], settings: DetectorSettings,
                 source: str) -> None:
        self.runner, self.info, self.settings, self.source = runner, info, settings, source
        self.labels = tuple(labels)  # the DREA category of each detector class, or None (dropped)
        self._input = next(iter(runner.inputs))
        self._output = next(iter(runner.outputs))

    def detect_one(self, picture: Any, name: str = "<image>") -> DetectionSet:
        """The detections of one decoded RGB image (a PIL image), in its own pixels."""
        pixels, placement = letterbox(picture, self.info.imgsz)
        output = self.runner.infer({self._input: pixels[None]})[self._output]
        if output.ndim != 3 or output.shape[0] != 1:
            raise DetectorModelError(f"{self.source}: output of shape {output.shape}; expected (1, C, N)")
        settings = self.settings
        boxes, scores, classes = decode(output[0], len(self.info.names), settings.conf, settings.iou,
                                        settings.max_det)
        known = np.array([self.labels[int(c)] is not None for c in classes], dtype=bool)
        return to_detections(boxes[known], scores[known], classes[known], placement,
                             tuple(label or "" for label in self.labels), picture.size, f"{self.source}: {name}")

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "Detector":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _labels(names: Sequence[str], drea_classes: Sequence[str], class_map: Mapping[str, str], source: str
            ) -> list[str | None]:
    known = set(drea_classes)
    mapped = {normalize_label(k): normalize_label(v) for k, v in class_map.items()}
    unknown_targets = sorted(set(mapped.values()) - known)
    if unknown_targets:
        raise DetectorModelError(f"the class map names {unknown_targets}, which are not DREA categories "
                                 f"({sorted(known)})")
    labels = [mapped.get(normalize_label(name), normalize_label(name)) for name in names]
    labels = [label if label in known else None for label in labels]
    if not any(labels):
        raise DetectorModelError(f"none of {source}'s classes {list(names)} is a DREA category ({sorted(known)}); "
                                 "give a class map (detector class -> DREA category)")
    return labels


def load_detector(path: str | os.PathLike | bytes, *, drea_classes: Sequence[str], device: str = "cpu",
                  settings: DetectorSettings = DetectorSettings(), name: str | None = None) -> Detector:
    """Load an Ultralytics OBB detector ONNX (a file, or its bytes) for ONNX Runtime on ``device``.

    Args:
        path: the ``.onnx`` file, or its bytes (a bundled detector).
        drea_classes: the model's DREA categories (``encoders.spec.drea.classes``).
        device: where ONNX Runtime runs it.
        settings: thresholds and class map.
        name: what messages call it (default: the file's path).

    Raises:
        NotFoundError: no such file.
        InputError: not an ONNX model ONNX Runtime can load.
        DetectorModelError: no Ultralytics metadata, a task other than ``obb``, an output that is not
            ``(batch, 4 + classes + 1, N)``, or no class that maps to a DREA category.
    """
    from galr.runtime.backends.onnxruntime import OnnxRuntimeRunner

    if not isinstance(path, bytes):
        path = Path(path)
        if not path.is_file():
            raise NotFoundError(f"detector not found: {path}")
    label = name or (str(path) if not isinstance(path, bytes) else "<detector bytes>")
    runner = OnnxRuntimeRunner(path, device=device)
    try:
        metadata = dict(runner.session.get_modelmeta().custom_metadata_map)
        info = ObbModelInfo.from_metadata(metadata, label)
        runner.activate()
        if len(runner.inputs) != 1 or len(runner.outputs) != 1:
            raise DetectorModelError(f"{label}: {len(runner.inputs)} inputs and {len(runner.outputs)} outputs; an "
                                     "Ultralytics OBB export has one of each (images -> output0)")
        shape = next(iter(runner.outputs.values())).shape
        channels = 4 + len(info.names) + 1
        if len(shape) != 3 or (isinstance(shape[1], int) and shape[1] != channels):
            raise DetectorModelError(f"{label}: output of shape {shape}; an OBB model with {len(info.names)} "
                                     f"classes gives (batch, {channels}, N)")
        return Detector(runner, info, _labels(info.names, drea_classes, settings.class_map, label), settings, label)
    except BaseException:
        runner.close()
        raise


def bundled_detector(bundle: Any, *, drea_classes: Sequence[str], device: str = "cpu",
                     settings: DetectorSettings = DetectorSettings(), backend: str = "auto",
                     tensorrt: Any = None) -> Detector | None:
    """The detector stored in a bundle by ``galr-export --detector`` (hash-checked), or ``None`` without one.

    Args:
        backend: ``"auto"`` runs the bundle's TensorRT plan of the detector when one was built for this
            GPU and TensorRT version (``galr-build``), else ONNX Runtime; ``"tensorrt"`` insists (and
            says how to build the plan); ``"onnxruntime"`` never uses TensorRT.
        tensorrt: :class:`~galr.runtime.backends.tensorrt.TensorRTOptions` (tests inject fakes).

    Raises:
        EngineMismatchError: ``backend="tensorrt"`` and no plan fits this machine.
    """
    entry = bundle.detector
    if entry is None:
        return None
    name = f"{bundle.path.name}:{entry.get('source', 'detector')}"
    plan = _detector_plan(bundle, entry, backend, tensorrt)
    if plan is None:
        return load_detector(bundle.detector_bytes(), drea_classes=drea_classes, device=device, settings=settings,
                             name=name)
    from galr.runtime.backends.tensorrt import TensorRTRunner

    options = tensorrt
    runner = TensorRTRunner(plan, trt=getattr(options, "trt", None), cupy=getattr(options, "cupy", None),
                            **({"gpu_probe": options.gpu_probe} if getattr(options, "gpu_probe", None) else {}))
    try:
        runner.activate()
        info = ObbModelInfo(tuple(entry["names"]), tuple(int(v) for v in entry["imgsz"]))
        return Detector(runner, info, _labels(info.names, drea_classes, settings.class_map, name), settings,
                        f"{name} (TensorRT)")
    except BaseException:
        runner.close()
        raise


def _detector_plan(bundle: Any, entry: Mapping[str, Any], backend: str, tensorrt: Any) -> bytes | None:
    """The bundled detector's TensorRT plan for this GPU and TensorRT version, or ``None`` (ONNX Runtime)."""
    from galr.bundle import EngineMismatchError
    from galr.runtime.backends.device import probe_gpu, probe_tensorrt

    if backend == "onnxruntime":
        return None
    gpu = (getattr(tensorrt, "gpu_probe", None) or probe_gpu)()
    trt = getattr(tensorrt, "trt", None)
    version = str(trt.__version__) if trt is not None else getattr(probe_tensorrt(), "version", None)
    fitting = [e for e in entry.get("engines", []) if gpu is not None and version is not None
               and e.get("compute_capability") == gpu.compute_capability and e.get("tensorrt_version") == version]
    if fitting:
        return bundle.read_member(fitting[-1]["member"])
    if backend == "tensorrt":
        where = f"{gpu.compute_capability} / TensorRT {version}" if gpu is not None and version else "this machine"
        raise EngineMismatchError(f"{bundle.path} has no TensorRT plan of its detector for {where}; build one with "
                                  f"`galr-build {bundle.path}` or run the detector on ONNX Runtime")
    return None


def choose_detector(explicit: str | os.PathLike | None, bundle: Any, *, drea_classes: Sequence[str],
                    use_bundled: bool = True, device: str = "cpu", backend: str = "auto"
                    ) -> tuple[Detector | None, str | None]:
    """The detector a command runs: the one named, else the bundle's own (unless ``use_bundled`` is off;
    on the command's ``backend``: a bundled TensorRT plan when it fits and the backend allows it).

    Returns:
        ``(detector or None, a line saying which one, or None)``.
    """
    if explicit is not None:
        detector = load_detector(explicit, drea_classes=drea_classes, device=device)
        return detector, f"detector: {describe(detector)}"
    if use_bundled and bundle is not None and getattr(bundle, "detector", None):
        detector = bundled_detector(bundle, drea_classes=drea_classes, device=device,
                                    backend=backend if backend in ("tensorrt", "onnxruntime") else "auto")
        return detector, (f"detector: {describe(detector)}, stored in the bundle by galr-export --detector "
                          "(--no-detector leaves it out)")
    return None, None


def describe(detector: Detector) -> str:
    """One line for people: where the detector came from, its classes, input size and DREA mapping."""
    info = detector.info
    return (f"{detector.source} ({len(info.names)} classes, input {info.imgsz[1]}x{info.imgsz[0]}; "
            f"{sum(label is not None for label in detector.labels)} map to DREA)")


__all__ = ["Detector", "DetectorSettings", "bundled_detector", "choose_detector", "describe", "load_detector"]
