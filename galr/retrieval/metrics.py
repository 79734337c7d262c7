"""Retrieval metrics of the GaLR evaluation protocol (galr-reference.md §7), vectorised and torch-free.

The similarity matrix is ``S [N_img, cpi * N_img]`` with caption ``j`` belonging to image
``j // cpi`` (``cpi`` = captions per image, 5 in RSITMD and RSICD).

* image->text ("sentence retrieval"): the rank of image ``i`` is the best 0-based position of any of
  its captions in the image's ranking of all captions;
* text->image ("image retrieval"): the rank of caption ``j`` is the position of image ``j // cpi`` in
  the caption's ranking of all images;
* ``R@K = 100 * mean(rank < K)``, ``medr = floor(median(rank)) + 1``, ``meanr = mean(rank) + 1``,
  ``mR`` = mean of the six recalls.

Ties: the authors' code ranks with ``np.argsort(scores)[::-1]`` (ascending order read backwards),
not ``np.argsort(-scores)``; the two differ only for equal scores. This module makes the same
``np.argsort`` call on the same values and dtype (no casting), so ranks, medr and meanr match the
original exactly even for tie-heavy matrices such as MR output, which is 0 outside each query's
top K.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from galr.config import RerankConfig
from galr.errors import InputError
from galr.retrieval.rerank import DEFAULT_BLOCK_ELEMENTS, rerank_i2t, rerank_t2i

RECALL_CUTOFFS = (1, 5, 10)


@dataclass(frozen=True)
class RetrievalMetrics:
    """The seven numbers of the paper's Table I plus median and mean ranks.

    Recalls are percentages; ranks are 1-based (``floor(median) + 1`` and ``mean + 1``).
    """

    i2t_r1: float
    i2t_r5: float
    i2t_r10: float
    t2i_r1: float
    t2i_r5: float
    t2i_r10: float
    i2t_medr: float
    i2t_meanr: float
    t2i_medr: float
    t2i_meanr: float
    mean_recall: float

    @classmethod
    def from_ranks(cls, i2t: np.ndarray, t2i: np.ndarray) -> "RetrievalMetrics":
        """Summarise 0-based ranks of both directions.

        Args:
            i2t: rank of every image query (``[N_img]``), e.g. from :func:`i2t_ranks`.
            t2i: rank of every caption query (``[N_cap]``), e.g. from :func:`t2i_ranks`.

        Returns:
            The metrics, computed with the original's formulas (same float operations and order).

        Raises:
            ValueError: if either rank array is empty.
        """
        i2t_stats = _rank_statistics(i2t, "i2t")
        t2i_stats = _rank_statistics(t2i, "t2i")
        (i_r1, i_r5, i_r10, i_medr, i_meanr), (t_r1, t_r5, t_r10, t_medr, t_meanr) = i2t_stats, t2i_stats
        # The original adds t2i before i2t; the same order keeps mR bit-identical.
        mean_recall = (t_r1 + t_r5 + t_r10 + i_r1 + i_r5 + i_r10) / 6.0
        return cls(i_r1, i_r5, i_r10, t_r1, t_r5, t_r10, i_medr, i_meanr, t_medr, t_meanr, mean_recall)

    def to_dict(self) -> dict[str, float]:
        """Plain ``{field: float}`` for JSON reports and manifests."""
        return {name: float(value) for name, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RetrievalMetrics":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: if fields are missing or unknown.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        missing, unknown = sorted(set(names) - set(values)), sorted(set(values) - set(names))
        if missing or unknown:
            raise InputError(f"RetrievalMetrics fields missing {missing}, unknown {unknown}")
        return cls(**{name: float(values[name]) for name in names})

    def format_table(self, title: str = "Retrieval") -> str:
        """A fixed-width text table, one row per direction, then mR.

        Args:
            title: first line of the table (e.g. dataset and precision).

        Returns:
            The table as a multi-line string (no trailing newline).
        """
        header = f"{'direction':<12} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'medr':>7} {'meanr':>8}"
        rows = [
            ("image->text", self.i2t_r1, self.i2t_r5, self.i2t_r10, self.i2t_medr, self.i2t_meanr),
            ("text->image", self.t2i_r1, self.t2i_r5, self.t2i_r10, self.t2i_medr, self.t2i_meanr),
        ]
        lines = [title, header, "-" * len(header)]
        for name, r1, r5, r10, medr, meanr in rows:
            lines.append(f"{name:<12} {r1:7.2f} {r5:7.2f} {r10:7.2f} {medr:7.0f} {meanr:8.2f}")
        lines.append(f"{'mR':<12} {self.mean_recall:7.2f}")
        return "\n".join(lines)


def i2t_ranks(S: Any, captions_per_image: int = 5) -> np.ndarray:  # noqa: N803 - the protocol's name
    """0-based image->text ranks: best position of any of image ``i``'s captions in its ranking.

    Args:
        S: similarity matrix ``[N_img, captions_per_image * N_img]`` (numpy, or CuPy: copied to host).
        captions_per_image: consecutive captions per image.

    Returns:
        int64 ``[N_img]``.

    Raises:
        ValueError: if ``S`` does not have ``captions_per_image * N_img`` columns, is empty or not finite.
    """
    S = _check_matrix(S, captions_per_image)
    n_image, n_caption = S.shape
    ranks = np.empty(n_image, dtype=np.int64)
    rows = max(1, DEFAULT_BLOCK_ELEMENTS // n_caption)
    for start in range(0, n_image, rows):
        stop = min(n_image, start + rows)
        # Descending order as the original reads it: ascending argsort, backwards.
        ranking = np.argsort(S[start:stop], axis=1)[:, ::-1]
        owns = ranking // captions_per_image == np.arange(start, stop)[:, None]
        ranks[start:stop] = np.argmax(owns, axis=1)  # first (best) own caption
    return ranks


def t2i_ranks(S: Any, captions_per_image: int = 5) -> np.ndarray:  # noqa: N803 - the protocol's name
    """0-based text->image ranks: position of caption ``j``'s image ``j // cpi`` in its ranking.

    Args:
        S: similarity matrix ``[N_img, captions_per_image * N_img]`` (numpy, or CuPy: copied to host).
        captions_per_image: consecutive captions per image.

    Returns:
        int64 ``[N_cap]``.

    Raises:
        ValueError: as :func:`i2t_ranks`.
    """
    S = _check_matrix(S, captions_per_image)
    n_image, n_caption = S.shape
    ranks = np.empty(n_caption, dtype=np.int64)
    columns = max(1, DEFAULT_BLOCK_ELEMENTS // n_image)
    for start in range(0, n_caption, columns):
        stop = min(n_caption, start + columns)
        # One contiguous row per caption, the same values the original's S.T[j] argsort sees.
        ranking = np.argsort(np.ascontiguousarray(S[:, start:stop].T), axis=1)[:, ::-1]
        owner = np.arange(start, stop) // captions_per_image
        ranks[start:stop] = np.argmax(ranking == owner[:, None], axis=1)
    return ranks


def evaluate_similarity(S: Any, captions_per_image: int = 5) -> RetrievalMetrics:  # noqa: N803
    """Metrics of a similarity matrix in both directions (the original ``calc_acc``).

    Args:
        S: similarity matrix ``[N_img, captions_per_image * N_img]``.
        captions_per_image: consecutive captions per image.

    Returns:
        The retrieval metrics.

    Raises:
        ValueError: as :func:`i2t_ranks`.
    """
    return RetrievalMetrics.from_ranks(i2t_ranks(S, captions_per_image), t2i_ranks(S, captions_per_image))


def evaluate_with_rerank(
    S: Any,  # noqa: N803
    rerank_config: RerankConfig = RerankConfig(),
    captions_per_image: int = 5,
) -> RetrievalMetrics:
    """Metrics after multivariate rerank, as the original ``compare()`` reports them.

    The image->text numbers come from the i2t-reranked matrix and the text->image numbers from the
    t2i-reranked matrix; each direction is reranked on its own.

    Args:
        S: similarity matrix ``[N_img, captions_per_image * N_img]`` (numpy or CuPy; MR runs where it is).
        rerank_config: MR parameters.
        captions_per_image: consecutive captions per image.

    Returns:
        The retrieval metrics with MR.

    Raises:
        ValueError, TypeError: for a malformed ``S`` (see :func:`i2t_ranks` and
            :func:`galr.retrieval.rerank.rerank_i2t`).
    """
    _check_shape(np.shape(S), captions_per_image)  # fail before the (slow) rerank; np.shape reads .shape first
    i2t = i2t_ranks(rerank_i2t(S, rerank_config), captions_per_image)
    t2i = t2i_ranks(rerank_t2i(S, rerank_config), captions_per_image)
    return RetrievalMetrics.from_ranks(i2t, t2i)


def _check_matrix(S: Any, captions_per_image: int) -> np.ndarray:  # noqa: N803
    if hasattr(S, "get") and type(S).__module__.split(".")[0] == "cupy":
        S = S.get()  # ranking is tie-sensitive, so it always runs with numpy's argsort
    S = np.asarray(S)
    _check_shape(S.shape, captions_per_image)
    if not (np.issubdtype(S.dtype, np.floating) or np.issubdtype(S.dtype, np.integer)):
        raise InputError(f"S must hold real numbers, got dtype {S.dtype}")
    if not np.isfinite(S).all():
        raise InputError("S contains NaN or inf; ranks would be meaningless, check the encoder outputs")
    return S


def _check_shape(shape: tuple[int, ...], captions_per_image: int) -> None:
    if captions_per_image < 1:
        raise InputError(f"captions_per_image must be >= 1, got {captions_per_image}")
    if len(shape) != 2 or 0 in shape:
        raise InputError(f"S must be a non-empty 2-D [images, captions] matrix, got shape {tuple(shape)}")
    if shape[1] != captions_per_image * shape[0]:
        raise InputError(
            f"S has shape {tuple(shape)} but {shape[0]} images with {captions_per_image} captions each need "
            f"{captions_per_image * shape[0]} columns; caption j must belong to image j // {captions_per_image}"
        )


def _rank_statistics(ranks: np.ndarray, direction: str) -> tuple[float, float, float, float, float]:
    """(R@1, R@5, R@10, medr, meanr) with the original's arithmetic (ranks as float64)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.ndim != 1 or ranks.size == 0:
        raise InputError(f"{direction} ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    recalls = tuple(100.0 * np.count_nonzero(ranks < k) / len(ranks) for k in RECALL_CUTOFFS)
    medr = float(np.floor(np.median(ranks)) + 1)
    meanr = float(ranks.mean() + 1)
    return (float(recalls[0]), float(recalls[1]), float(recalls[2]), medr, meanr)


__all__ = [
    "RECALL_CUTOFFS",
    "RetrievalMetrics",
    "evaluate_similarity",
    "evaluate_with_rerank",
    "i2t_ranks",
    "t2i_ranks",
]
