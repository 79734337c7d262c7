"""Calibration data for INT8: the chosen images and captions, and one feed-dict reader per graph.

Readers follow ONNX Runtime's ``CalibrationDataReader`` contract (``get_next() -> feeds | None`` and
``rewind()``), so ORT's calibrators consume them directly. Each graph is calibrated on what it sees
when serving:

==========  =================================================================================
graph       feeds
==========  =================================================================================
global      ``image``: preprocessed calibration images
local       ``local_rep``, ``local_adj``: their DREA matrices
fusion      ``global_feature``, ``local_feature``: the *FP32* global/local graphs' outputs on them
text        ``tokens``: the images' captions, tokenised with the model's vocabulary
==========  =================================================================================

The calibration set is a deterministic (seeded) choice of at most ``max_images`` images of a
split, with their captions. :func:`calibration_set_hash` fingerprints it (image names, captions,
pixel and DREA data, calibration method) for the manifest and the statistics cache.

Torch-free: numpy, ONNX Runtime and :mod:`galr.preprocess` only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import numpy as np

from galr import graphs
from galr.errors import InputError
from galr.retrieval.evaluate import SplitInputs

if TYPE_CHECKING:
    from galr.preprocess.spec import PreprocessSpec
    from galr.preprocess.text import Tokenizer

Feeds = dict[str, np.ndarray]

# Version of the hashing recipe; bump it when what goes into the hash changes.
_HASH_RECIPE = "galr-calibration-set/1"


class FeedReader:
    """Pre-built feed dicts served one at a time (ONNX Runtime's ``CalibrationDataReader`` contract).

    Args:
        feeds: one dict (input name -> array) per batch, in order.
    """

    def __init__(self, feeds: Sequence[Feeds]) -> None:
        self._feeds = list(feeds)
        self._position = 0

    def get_next(self) -> Feeds | None:
        """The next batch, or ``None`` when every batch has been served."""
        if self._position >= len(self._feeds):
            return None
        feeds = self._feeds[self._position]
        self._position += 1
        return feeds

    def rewind(self) -> None:
        """Start again from the first batch."""
        self._position = 0

    def __len__(self) -> int:
        return len(self._feeds)

    def __iter__(self) -> Iterator[Feeds]:
        return iter(self._feeds)

    def chunks(self, batches: int) -> Iterator["FeedReader"]:
        """Fresh readers over runs of at most ``batches`` consecutive batches of equal input shapes.

        ORT's calibrators hold every intermediate tensor of one ``collect_data`` call in memory, and
        its histogram collectors stack them, so a call must not mix shapes (a short last batch,
        captions of another length). Chunks bound the one and avoid the other; the calibrators
        merge ranges and histograms across calls.
        """
        if batches < 1:
            raise InputError(f"batches per chunk must be at least 1, got {batches}")
        chunk: list[Feeds] = []
        for feeds in self._feeds:
            if chunk and (len(chunk) == batches or _shapes(feeds) != _shapes(chunk[0])):
                yield FeedReader(chunk)
                chunk = []
            chunk.append(feeds)
        if chunk:
            yield FeedReader(chunk)


def _shapes(feeds: Feeds) -> dict[str, tuple[int, ...]]:
    return {name: array.shape for name, array in feeds.items()}


def choose_images(count: int, max_images: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_images`` of ``count`` images, the same for the same seed.

    Raises:
        ValueError: ``max_images`` is not positive.
    """
    if max_images < 1:
        raise InputError(f"max_images must be at least 1, got {max_images}")
    if count <= max_images:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=max_images, replace=False))


def subset_inputs(inputs: SplitInputs, indices: Sequence[int] | np.ndarray) -> SplitInputs:
    """The images at ``indices`` with their captions (captions are grouped per image, in order)."""
    index = np.asarray(indices, dtype=np.int64)
    c = inputs.captions_per_image
    captions = tuple(inputs.captions[i * c + j] for i in index.tolist() for j in range(c))
    return SplitInputs(tuple(inputs.image_names[i] for i in index.tolist()), inputs.images[index],
                       inputs.local_rep[index], inputs.local_adj[index], captions, c)


def select_calibration_inputs(inputs: SplitInputs, max_images: int, seed: int = 0) -> SplitInputs:
    """A seeded choice of at most ``max_images`` images (with their captions) from in-memory inputs."""
    return subset_inputs(inputs, choose_images(len(inputs.image_names), max_images, seed))


def load_calibration_inputs(dataset: str | Path, split: str, max_images: int, spec: "PreprocessSpec",
                            seed: int = 0) -> SplitInputs:
    """Read a seeded choice of at most ``max_images`` images of a dataset split, with detections and captions.

    Only the chosen images are decoded. The dataset is in the original layout (see :mod:`galr.data`).

    Args:
        dataset: dataset root.
        split: split name (calibrate on a training split, never on the one the gates score).
        max_images: upper bound on the number of images.
        spec: the model's preprocessing (images and their DREA inputs).
        seed: seed of the choice.

    Returns:
        The chosen images, their DREA matrices and captions.

    Raises:
        ValueError: the split has no images (:class:`galr.data.DatasetError`, a ``ValueError``, for
            missing or malformed files).
    """
    from galr.data import DatasetPaths, load_split
    from galr.retrieval.evaluate import load_split_inputs

    paths = DatasetPaths.find(dataset)
    full = load_split(dataset, split, image_dir=paths.images)
    if not len(full.image_names):
        raise InputError(f"split {split!r} of {dataset} has no images to calibrate on")
    chosen = full.subset(choose_images(len(full.image_names), max_images, seed).tolist())
    return load_split_inputs(chosen, spec, detections_dir=paths.detections)


def calibration_set_hash(inputs: SplitInputs, method: str) -> str:
    """SHA-256 of what calibration sees: image names, captions, pixel and DREA data, and the method.

    The arrays are hashed too, so re-preprocessed images under the same names (another resize,
    new detections) are a different calibration set.
    """
    digest = hashlib.sha256()

    def add(text: str) -> None:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))  # length prefix: no ambiguity between fields
        digest.update(data)

    add(_HASH_RECIPE)
    add(method)
    add(str(inputs.captions_per_image))
    for name in inputs.image_names:
        add(name)
    for caption in inputs.captions:
        add(caption)
    for array in (inputs.images, inputs.local_rep, inputs.local_adj):
        contiguous = np.ascontiguousarray(array, dtype=np.float32)
        add(str(contiguous.shape))
        digest.update(contiguous.tobytes())
    return digest.hexdigest()


def _batches(count: int, batch_size: int) -> list[slice]:
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    return [slice(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def run_graph(graph: bytes, reader: FeedReader, output: str | None = None) -> np.ndarray:
    """Run an ONNX graph on ONNX Runtime's CPU provider over every batch of a reader.

    Returns ``output`` (default: the graph's first output) of every batch, concatenated.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    output = output or session.get_outputs()[0].name
    return np.concatenate([session.run([output], feeds)[0] for feeds in reader])


def graph_readers(inputs: SplitInputs, fp32_graphs: Mapping[str, bytes], batch_size: int = 8,
                  tokenizer: "Tokenizer | None" = None,
                  names: Sequence[str] = (graphs.GLOBAL, graphs.LOCAL, graphs.FUSION)) -> dict[str, FeedReader]:
    """One calibration reader per requested graph (see the module docstring for what each gets).

    Args:
        inputs: the calibration images, DREA matrices and captions.
        fp32_graphs: the FP32 graphs by name (the global and local ones produce the fusion feeds).
        batch_size: images (or captions) per batch.
        tokenizer: required when ``names`` contains the text graph.
        names: graphs to build readers for.

    Returns:
        Readers by graph name.

    Raises:
        ValueError: no images, a bad batch size, an unknown graph name, or text without a tokenizer.
    """
    unknown = sorted(set(names) - set(graphs.GRAPH_NAMES))
    if unknown:
        raise InputError(f"unknown graph names {unknown}; expected some of {list(graphs.GRAPH_NAMES)}")
    count = len(inputs.image_names)
    if count == 0:
        raise InputError("no calibration images: the calibration set is empty")
    image_batches = _batches(count, batch_size)
    readers: dict[str, FeedReader] = {
        graphs.GLOBAL: FeedReader([{graphs.IMAGE: inputs.images[s]} for s in image_batches]),
        graphs.LOCAL: FeedReader([{graphs.LOCAL_REP: inputs.local_rep[s], graphs.LOCAL_ADJ: inputs.local_adj[s]}
                                  for s in image_batches]),
    }
    if graphs.FUSION in names:
        # Fusion is calibrated on what the FP32 encoders give it, not on synthetic unit vectors.
        global_feature = run_graph(fp32_graphs[graphs.GLOBAL], readers[graphs.GLOBAL], graphs.GLOBAL_FEATURE)
        local_feature = run_graph(fp32_graphs[graphs.LOCAL], readers[graphs.LOCAL], graphs.LOCAL_FEATURE)
        readers[graphs.FUSION] = FeedReader([{graphs.GLOBAL_FEATURE: global_feature[s], graphs.LOCAL_FEATURE: local_feature[s]}
                                             for s in image_batches])
    if graphs.TEXT in names:
        if tokenizer is None:
            raise InputError("the text graph's calibration reader needs the model's tokenizer")
        captions = list(inputs.captions)
        readers[graphs.TEXT] = FeedReader([{graphs.TOKENS: tokenizer.encode_batch(captions[s], warn=False).tokens}
                                           for s in _batches(len(captions), batch_size)])
    return {name: readers[name] for name in names}
