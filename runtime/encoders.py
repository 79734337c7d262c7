"""Torch-free GaLR encoders over a ``galr.plan`` bundle: captions and images in, embeddings out.

>>> encoders = load_engine("galr.plan")                          # doctest: +SKIP
>>> text = encoders.encode_text(["two planes next to a runway"])  # (1, D) float32, unit rows
>>> images = encoders.encode_images(["scene.png"], local="detections/")

Thread safety: one :class:`Encoders` may be shared by threads. Runners that are not thread-safe
(TensorRT's execution context) are guarded by a lock each; ONNX Runtime sessions run concurrently.
"""

from __future__ import annotations

import os
import threading
import warnings
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from galr import graphs
from galr.bundle import Bundle, BundleError, read_bundle
from galr.console import printable
from galr.errors import InputError
from galr.runtime.backends.base import Runner
from galr.runtime.backends.registry import (
    AUTO,
    BackendChoice,
    BackendOptions,
    Environment,
    make_runners,
    resolve_backend,
)

DEFAULT_IMAGE_BATCH = 32
_EMPTY_QUERY = "is empty or whitespace only; give at least one word"
_NO_WORDS = "has no words after removing punctuation"
DEFAULT_TEXT_BATCH = 128


class QueryError(InputError):
    """A query cannot be encoded (empty, whitespace-only, or no words after removing punctuation)."""


class QueryWarning(UserWarning):
    """Something about one query; ``label`` names it as the caller did (e.g. ``"line 3"``)."""

    def __init__(self, message: str, label: str | None = None) -> None:
        super().__init__(message)
        self.label = label


class UnknownWordsWarning(QueryWarning):
    """A query has no word in the model's vocabulary, so its embedding carries no meaning."""


class ShortenedQueryWarning(QueryWarning):
    """A query was longer than the tokenizer keeps (characters or tokens); its beginning was used."""


def _renormalise(x: np.ndarray) -> np.ndarray:
    # Reduced-precision engines drift off unit norm slightly; scores are cosines, so fix it in FP32.
    x = np.asarray(x, dtype=np.float32)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)


class Encoders:
    """The two GaLR towers served from a bundle by one backend at one precision.

    Made by :func:`load_engine`. ``encode_text`` and ``encode_images`` return L2-normalised float32
    ``(n, D)`` arrays whose dot products are the model's cosine similarities.

    Attributes:
        bundle: the opened bundle.
        info: what runs (backend, device, precision) and why.
        config: the model's dimensions.
        vocab: its vocabulary.
        spec: its preprocessing (image, DREA, token cap), from the manifest.
        tokenizer: the tokenizer of ``spec`` over ``vocab``.
    """

    def __init__(self, bundle: Bundle, runners: Mapping[str, Runner], info: BackendChoice,
                 resources: ExitStack | None = None) -> None:
        self.bundle = bundle
        self.info = info
        self.config = bundle.config
        self.vocab = bundle.vocab
        self.spec = bundle.spec
        self.tokenizer = self.spec.tokenizer(self.vocab)
        self._runners = dict(runners)
        self._resources = resources or ExitStack()
        self._locks = {name: nullcontext() if runner.thread_safe else threading.Lock()
                       for name, runner in self._runners.items()}

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def model_hash(self) -> str:
        return self.bundle.model_hash

    @property
    def runners(self) -> Mapping[str, Runner]:
        """The running graphs by name (read-only view; they belong to these encoders)."""
        return dict(self._runners)

    def close(self) -> None:
        """Stop every runner (idempotent)."""
        self._resources.close()

    def __enter__(self) -> "Encoders":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- graphs -------------------------------------------------------------------------------
    def _run(self, graph: str, feeds: dict[str, np.ndarray], default_batch: int) -> np.ndarray:
        runner = self._runners[graph]
        output = next(iter(runner.outputs))
        n = next(iter(feeds.values())).shape[0]
        step = runner.max_batch_size or default_batch
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

    def query_problem(self, query: object) -> str | None:
        """Why ``query`` cannot be encoded (empty, or no words once punctuation is removed), or ``None``."""
        if not isinstance(query, str) or not query.strip():
            return _EMPTY_QUERY
        if not self.tokenizer.encode(query):
            return _NO_WORDS
        return None

    def encode_text(self, captions: str | Sequence[str], labels: Sequence[str] | None = None) -> np.ndarray:
        """Embeddings of captions/queries, tokenised exactly as the original.

        Args:
            captions: one query string, or a sequence of them.
            labels: how messages name each query (e.g. ``"line 3"``); ``"query #i"`` by default.

        Raises:
            QueryError: for a query that cannot be encoded (:meth:`query_problem`).
        Warns:
            UnknownWordsWarning: a query has no in-vocabulary word.
            ShortenedQueryWarning: a query was longer than the tokenizer keeps.
        """
        captions = [captions] if isinstance(captions, str) else list(captions)
        labels = list(labels) if labels is not None else [f"query #{i}" for i in range(len(captions))]
        for label, caption in zip(labels, captions):
            if not isinstance(caption, str) or not caption.strip():
                raise QueryError(f"{label} {_EMPTY_QUERY}")
        # Tokenised once (NLTK is most of a query's CPU time outside the graphs): a row without ids is
        # the query_problem() "no words" case.
        batch = self.tokenizer.encode_batch(captions, warn=False)
        for label, length in zip(labels, batch.lengths.tolist()):
            if length == 0:
                raise QueryError(f"{label} {_NO_WORDS}")
        unk, tokenizer = self.vocab.unk_id, self.tokenizer
        for index, row in enumerate(batch.tokens):
            label, shown = labels[index], printable(captions[index][:60])
            if index in batch.cut or index in batch.truncated:
                warnings.warn(ShortenedQueryWarning(
                    f"{label} ({shown!r}...) is longer than {tokenizer.max_chars} characters or "
                    f"{tokenizer.max_length} tokens; its beginning is used", label), stacklevel=2)
            if np.all(row[: batch.lengths[index]] == unk):
                warnings.warn(UnknownWordsWarning(
                    f"{label} ({shown!r}) has no word in the model's vocabulary of {len(self.vocab)}; "
                    "its results are arbitrary", label), stacklevel=2)
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
            local: the DREA input (:mod:`galr.preprocess.local_inputs`): ``(rep, adj)`` arrays, a
                sequence of :class:`~galr.preprocess.detections.DetectionSet`, a folder of detection
                files named like the images, an original local-feature table, a
                :class:`~galr.runtime.detector.Detector` (run on each decoded image), or ``None`` for
                the documented no-detection fallback (a warning per image).
        """
        from galr.preprocess.image import load_image, preprocess_image
        from galr.preprocess.local_inputs import local_inputs

        size = self.config.image_size
        detector = local if hasattr(local, "detect_one") else None
        if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1] == 3:
            if detector is not None:
                raise InputError("a detector needs the images themselves, not preprocessed arrays")
            pixels, sizes, names = images.astype(np.float32, copy=False), [(size, size)] * len(images), None
        else:
            images = list(images)
            names = [Path(item) if isinstance(item, (str, os.PathLike)) else None for item in images]
            # One image decoded at a time, resized at once: peak memory is one full-resolution image
            # plus the batch at the model's size, however large the files are.
            pixels = np.zeros((len(images), 3, size, size), np.float32)
            sizes = []
            found = []
            for row, item in enumerate(images):
                picture = load_image(item, self.spec.image)
                if detector is not None:  # on the decoded image, so it is read once
                    found.append(detector.detect_one(picture, str(names[row] or f"image #{row}")))
                sizes.append(picture.size)
                pixels[row] = preprocess_image(picture, self.spec.image)
                del picture
            if detector is not None:
                local = found
        rep, adj = local_inputs(local, len(pixels), names, sizes, self.spec.drea)
        return self.encode_image_arrays(pixels, rep, adj)


CPU_INT8 = "int8-cpu"


def _resolve_precision(requested: str, choice: BackendChoice, bundle: Bundle, cpu_int8: bool = True) -> tuple[str, str]:
    """The precision to serve, and why when it is not simply the one asked for.

    On ONNX Runtime's CPU provider a bundle's ``int8-cpu`` set (INT8 laid out for the CPU's integer
    kernels; see ``calibration/int8/cpu.py``) replaces ``int8`` and is the ``auto`` choice: the
    export made it only on request and gated it against FP32. Every other backend and device keeps
    the previous rules (``auto``: fp16 on a GPU when the bundle has it, else fp32), and a bundle
    without ``int8-cpu`` behaves as before. ``cpu_int8=False`` turns the substitution off (callers
    that must score exactly the set they name: the export's gates, the benchmarks).
    """
    on_cpu_ort = choice.backend == "onnxruntime" and choice.device == "cpu"
    has_cpu_int8 = cpu_int8 and CPU_INT8 in bundle.precisions
    precision, why = requested, ""
    if requested == AUTO:
        if on_cpu_ort and has_cpu_int8:
            precision, why = CPU_INT8, "auto: the bundle's INT8 set for ONNX Runtime's CPU kernels"
        else:
            precision = "fp16" if choice.device == "cuda" and "fp16" in bundle.precisions else "fp32"
    elif requested == "int8" and on_cpu_ort and has_cpu_int8:
        precision, why = CPU_INT8, "int8 on the CPU: the bundle's int8-cpu set (the int8 Q/DQ set is TensorRT's)"
    if precision == CPU_INT8 and not on_cpu_ort:
        raise InputError(f"{bundle.path}: int8-cpu graphs run only on ONNX Runtime's CPU provider, not on "
                         f"{choice.backend} on {choice.device}; ask for --precision int8 (the Q/DQ set) there")
    if precision not in bundle.precisions:
        flag = "--int8-cpu" if precision == CPU_INT8 else f"--{precision}"
        raise BundleError(f"{bundle.path} has no {precision} graphs (it has {bundle.precisions}); "
                          f"re-export with `galr-export {flag}`")
    return precision, why


def load_engine(bundle: str | os.PathLike | Bundle = "galr.plan", backend: str = AUTO, device: str = AUTO,
                precision: str = AUTO, options: Iterable[BackendOptions] = (),
                environment: Environment | None = None, cpu_int8: bool = True) -> Encoders:
    """Open a bundle and start its encoders on the best (or the requested) backend.

    Args:
        bundle: the ``galr.plan`` file, or an opened (or in-memory) :class:`~galr.bundle.Bundle`.
        backend: ``"auto"`` or a registered backend (``"tensorrt"``, ``"onnxruntime"``).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        precision: ``"auto"`` (on ONNX Runtime's CPU provider the bundle's ``int8-cpu`` set when it
            has one; fp16 on a GPU when the bundle has it; else fp32), ``"fp32"``, ``"fp16"``,
            ``"int8"`` (on ONNX Runtime's CPU provider: ``int8-cpu`` when the bundle has it, else the
            Q/DQ set) or ``"int8-cpu"`` (ONNX Runtime on the CPU only). ``info`` says what was chosen
            and why.
        options: typed options per backend (e.g. ``OnnxRuntimeOptions(intra_op_threads=2)``); the
            chosen backend takes the ones for it.
        environment: what the machine offers (probed when ``None``; tests pass their own).
        cpu_int8: let ``auto`` and ``int8`` become ``int8-cpu`` on ONNX Runtime's CPU provider (see
            ``precision``); ``False`` serves exactly the precision named.

    Returns:
        The running :class:`Encoders`; close them (or use ``with``) to free the runners.

    Raises:
        BundleError: the bundle is missing/corrupt, its graphs are not the model its manifest names,
            or it lacks the precision.
        BackendUnavailableError: a requested backend/device cannot run here.
        EngineMismatchError: TensorRT was chosen but no engine in the bundle fits this machine.
    """
    bundle = bundle if isinstance(bundle, Bundle) else read_bundle(bundle)
    bundle.verify_model_hash()  # a graph swapped under the manifest would be served with foreign indexes
    environment = environment or Environment()
    choice = resolve_backend(backend, device, bundle=str(bundle.path), environment=environment)
    precision, why = _resolve_precision(precision, choice, bundle, cpu_int8)
    choice = BackendChoice(choice.backend, choice.device, precision,
                           f"{choice.reason}; {why}" if why else choice.reason, choice.bundle)
    stack = ExitStack()  # owned by the encoders once they exist; closed here if anything fails first
    try:
        runners = make_runners(choice, bundle, stack, environment, options)
        encoders = Encoders(bundle, runners, choice, stack)
    except BaseException:
        stack.close()
        raise
    encoders.tokenizer.warm_up()  # the first query then costs what every query costs
    return encoders


__all__ = ["CPU_INT8", "DEFAULT_IMAGE_BATCH", "DEFAULT_TEXT_BATCH", "Encoders", "QueryError", "QueryWarning",
           "ShortenedQueryWarning", "UnknownWordsWarning", "load_engine"]
