"""``Retriever``: the Python API a ground station embeds (encoders + gallery index + MR rerank).

>>> from galr.runtime import Retriever                    # doctest: +SKIP
>>> with Retriever.open("galr.plan", "gallery.gidx") as retriever:
...     for result in retriever.search_text(["two planes parked next to a runway"], top_k=5):
...         print(result.query, [(hit.id, round(hit.score, 3)) for hit in result.hits])

A query is answered in three steps, each through a seam: the encoders embed it; the index's
searcher finds the candidates (the top ``K`` MR needs, or the top ``k`` without MR); MR reranks
them with the reverse search over a bank (:func:`~galr.retrieval.rerank.rerank_candidates`), whose
scores come from the bank's searcher. The retriever never touches stored vectors itself.

Memory: queries are answered in blocks whose working arrays (above all MR's bank scores, ``bank
rows x queries x K``) stay under :data:`BLOCK_ELEMENTS`, so a call's peak memory does not grow with
the number of queries beyond the results themselves.

Concurrency: ``search_text`` and ``search_images`` keep no state between calls, so one retriever
can serve several analyst threads at once (the encoders serialise what must be serialised). Do not
modify the index while it is being searched: build or update it, then open a new retriever.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from galr import paths
from galr.config import RerankConfig
from galr.errors import InputError
from galr.geo.filters import PlaceFilter
from galr.retrieval.rerank import MIN_CANDIDATES, rerank_candidates
from galr.runtime.index.searchers import Searcher

#: Elements (float32) of one block's largest working array; 64 MiB.
BLOCK_ELEMENTS = 1 << 24
#: Queries encoded and searched together at most (the encoders batch within a block themselves).
MAX_BLOCK_QUERIES = 256


class RerankUnavailableWarning(UserWarning):
    """MR was asked for but the index has no text bank to do the reverse search with."""


@dataclass(frozen=True)
class Hit:
    """One retrieved item: an image of the gallery (text->image) or a caption of the bank (image->text)."""

    rank: int
    id: str
    score: float
    rerank_score: float | None = None
    record: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; the record is a copy (its nested values are shared)."""
        return {"rank": self.rank, "id": self.id, "score": self.score, "rerank_score": self.rerank_score,
                "record": None if self.record is None else dict(self.record)}


@dataclass(frozen=True)
class QueryResult:
    """Results of one query, best first, with where the time went (milliseconds)."""

    query: str
    hits: list[Hit]
    reranked: bool
    timings_ms: dict[str, float] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)  # what a caller should know (the service fills it)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (written out: ``dataclasses.asdict`` deep-copies every record, a service's hot path)."""
        return {"query": self.query, "hits": [hit.to_dict() for hit in self.hits], "reranked": self.reranked,
                "timings_ms": dict(self.timings_ms), "notices": list(self.notices)}

    def truncated(self, top_k: int) -> "QueryResult":
        """The same result with its first ``top_k`` hits (a shorter search gives exactly these)."""
        return QueryResult(self.query, self.hits[:top_k], self.reranked, self.timings_ms, self.notices)


def _order_with_rerank(values: np.ndarray, bank_values: np.ndarray, config: RerankConfig,
                       top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rerank each query's candidates; returns (order of candidate slots, cosine, MR score) per row."""
    k = min(max(MIN_CANDIDATES, config.k), values.shape[1])
    mr = rerank_candidates(values[:, :k], bank_values[:, :, :k], config)
    # Reranked candidates first (by MR score, ties by forward rank), then the rest by cosine, as MR's
    # zero scores outside the top K would place them.
    order = np.argsort(-mr, axis=1, kind="stable")
    tail = np.broadcast_to(np.arange(k, values.shape[1]), (values.shape[0], values.shape[1] - k))
    full = np.concatenate([order, tail], axis=1)[:, :top_k]
    mr_full = np.concatenate([mr, np.zeros((values.shape[0], values.shape[1] - k), np.float32)], axis=1)
    return full, np.take_along_axis(values, full, 1), np.take_along_axis(mr_full, full, 1)


@dataclass(frozen=True)
class _Side:
    """One side of a search: the searcher a query is matched against, the searcher of the bank its
    MR reverse search uses, and how a found key is named and described."""

    searcher: Searcher
    bank: Searcher
    id_of: Callable[[int], str]
    record_of: Callable[[int], dict[str, Any]]
    params: Mapping[str, Any] = field(default_factory=dict)


class Retriever:
    """Text->image and image->text search over a gallery index with optional multivariate rerank.

    Args:
        encoders: :class:`~galr.runtime.encoders.Encoders` (``load_engine``).
        index: a :class:`~galr.runtime.index.GalleryIndex` built with the same model.
        rerank: MR parameters (the authors' K=30, Wp1=0.3, Wp2=1.1 by default).
        device: where the exact searcher runs: ``"auto"``, ``"cpu"`` or ``"cuda"`` (CuPy).
        search_params: the gallery searcher's search settings (``nprobe`` for ivf/ivfpq, ``ef`` for
            hnsw); the text bank is always searched exactly.

    Raises:
        IndexModelMismatchError: the index was built with another model.
    """

    def __init__(self, encoders, index, rerank: RerankConfig = RerankConfig(), device: str = "auto",
                 search_params: Mapping[str, Any] | None = None) -> None:
        from galr.runtime.index import IndexModelMismatchError

        if index.model_hash != encoders.model_hash:
            raise IndexModelMismatchError(
                f"the index was built with another model ({index.model_hash[:12]}) than {encoders.info.bundle} "
                f"({encoders.model_hash[:12]}); rebuild it with `galr-index IMAGES --engine {encoders.info.bundle}`"
            )
        self.encoders, self.index, self.rerank_config, self.device = encoders, index, rerank, device
        self.search_params = dict(search_params or {})

    @classmethod
    def open(cls, bundle=paths.DEFAULT_BUNDLE, index=paths.DEFAULT_INDEX, backend: str = "auto",
             device: str = "auto", precision: str = "auto", rerank: RerankConfig = RerankConfig(),
             search_params: Mapping[str, Any] | None = None) -> "Retriever":
        """Load the encoders and the index from files (the index must come from the same model)."""
        from galr.runtime.encoders import load_engine
        from galr.runtime.index import load_index

        encoders = load_engine(bundle, backend=backend, device=device, precision=precision)
        try:
            return cls(encoders, load_index(index, expected_model_hash=encoders.model_hash), rerank, device,
                       search_params)
        except BaseException:
            encoders.close()
            raise

    def close(self) -> None:
        self.encoders.close()

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def has_text_bank(self) -> bool:
        return len(self.index.text_bank) > 0

    def _rerank_possible(self, rerank: bool, bank_rows: int) -> bool:
        if rerank and bank_rows == 0:
            warnings.warn("MR needs a reverse-search bank (a text bank for text queries: `galr-index --text-bank`); "
                          "ranking by cosine only", RerankUnavailableWarning, stacklevel=3)
            return False
        return rerank

    def search_text(self, queries: str | Sequence[str], top_k: int = 10, rerank: bool = True,
                    labels: Sequence[str] | None = None, where: PlaceFilter | None = None) -> list[QueryResult]:
        """Images of the gallery for each text query, best first.

        Args:
            queries: one query string, or a sequence of them.
            top_k: results per query.
            rerank: apply MR (needs the index's text bank).
            labels: how messages name each query (e.g. ``"line 3"``); ``"query #i"`` by default.
            where: only tiles whose footprint meets ``where.bbox`` and whose scene date is in
                ``[where.since, where.until]``; applied inside the search (the true top ``k`` of those).
        """
        queries = [queries] if isinstance(queries, str) else list(queries)
        labels = list(labels) if labels is not None else [f"query #{i}" for i in range(len(queries))]
        return self._search(queries, queries, labels, lambda block, names: self.encoders.encode_text(block, names),
                            self._side("images", where), top_k, rerank)

    def search_images(self, images: Any, local: Any = None, top_k: int = 10, rerank: bool = True) -> list[QueryResult]:
        """Captions of the index's text bank for each query image, best first (image->text mode).

        The reverse search of MR uses the gallery images as the bank of image queries.

        Args:
            images: one image path, or what :meth:`Encoders.encode_images` takes.
            local: the DREA input for the query images (see :meth:`Encoders.encode_images`).
            top_k: results per query.
            rerank: apply MR.

        Raises:
            InputError: the index has no text bank.
        """
        captions = self._side("captions")
        if isinstance(images, (str, bytes)) or hasattr(images, "__fspath__"):
            images = [images]
        if isinstance(images, np.ndarray):
            labels = [f"image #{i}" for i in range(len(images))]
        else:
            images = list(images)
            labels = [str(item) for item in images]
        if not isinstance(local, (type(None), str)) and not hasattr(local, "__fspath__") and \
                not hasattr(local, "lookup") and not hasattr(local, "detect_one"):
            # Per-image DREA inputs must stay with their images: one block.
            block = len(labels) or 1
        else:
            block = None
        return self._search(images, labels, labels, lambda part, _: self.encoders.encode_images(part, local=local),
                            captions, top_k, rerank, block=block)

    def search_embeddings(self, embeddings: np.ndarray, labels: Sequence[str], *, target: str = "images",
                          top_k: int = 10, rerank: bool = True, where: PlaceFilter | None = None) -> list[QueryResult]:
        """Search with query embeddings made elsewhere (e.g. once for several searches).

        Args:
            embeddings: float32 ``[q, D]`` unit-norm query embeddings from this retriever's encoders:
                text embeddings for ``target="images"``, image embeddings for ``target="captions"``.
            labels: what each result says it answered.
            target: ``"images"`` (the gallery, MR over the text bank) or ``"captions"`` (the text
                bank, MR over the gallery).
            where: restrict the gallery by place and date (``target="images"`` only; see :meth:`search_text`).
        """
        side = self._side(target, where)
        labels = list(labels)
        return self._search(np.asarray(embeddings, np.float32), labels, labels, lambda block, _: block, side, top_k,
                            rerank)

    def _side(self, target: str, where: PlaceFilter | None = None) -> _Side:
        """What a query is matched against: the gallery images (MR over the text bank) or the captions."""
        index = self.index
        if where is not None and target != "images":
            raise InputError("a place/date filter applies to gallery images (text->image search) only")
        if target == "images":
            params = dict(self.search_params)
            if where is not None:
                params["allowed"] = index.keys_matching(where)
            return _Side(index.images, index.text_bank, lambda key: index.record(key).id,
                         lambda key: index.record(key).to_dict(), params)
        if target == "captions":
            if not self.has_text_bank:
                raise InputError("image->text search needs captions: build the index with "
                                 "`galr-index --text-bank FILE`")
            return _Side(index.text_bank, index.images, index.bank_text, lambda key: {"text": index.bank_text(key)})
        raise InputError(f"target must be 'images' or 'captions', got {target!r}")

    def _block_size(self, bank_rows: int, depth: int) -> int:
        return max(1, min(MAX_BLOCK_QUERIES, BLOCK_ELEMENTS // max(1, bank_rows * depth)))

    def _search(self, queries: Any, shown: list[str], labels: list[str], encode: Callable[[Any, list[str]], np.ndarray],
                side: _Side, top_k: int, rerank: bool, block: int | None = None) -> list[QueryResult]:
        """Encode, search and rerank ``queries`` in blocks (see the module docstring on memory).

        ``shown`` is what each result says it answered; ``labels`` how messages name each query.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"top_k must be a positive integer, got {top_k!r}")
        rerank = self._rerank_possible(rerank, len(side.bank))
        depth = min(len(side.searcher), max(top_k, MIN_CANDIDATES, self.rerank_config.k) if rerank else top_k)
        step = block or self._block_size(len(side.bank) if rerank else 0, depth)
        results: list[QueryResult] = []
        for start in range(0, len(labels), step):
            began = time.perf_counter()
            embeddings = encode(queries[start:start + step], labels[start:start + step])
            encode_ms = (time.perf_counter() - began) * 1e3
            results.extend(self._search_block(shown[start:start + step], embeddings, encode_ms, side, top_k, rerank,
                                              depth))
        return results

    def _search_block(self, shown: list[str], query_embeddings: np.ndarray, encode_ms: float, side: _Side,
                      top_k: int, rerank: bool, depth: int) -> list[QueryResult]:
        start = time.perf_counter()
        values, keys = side.searcher.search(query_embeddings, depth, device=self.device, **side.params)
        search_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        mr_scores = None
        if rerank:
            candidates = side.searcher.reconstruct(keys.reshape(-1))  # [nq * depth, D]
            bank_values = side.bank.scores(candidates, device=self.device).T.reshape(len(side.bank), *keys.shape)
            order, values, mr_scores = _order_with_rerank(values, bank_values, self.rerank_config, top_k)
            keys = np.take_along_axis(keys, order, 1)
        else:
            keys, values = keys[:, :top_k], values[:, :top_k]
        rerank_ms = (time.perf_counter() - start) * 1e3
        per_query = len(shown) or 1
        results = []
        for row, label in enumerate(shown):
            hits = [Hit(rank + 1, side.id_of(key), float(values[row, rank]),
                        None if mr_scores is None else float(mr_scores[row, rank]), side.record_of(key))
                    for rank, key in enumerate(keys[row].tolist())]
            timings = {"encode": encode_ms / per_query, "search": search_ms / per_query, "rerank": rerank_ms / per_query}
            results.append(QueryResult(label, hits, rerank, timings))
        return results
