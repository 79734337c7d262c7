"""A GaLR-style DREA builder: detections -> ``local_rep [N, F]`` and ``local_adj [N, N]``.

**This is a reconstruction, not the authors' construction.** GaLR's paper describes DREA only in
words ("the de-noised representation matrix and the enhanced adjacency matrix ... filters out
redundant features with high similarity ... enhancing the features of prominent objects"); the
detector and the matrix code were never released (GaLR issue #10) and the authors' ``.npy`` files
are lost. Everything below is our reading of that sentence. Checkpoints trained by the authors
saw *their* matrices, so feeding these ones to original weights is not faithful; models trained
with this builder are consistent with it.

The construction, per image (details and rationale in ``docs/preprocessing.md``):

1. **Labels** are normalised (:func:`normalize_label`) and must be in ``config.classes``;
   unknown ones raise or are skipped with an :class:`UnknownLabelWarning` (``unknown_labels``).
   Detections below ``min_score`` and boxes with no area inside the image are dropped.
2. **Features** (one row per object, ``feature_dim = len(classes) + 5``): one-hot class, then box
   centre x, centre y, width, height divided by the image width/height (clipped to the image),
   then the score. 15 DOTA-v1.0 classes give the 20 columns the original GCN expects.
3. **De-noising**: in descending score order, an object is dropped when an already kept object
   of the same class overlaps it with IoU >= ``duplicate_iou``, or when the cosine similarity of
   their feature rows is >= ``duplicate_cosine`` (rows of different classes cannot exceed 5/6,
   so with a threshold above that only same-class objects that nearly coincide are merged).
4. **Salience** = ``score * sqrt(box area / image area)``; survivors are sorted by salience
   (ties: score, then file order) and the first ``num_objects`` are kept; the rest are zero rows.
5. **Adjacency**: Gaussian affinity of centre distance,
   ``G_ij = exp(-|c_i - c_j|^2 / (2 * adjacency_sigma^2))`` (so ``G_ii = 1``, the self-loop), then
   **enhanced** as ``A = E G E`` with ``E = diag(1 + salience_boost * salience / max salience)``,
   which strengthens the rows and columns of salient objects; then normalised (``normalization``):
   ``"max_row_sum"`` divides by the largest row sum (keeps the enhancement; ``||A||_2 <= 1``),
   ``"symmetric"`` is ``D^-1/2 A D^-1/2`` (Kipf-Welling; spectral radius 1). Either way the GCN's
   three raw ``A @ X`` products cannot grow the features. Padded rows/columns are zero.
6. **No detections left** -> all-zero ``rep`` and ``adj`` plus a :class:`NoDetectionsWarning`
   naming the image. With zeros the original GCN outputs the same vector for every such image
   (its last bias, normalised): the local branch carries no information, but the model runs.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from galr.errors import InputError
from galr.preprocess.detections import Detection, DetectionSet, normalize_label
from galr.serialization import fields_from_dict

DOTA_V1_CLASSES: tuple[str, ...] = (
    "plane", "ship", "storage-tank", "baseball-diamond", "tennis-court", "basketball-court",
    "ground-track-field", "harbor", "bridge", "large-vehicle", "small-vehicle", "helicopter",
    "roundabout", "soccer-ball-field", "swimming-pool",
)
_BOX_FEATURES = 5  # cx, cy, w, h, score
_NORMALIZATIONS = ("max_row_sum", "symmetric")
_UNKNOWN_POLICIES = ("error", "skip")


class NoDetectionsWarning(UserWarning):
    """An image has no usable detections; its DREA matrices are all zero."""


class UnknownLabelWarning(UserWarning):
    """Detections with labels outside ``DREAConfig.classes`` were skipped."""


@dataclass(frozen=True)
class DREAConfig:
    """Settings of the DREA reconstruction (see the module docstring for the construction).

    Attributes:
        classes: class names (normalised, unique); their order fixes the one-hot columns.
        num_objects: rows of ``rep``/``adj`` (the original model: 20).
        min_score: detections with a lower score are ignored.
        duplicate_iou: same-class IoU at or above which the lower-score object is dropped;
            None disables this test.
        duplicate_cosine: feature-row cosine similarity at or above which the lower-score object
            is dropped; None disables this test.
        salience_boost: strength of the adjacency enhancement; 0 gives the plain Gaussian graph.
        adjacency_sigma: Gaussian width of the centre distance, as a fraction of the image side.
        normalization: ``"max_row_sum"`` or ``"symmetric"`` (see the module docstring).
        unknown_labels: ``"error"`` raises on labels outside ``classes``; ``"skip"`` drops them
            with an :class:`UnknownLabelWarning`.
    """

    classes: tuple[str, ...] = DOTA_V1_CLASSES
    num_objects: int = 20
    min_score: float = 0.3
    duplicate_iou: float | None = 0.5
    duplicate_cosine: float | None = 0.998
    salience_boost: float = 1.0
    adjacency_sigma: float = 0.25
    normalization: str = "max_row_sum"
    unknown_labels: str = "error"

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        if not self.classes:
            raise InputError("DREAConfig.classes is empty; give the detector's class names")
        unnormalised = [c for c in self.classes if normalize_label(c) != c]
        if unnormalised:
            raise InputError(
                f"DREAConfig.classes must be normalised names, got {unnormalised}; "
                f"use {[normalize_label(c) for c in unnormalised]}"
            )
        repeated = sorted(c for c, n in Counter(self.classes).items() if n > 1)
        if repeated:
            raise InputError(f"DREAConfig.classes lists {repeated} more than once")
        if self.num_objects < 1:
            raise InputError(f"DREAConfig.num_objects must be positive, got {self.num_objects}")
        if not 0.0 <= self.min_score <= 1.0:
            raise InputError(f"DREAConfig.min_score must be in [0, 1], got {self.min_score}")
        for name in ("duplicate_iou", "duplicate_cosine"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise InputError(f"DREAConfig.{name} must be in (0, 1] or None (disabled), got {value}")
        if self.salience_boost < 0:
            raise InputError(f"DREAConfig.salience_boost must be >= 0, got {self.salience_boost}")
        if self.adjacency_sigma <= 0:
            raise InputError(f"DREAConfig.adjacency_sigma must be positive, got {self.adjacency_sigma}")
        if self.normalization not in _NORMALIZATIONS:
            raise InputError(
                f"DREAConfig.normalization {self.normalization!r} is unknown; use one of {_NORMALIZATIONS}"
            )
        if self.unknown_labels not in _UNKNOWN_POLICIES:
            raise InputError(
                f"DREAConfig.unknown_labels {self.unknown_labels!r} is unknown; use one of {_UNKNOWN_POLICIES}"
            )

    @property
    def feature_dim(self) -> int:
        """Columns of ``rep``: one-hot classes + (cx, cy, w, h, score)."""
        return len(self.classes) + _BOX_FEATURES

    def check_model(self, num_objects: int | None = None, object_dim: int | None = None) -> None:
        """Raise when these matrices cannot feed a model with the given GCN input sizes.

        Args:
            num_objects: the model's node count (``GaLRConfig.num_objects``), or None to skip.
            object_dim: the model's node feature size (``GaLRConfig.object_dim``), or None to skip.

        Raises:
            ValueError: a size differs; the message says which setting to change.
        """
        if object_dim is not None and object_dim != self.feature_dim:
            raise InputError(
                f"the model expects {object_dim} features per object but DREAConfig gives {self.feature_dim} "
                f"({len(self.classes)} classes + {_BOX_FEATURES} box/score columns); use {object_dim - _BOX_FEATURES} "
                "classes (DOTA-v1.0 has 15 for the original 20) or a model with a matching object_dim"
            )
        if num_objects is not None and num_objects != self.num_objects:
            raise InputError(
                f"the model expects {num_objects} objects per image but DREAConfig.num_objects is {self.num_objects}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DREAConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error so a newer manifest is never half-read."""
        return cls(**fields_from_dict(cls, values))


# ---------------------------------------------------------------------------------------------
# Steps


def _resolve_size(detections: DetectionSet, image_size: tuple[int, int] | None) -> tuple[int, int]:
    known = (detections.width, detections.height)
    if image_size is None:
        if None in known:
            raise InputError(
                f"{detections.name}: image size unknown; pass image_size=(width, height) or record width/height "
                "in the detection file"
            )
        return int(known[0]), int(known[1])  # type: ignore[arg-type]
    width, height = int(image_size[0]), int(image_size[1])
    if width < 1 or height < 1:
        raise InputError(f"{detections.name}: image_size must be positive (width, height), got {image_size}")
    if None not in known and known != (width, height):
        raise InputError(
            f"{detections.name}: detections were made on a {known[0]}x{known[1]} image but image_size is "
            f"{width}x{height}; boxes are in the detection image's pixels, so pass that size (or rescale the boxes)"
        )
    return width, height


def _select_known(detections: DetectionSet, config: DREAConfig) -> list[tuple[int, Detection]]:
    """(class index, detection) for known labels, after the unknown-label policy."""
    index = {name: i for i, name in enumerate(config.classes)}
    known, unknown = [], Counter()
    for detection in detections.detections:
        label = normalize_label(detection.label)
        if label in index:
            known.append((index[label], detection))
        else:
            unknown[label] += 1
    if unknown and config.unknown_labels == "error":
        raise InputError(
            f"{detections.name}: labels {sorted(unknown)} are not in DREAConfig.classes {list(config.classes)}; "
            "rename them to known classes or set DREAConfig(unknown_labels='skip')"
        )
    if unknown:
        warnings.warn(
            f"{detections.name}: skipped {sum(unknown.values())} detections with labels outside DREAConfig.classes: "
            f"{dict(sorted(unknown.items()))}",
            UnknownLabelWarning,
            stacklevel=3,
        )
    return known


def _object_table(
    known: list[tuple[int, Detection]], size: tuple[int, int], config: DREAConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features [n, F], clipped pixel boxes [n, 4], class ids [n], salience [n] of usable objects."""
    width, height = size
    kept = [(c, d) for c, d in known if d.score >= config.min_score]
    class_ids = np.array([c for c, _ in kept], dtype=np.int64)
    scores = np.array([d.score for _, d in kept], dtype=np.float64)
    boxes = np.array([d.box for _, d in kept], dtype=np.float64).reshape(-1, 4)
    boxes = np.clip(boxes, 0.0, [width, height, width, height])
    box_w, box_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    inside = (box_w > 0) & (box_h > 0)  # boxes outside the image (or degenerate) carry nothing
    class_ids, scores, boxes = class_ids[inside], scores[inside], boxes[inside]
    box_w, box_h = box_w[inside], box_h[inside]
    features = np.zeros((len(scores), config.feature_dim), dtype=np.float64)
    features[np.arange(len(scores)), class_ids] = 1.0
    features[:, -5] = (boxes[:, 0] + boxes[:, 2]) / (2 * width)
    features[:, -4] = (boxes[:, 1] + boxes[:, 3]) / (2 * height)
    features[:, -3] = box_w / width
    features[:, -2] = box_h / height
    features[:, -1] = scores
    salience = scores * np.sqrt(features[:, -3] * features[:, -2])
    return features, boxes, class_ids, salience


def _iou_with(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x0, y0 = np.maximum(box[0], others[:, 0]), np.maximum(box[1], others[:, 1])
    x1, y1 = np.minimum(box[2], others[:, 2]), np.minimum(box[3], others[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / (area + areas - inter)


def _denoise(features: np.ndarray, boxes: np.ndarray, class_ids: np.ndarray, config: DREAConfig) -> np.ndarray:
    """Indices surviving greedy duplicate removal in descending score order (ties: file order)."""
    order = np.argsort(-features[:, -1], kind="stable")
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    suppressed = np.zeros(len(order), dtype=bool)
    survivors = []
    # O(n) memory per step instead of an n x n matrix: parking lots can hold thousands of cars.
    for rank, i in enumerate(order):
        if suppressed[rank]:
            continue
        survivors.append(i)
        rest = order[rank + 1:]
        duplicate = np.zeros(len(rest), dtype=bool)
        if config.duplicate_iou is not None:
            same = class_ids[rest] == class_ids[i]
            duplicate |= same & (_iou_with(boxes[i], boxes[rest]) >= config.duplicate_iou)
        if config.duplicate_cosine is not None:
            duplicate |= unit[rest] @ unit[i] >= config.duplicate_cosine
        suppressed[rank + 1:] |= duplicate
    return np.array(survivors, dtype=np.int64)


def _adjacency(centres: np.ndarray, salience: np.ndarray, config: DREAConfig) -> np.ndarray:
    squared = ((centres[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    affinity = np.exp(-squared / (2.0 * config.adjacency_sigma**2))
    peak = salience.max()
    emphasis = 1.0 + config.salience_boost * (salience / peak if peak > 0 else np.zeros_like(salience))
    enhanced = emphasis[:, None] * affinity * emphasis[None, :]
    row_sums = enhanced.sum(axis=1)  # > 0: the diagonal is at least 1
    if config.normalization == "symmetric":
        inv_sqrt = 1.0 / np.sqrt(row_sums)
        return inv_sqrt[:, None] * enhanced * inv_sqrt[None, :]
    return enhanced / row_sums.max()


def build_local_features(
    detections: DetectionSet | Sequence[Detection],
    image_size: tuple[int, int] | None = None,
    config: DREAConfig | None = None,
    *,
    object_dim: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Build one image's DREA matrices (reconstruction; see the module docstring).

    Args:
        detections: the image's detections; a plain sequence has no name or size of its own.
        image_size: ``(width, height)`` in pixels of the image the boxes refer to; may be omitted
            when ``detections`` records its width and height.
        config: DREA settings.
        object_dim: the consuming model's feature size (``GaLRConfig.object_dim``); checked
            against ``config.feature_dim`` when given.

    Returns:
        tuple[np.ndarray, np.ndarray]: ``rep`` float32 ``[num_objects, feature_dim]`` and ``adj``
        float32 ``[num_objects, num_objects]``, most salient object first, zero-padded.

    Raises:
        ValueError: unknown image size, size mismatch, unknown labels under the ``"error"``
            policy, or ``object_dim != config.feature_dim``.

    Warns:
        NoDetectionsWarning: no detection survived; both matrices are all zero.
        UnknownLabelWarning: labels were skipped under the ``"skip"`` policy.
    """
    config = config or DREAConfig()
    config.check_model(object_dim=object_dim)
    if not isinstance(detections, DetectionSet):
        detections = DetectionSet(tuple(detections))
    size = _resolve_size(detections, image_size)
    rep = np.zeros((config.num_objects, config.feature_dim), dtype=np.float32)
    adj = np.zeros((config.num_objects, config.num_objects), dtype=np.float32)

    known = _select_known(detections, config)
    features, boxes, class_ids, salience = _object_table(known, size, config)
    survivors = _denoise(features, boxes, class_ids, config)
    if len(survivors) == 0:
        warnings.warn(
            f"{detections.name}: no usable detections ({len(detections)} read, none known, inside the image and with "
            f"score >= {config.min_score}); its local features are all zero, so the local branch gives it the same "
            "vector as every other image without detections",
            NoDetectionsWarning,
            stacklevel=2,
        )
        return rep, adj
    # Salience order with deterministic ties: higher score, then earlier in the file.
    ranking = np.lexsort((survivors, -features[survivors, -1], -salience[survivors]))
    chosen = survivors[ranking][: config.num_objects]
    count = len(chosen)
    rep[:count] = features[chosen]
    adj[:count, :count] = _adjacency(features[chosen][:, -5:-3], salience[chosen], config)
    return rep, adj


def build_local_batch(
    detection_sets: Sequence[DetectionSet | Sequence[Detection]],
    image_sizes: Sequence[tuple[int, int] | None] | None = None,
    config: DREAConfig | None = None,
    *,
    object_dim: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`build_local_features` for several images.

    Args:
        detection_sets: one entry per image.
        image_sizes: one ``(width, height)`` (or None to use the set's own size) per image, or
            None for all.
        config: DREA settings.
        object_dim: the consuming model's feature size, checked once.

    Returns:
        tuple[np.ndarray, np.ndarray]: ``rep`` float32 ``[B, num_objects, feature_dim]`` and
        ``adj`` float32 ``[B, num_objects, num_objects]``.

    Raises:
        ValueError: ``image_sizes`` has a different length, or any error of :func:`build_local_features`.
    """
    config = config or DREAConfig()
    config.check_model(object_dim=object_dim)
    sizes = list(image_sizes) if image_sizes is not None else [None] * len(detection_sets)
    if len(sizes) != len(detection_sets):
        raise InputError(f"got {len(detection_sets)} detection sets but {len(sizes)} image sizes; give one per image")
    rep = np.zeros((len(sizes), config.num_objects, config.feature_dim), dtype=np.float32)
    adj = np.zeros((len(sizes), config.num_objects, config.num_objects), dtype=np.float32)
    for i, (detections, size) in enumerate(zip(detection_sets, sizes)):
        rep[i], adj[i] = build_local_features(detections, size, config)
    return rep, adj


__all__ = [
    "DOTA_V1_CLASSES",
    "DREAConfig",
    "NoDetectionsWarning",
    "UnknownLabelWarning",
    "build_local_batch",
    "build_local_features",
]
