"""Torch-free GaLR encoders over a ``galr.plan`` bundle: captions and images in, embeddings out.

>>> engine = load_engine("galr.plan")                      # doctest: +SKIP
>>> text = engine.encode_text(["two planes next to a runway"])  # (1, D) float32, unit rows
>>> images = engine.encode_images(["scene.png"], local="detections/")

Thread safety: one engine may be shared by threads. ONNX Runtime sessions run concurrently;
a TensorRT execution context does not, so each TensorRT graph is guarded by its own lock.
"""

from __future__ import annotations

import os
import threading
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from galr import graphs
from galr.config import GaLRConfig
from galr.preprocess.text import Tokenizer, Vocabulary
from galr.runtime.backends.base import Runner
from galr.runtime.bundle import Bundle, BundleError, read_bundle

DEFAULT_IMAGE_BATCH = 32
DEFAULT_TEXT_BATCH = 128


class QueryError(ValueError):
    """A query cannot be encoded (empty or whitespace-only text)."""


class UnknownWordsWarning(UserWarning):
    """A query has no word in the model's vocabulary, so its embedding carries no meaning."""


def _renormalise(x: np.ndarray) -> np.ndarray:
    # Reduced-precision engines drift off unit norm by ~1e-4; scores are cosines, so fix it in FP32.
    x = np.asarray(x, dtype=np.float32)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)


@dataclass(frozen=True)
class EngineInfo:
    """What is running: shown by the CLI so nobody has to guess."""

    backend: str
    device: str
    precision: str
    reason: str
    bundle: str

    def describe(self) -> str:
        return f"{self.backend} on {self.device.upper()} at {self.precision} ({self.reason})"


class GaLREngine:
    """The two GaLR towers served from a bundle with one backend at one precision.

    Build with :func:`load_engine`. ``encode_text`` and ``encode_images`` return L2-normalised
    float32 ``(n, D)`` arrays whose dot products are the model's cosine similarities.
    """

    def __init__(self, bundle: Bundle, runners: dict[str, Runner], info: EngineInfo,
                 max_batch: dict[str, int] | None = None) -> None:
        from galr.preprocess.drea import DREAConfig
        from galr.preprocess.image import ImagePreprocessConfig

        manifest = bundle.manifest
        self.bundle = bundle
        self.info = info
        self.config = GaLRConfig.from_dict(manifest["model"])
        self.vocab = Vocabulary.from_json_dict(manifest["vocab"], source=f"{bundle.path}:manifest.json")
        self.tokenizer = Tokenizer(self.vocab, max_length=int(manifest.get("tokenizer", {}).get("max_length", 64)))
        self.image_config = ImagePreprocessConfig.from_dict(manifest["preprocess"]) if manifest.get("preprocess") else ImagePreprocessConfig()
        self.drea_config = DREAConfig.from_dict(manifest["drea"]) if manifest.get("drea") else DREAConfig()
        if self.image_config.size != self.config.image_size:
            raise BundleError(f"{bundle.path}: preprocessing resizes to {self.image_config.size} px but the model "
                              f"takes {self.config.image_size} px; re-export the bundle")
        self._runners = runners
        self._max_batch = max_batch or {}
        serial = info.backend == "tensorrt"
        self._locks = {name: threading.Lock() if serial else nullcontext() for name in runners}

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def model_hash(self) -> str:
        return self.bundle.model_hash

    def close(self) -> None:
        for runner in self._runners.values():
            runner.close()

    def __enter__(self) -> "GaLREngine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- graphs -------------------------------------------------------------------------------
    def _run(self, graph: str, feeds: dict[str, np.ndarray], default_batch: int) -> np.ndarray:
        runner = self._runners[graph]
        output = next(iter(runner.outputs))
        n = next(iter(feeds.values())).shape[0]
        step = self._max_batch.get(graph) or default_batch
        parts = []
        for start in range(0, n, step):
            chunk = {k: v[start:start + step] for k, v in feeds.items()}
            with self._locks[graph]:
                parts.append(runner.infer(chunk)[output])
        return np.concatenate(parts) if parts else np.zeros((0, self.embed_dim), np.float32)

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Embeddings of right-padded token ids int64 [n, T] (0 = padding)."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        return _renormalise(self._run(graphs.TEXT, {graphs.TOKENS: tokens}, DEFAULT_TEXT_BATCH))

    def encode_text(self, captions: Sequence[str]) -> np.ndarray:
        """Embeddings of captions/queries, tokenised exactly as the original.

        Raises:
            QueryError: for an empty or whitespace-only query (it would select padding state).
        Warns:
            UnknownWordsWarning: when a query has no in-vocabulary word.
        """
        if isinstance(captions, str):
            captions = [captions]
        for index, caption in enumerate(captions):
            if not isinstance(caption, str) or not caption.strip():
                raise QueryError(f"query #{index} is empty or whitespace only; give at least one word")
        batch = self.tokenizer.encode_batch(list(captions))
        unk = self.vocab.unk_id
        for index, row in enumerate(batch.tokens):
            words = row[: batch.lengths[index]]
            if len(words) == 0:
                raise QueryError(f"query #{index} ({captions[index]!r}) has no words after removing punctuation")
            if np.all(words == unk):
                warnings.warn(f"query #{index} ({captions[index][:60]!r}) has no word in the model's "
                              f"vocabulary of {len(self.vocab)}; its results are arbitrary", UnknownWordsWarning,
                              stacklevel=2)
        return self.encode_tokens(batch.tokens)

    def encode_image_arrays(self, images: np.ndarray, local_rep: np.ndarray, local_adj: np.ndarray) -> np.ndarray:
        """Embeddings of preprocessed images [n, 3, S, S] with their DREA matrices."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        global_feature = self._run(graphs.GLOBAL, {graphs.IMAGE: images}, DEFAULT_IMAGE_BATCH)
        local_feature = self._run(graphs.LOCAL, {graphs.LOCAL_REP: np.ascontiguousarray(local_rep, np.float32),
                                                 graphs.LOCAL_ADJ: np.ascontiguousarray(local_adj, np.float32)},
                                  DEFAULT_IMAGE_BATCH)
        fused = self._run(graphs.FUSION, {graphs.GLOBAL_FEATURE: global_feature, graphs.LOCAL_FEATURE: local_feature},
                          DEFAULT_IMAGE_BATCH)
        return _renormalise(fused)

    def encode_images(self, images: Any, local: Any = None) -> np.ndarray:
        """Embeddings of images.

        Args:
            images: a float32 array [n, 3, S, S] already preprocessed, or a sequence of image paths,
                PIL images or HxWx3 uint8 arrays (preprocessed here exactly as in training).
            local: the DREA input, one of: a ``(rep, adj)`` pair of arrays; a sequence of
                :class:`~galr.preprocess.detections.DetectionSet`; a directory of detection files
                named like the images; an original local-feature table (``load_local_file``);
                or ``None`` for the documented no-detection fallback (a warning per image).
        """
        from galr.preprocess.image import load_image, preprocess_image

        if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1] == 3:
            pixels, sizes, names = images.astype(np.float32, copy=False), None, None
        else:
            loaded = [load_image(item, self.image_config) for item in images]
            sizes = [picture.size for picture in loaded]
            names = [Path(item) if isinstance(item, (str, os.PathLike)) else None for item in images]
            pixels = np.stack([preprocess_image(picture, self.image_config) for picture in loaded]) if loaded else \
                np.zeros((0, 3, self.config.image_size, self.config.image_size), np.float32)
        rep, adj = self._local_inputs(local, len(pixels), sizes, names)
        return self.encode_image_arrays(pixels, rep, adj)

    def _local_inputs(self, local: Any, count: int, sizes, names) -> tuple[np.ndarray, np.ndarray]:
        from galr.preprocess.detections import DetectionSet
        from galr.preprocess.drea import build_local_batch
        from galr.retrieval.evaluate import local_features_for

        if isinstance(local, tuple) and len(local) == 2 and isinstance(local[0], np.ndarray):
            return local
        size = self.config.image_size
        sizes = sizes or [(size, size)] * count
        if local is None:
            return build_local_batch([DetectionSet((), None, None, f"image #{i}") for i in range(count)], sizes,
                                     self.drea_config)
        if isinstance(local, (str, os.PathLike)) or hasattr(local, "lookup"):
            if names is None or any(n is None for n in names):
                raise ValueError("a detections folder or local-feature file needs images given as file paths")
            if isinstance(local, (str, os.PathLike)):
                if not Path(local).is_dir():
                    raise FileNotFoundError(f"detections folder not found: {local}")
                return local_features_for(names, sizes, self.drea_config, detections_dir=Path(local))
            return local_features_for(names, sizes, self.drea_config, local_table=local)
        sets = list(local)
        if len(sets) != count:
            raise ValueError(f"{len(sets)} detection sets for {count} images")
        return build_local_batch(sets, sizes, self.drea_config)


def _onnxruntime_runners(bundle: Bundle, precision: str, device: str, options=None) -> dict[str, Runner]:
    from galr.runtime.backends.onnxruntime import OnnxRuntimeRunner

    return {name: OnnxRuntimeRunner(bundle.onnx_bytes(name, precision), device=device, options=options).activate()
            for name in graphs.GRAPH_NAMES}


def select_engine(bundle: Bundle, precision: str, gpu=None, trt_version: str | None = None) -> dict[str, Any]:
    """The bundle's engine set built for this GPU, TensorRT version and precision.

    Raises:
        EngineMismatchError: no engine fits; the message lists what differs and the rebuild command.
    """
    from galr.runtime.backends.device import probe_gpu, probe_tensorrt
    from galr.runtime.backends.tensorrt import EngineKey, EngineMismatchError, check_engine_compatible

    gpu = gpu or probe_gpu()
    if trt_version is None:
        installed = probe_tensorrt()
        trt_version = installed.version if installed else "none"
    capability = gpu.compute_capability if gpu is not None else "sm_none"
    candidates = [e for e in bundle.engines() if e["key"]["precision"] == precision]
    if not candidates:
        raise EngineMismatchError(f"{bundle.path} has no TensorRT {precision} engines; build them here with "
                                  f"`galr-build {bundle.path} --precision {precision}` or use --backend onnxruntime")
    problems = []
    for entry in candidates:
        try:
            check_engine_compatible(EngineKey.from_dict(entry["key"]), capability, trt_version, bundle=str(bundle.path))
            return entry
        except EngineMismatchError as exc:
            problems.append(str(exc))
    raise EngineMismatchError(problems[0] if len(problems) == 1 else " | ".join(problems))


def _tensorrt_runners(bundle: Bundle, precision: str) -> tuple[dict[str, Runner], dict[str, int]]:
    from galr.runtime.backends.tensorrt import TensorRTRunner

    entry = select_engine(bundle, precision)
    runners = {name: TensorRTRunner(bundle.read_member(entry["members"][name])).activate() for name in graphs.GRAPH_NAMES}
    limits = {name: runner.max_batch_size for name, runner in runners.items() if runner.max_batch_size}
    return runners, limits


def load_engine(bundle: str | os.PathLike | Bundle = "galr.plan", backend: str = "auto", device: str = "auto",
                precision: str = "auto", onnxruntime_options=None) -> GaLREngine:
    """Open a bundle and build the encoders on the best (or the requested) backend.

    Args:
        bundle: the ``galr.plan`` file (or an opened :class:`Bundle`).
        backend: ``"auto"``, ``"tensorrt"`` or ``"onnxruntime"``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        precision: ``"auto"`` (fp16 on a GPU when present, else fp32), ``"fp32"``, ``"fp16"`` or ``"int8"``.

    Raises:
        BundleError: the bundle is missing/corrupt or lacks the precision.
        BackendUnavailableError: an explicitly requested backend/device cannot run here.
    """
    from galr.runtime.backends import resolve_backend

    bundle = bundle if isinstance(bundle, Bundle) else read_bundle(bundle)
    chosen_backend, chosen_device, reason = resolve_backend(backend, device)
    if precision == "auto":
        precision = "fp16" if chosen_device == "cuda" and "fp16" in bundle.precisions else "fp32"
    if precision not in bundle.precisions:
        raise BundleError(f"{bundle.path} has no {precision} graphs (it has {bundle.precisions}); "
                          f"re-export with `galr-export --{precision}`")
    if chosen_backend == "tensorrt":
        runners, limits = _tensorrt_runners(bundle, precision)
    else:
        runners, limits = _onnxruntime_runners(bundle, precision, chosen_device, onnxruntime_options), {}
    info = EngineInfo(chosen_backend, chosen_device, precision, reason, str(bundle.path))
    engine = GaLREngine(bundle, runners, info, limits)
    engine.tokenizer.warm_up()  # the first query then costs what every query costs (NLTK loads in ~0.3 s)
    return engine
