"""A loop transcription of the authors' multivariate rerank, for benchmarks only.

This module exists only so benchmarks can compare the speed and the outputs of the batched
:mod:`galr.retrieval.rerank` against the original algorithm (galr-reference.md §8,
``postprocessing/rerank.py``). It keeps the original's structure on purpose: a Python loop over
queries and candidates, ``np.where`` over a full argsort column for every reverse rank (so it costs
O(Nq * K * Ng)), the reverse ranks accumulated with ``np.append`` into a float64 array, a float32
output filled element by element, the hard-coded 0.05 decay and the ``K = max(10, K)`` override.
Like the original it raises ``IndexError`` when the gallery has fewer than ``max(10, K1)`` items.

The package must never import it; tests may, as a second oracle next to their own loop.
"""

from __future__ import annotations

import numpy as np

DECAY = 0.05  # the original's literal, not configurable there


def i2t_rerank_optim(sim: np.ndarray, K1: int, Wp1: float = 1.0, Wp2: float = 0.7) -> np.ndarray:  # noqa: N803
    """The original image->text MR, rows of ``sim`` being the queries.

    Args:
        sim: similarity matrix ``[Nq, Ng]``.
        K1: candidates per query; raised to 10 when smaller, as the original does.
        Wp1: weight of the salience term p1.
        Wp2: weight of the reverse-rank term p3.

    Returns:
        float32 ``[Nq, Ng]`` MR scores, 0 outside each query's top ``max(10, K1)``.
    """
    K1 = max(10, K1)  # noqa: N806 - the original's name
    forward = np.argsort(-sim, 1)  # per query: gallery items, best first
    backward = np.argsort(-sim, 0)  # per gallery item: queries, best first
    new_sims = np.zeros_like(sim, dtype=np.float32)

    for query in range(sim.shape[0]):
        reverse_positions = np.array([])  # float64, grown one value at a time like the original
        for j in range(K1):
            item = forward[query][j]
            salience = sim[query][item] / np.sum(sim[:, item])
            new_sims[query][item] = Wp1 * salience
            new_sims[query][item] += np.exp(-DECAY * (j + 1))
            position = np.where(backward[:, item] == query)[0][0]
            reverse_positions = np.append(reverse_positions, position)

        by_reverse_rank = forward[query][:K1][np.argsort(reverse_positions)]
        for ordinal, item in enumerate(by_reverse_rank):
            new_sims[query][item] += Wp2 * np.exp(-DECAY * (float(ordinal) + 1))
    return new_sims


def t2i_rerank_optim(sim: np.ndarray, K1: int, Wp1: float = 1.0, Wp2: float = 0.7) -> np.ndarray:  # noqa: N803
    """The original text->image MR: :func:`i2t_rerank_optim` on the transposed matrix, transposed back.

    Args:
        sim: similarity matrix ``[N_img, N_cap]``; the captions (columns) are the queries.
        K1: candidates per caption; raised to 10 when smaller.
        Wp1: weight of the salience term p1.
        Wp2: weight of the reverse-rank term p3.

    Returns:
        float32 ``[N_img, N_cap]`` MR scores.
    """
    return np.transpose(i2t_rerank_optim(np.transpose(sim), K1, Wp1=Wp1, Wp2=Wp2))


__all__ = ["i2t_rerank_optim", "t2i_rerank_optim"]
