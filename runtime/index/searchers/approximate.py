"""Approximate search with FAISS: IVF-Flat (``ivf``), IVF-PQ (``ivfpq``) and HNSW (``hnsw``).

These searchers keep the :class:`~galr.runtime.index.searchers.Searcher` contract with two
differences a caller should know:

* results are approximate: a true neighbour can be missed (measure recall against
  :class:`~galr.runtime.index.searchers.exact.ExactSearcher`, as ``bench/approximate.py`` does), and
  equal scores are listed by key (the order images were first added), not by current gallery order;
* IVF kinds are trained. Rows added before the searcher is trained wait in memory; the first search,
  save or edit trains the coarse quantiser (and PQ codebooks) on a seeded sample of them
  (``train_size`` rows at most), sizes ``nlist`` from the row count at that moment, then adds them.
  With ``nlist`` given, training happens as soon as ``train_size`` rows wait, so a large build never
  holds more than that sample outside the index. Rows added later go straight in; an index that
  grows far beyond its first build is best rebuilt (``galr-index ... --search ivf --overwrite``) so
  that ``nlist`` fits its size. HNSW needs no training: its rows go straight into the graph.

What each kind stores (``D`` = embedding size): ``ivf`` every vector (4 D bytes, or 2 D with fp16
storage, a scalar quantiser), so :meth:`reconstruct` and MR see the exact vectors; ``ivfpq`` ``m``
bytes per vector (``m`` sub-quantisers of ``nbits`` = 8 bits), so reconstructed vectors and their
MR scores are approximations; ``hnsw`` every vector plus ``2 M`` graph links per vector.

On a machine where FAISS has GPU support (faiss-gpu) and sees a GPU, ``device="auto"`` or
``"cuda"`` searches the IVF kinds on the GPU: FAISS's own GPU copy of the structure, made at the
first such search and again after edits (``ivfpq`` with float16 lookup tables, which FAISS needs for
large ``m``). HNSW has no FAISS GPU form, and filtered searches (ID selectors) and searches wider
than :data:`GPU_MAX_K` stay on the CPU; ``device="cuda"`` where none of this is possible is refused
with the reason. ``ivfpq``'s exact re-rank always reads its rows on the CPU.

Search settings (``search(..., nprobe=...)``, ``galr-run --nprobe/--ef``): ``nprobe`` is how many
IVF lists are scanned (``1..nlist``; ``nlist`` scans all and is exact for ``ivf``); ``ef`` is the
HNSW search beam (``1..`` :data:`MAX_EF`, at least ``k`` is used). The FAISS structure is saved as
one hash-checked member of the ``.gidx`` (``faiss.index``) and checked against the header (size,
metric, kind, count) when read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar, Mapping

import numpy as np

from galr.container import ContainerReader, ContainerWriter
from galr.errors import InputError, UnavailableError
from galr.runtime.backends.base import BackendUnavailableError
from galr.runtime.index.searchers.exact import SEARCH_DEVICES, merge_top_k, top_k_block
from galr.runtime.index.searchers.exact_rows import ExactRows
from galr.runtime.index.vectors import STORAGE_DTYPES, checked_storage

KEYS_MEMBER, FAISS_MEMBER = "keys.npy", "faiss.index"
EXACT_MEMBER = "exact.npy"  # ivfpq with rerank: the exact vectors, in the order of keys.npy
#: Largest HNSW search beam accepted.
MAX_EF = 32768
#: Rows reconstructed and scored at a time by :meth:`ApproximateSearcher.scores` and the exact fallback.
SCORE_BLOCK_ROWS = 65536
_SEED = 1234


def faiss_module() -> Any:
    """The ``faiss`` module.

    Raises:
        UnavailableError: FAISS is not installed (the message says how to install it).
    """
    try:
        import faiss
    except ImportError:
        raise UnavailableError("approximate search needs FAISS: pip install 'galr[faiss]' (faiss-cpu), "
                               "or use --search exact") from None
    return faiss


#: Largest ``k`` (and ``nprobe``) FAISS's GPU search takes; wider searches stay on the CPU.
GPU_MAX_K = 2048


def faiss_gpu_missing(faiss: Any) -> str | None:
    """Why FAISS cannot search on a GPU here (``None``: it can)."""
    if not hasattr(faiss, "StandardGpuResources"):
        return "this FAISS is CPU-only (faiss-cpu); install a FAISS build with GPU support (faiss-gpu)"
    if faiss.get_num_gpus() < 1:
        return "FAISS sees no GPU"
    return None


def default_nlist(rows: int) -> int:
    """IVF lists for ``rows`` vectors: ``sqrt(rows)``, at most ``rows / 39`` (39 training rows each)."""
    return max(1, min(int(math.sqrt(max(rows, 1))), rows // 39))


def _positive(value: Any, name: str, *, upper: int | None = None, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1 or \
            (upper is not None and value > upper):
        bound = f"between 1 and {upper}" if upper is not None else "a positive integer"
        raise InputError(f"{name} must be {bound}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class IvfSettings:
    """Build and search settings of the IVF kinds.

    Attributes:
        nlist: coarse clusters; ``None`` picks ``sqrt(n)`` (at most ``n / 39``, so each has 39
            training rows). FAISS suggests 4 to 16 ``sqrt(n)``; ``sqrt(n)`` keeps training affordable
            on a 2-core box, and ``nprobe`` buys the recall back.
        nprobe: lists scanned per query by default; ``None`` picks ``max(8, nlist // 32)``.
        train_size: most rows the quantiser is trained on (a seeded sample); ``None``: ``64 nlist``.
        m: PQ sub-quantisers (``ivfpq`` only); ``None`` picks ``D // 8`` (a divisor of ``D``).
        nbits: bits per PQ code (``ivfpq`` only).
        rerank: ``ivfpq`` only: keep the exact vectors beside the codes (a member of the ``.gidx``,
            memory-mapped when read, so they stay on disk) and re-score ``rerank x k`` PQ candidates
            exactly; ``0`` = PQ scores only.
    """

    nlist: int | None = None
    nprobe: int | None = None
    train_size: int | None = None
    m: int | None = None
    nbits: int = 8
    rerank: int = 0

    def checked(self) -> "IvfSettings":
        _positive(self.nlist, "nlist", optional=True)
        _positive(self.nprobe, "nprobe", optional=True)
        _positive(self.train_size, "train_size", optional=True)
        _positive(self.m, "m", optional=True)
        _positive(self.nbits, "nbits", upper=16)
        if self.rerank:
            _positive(self.rerank, "rerank", upper=1000)
        return self


@dataclass(frozen=True)
class HnswSettings:
    """Build and search settings of HNSW.

    Attributes:
        M: graph links per vector and layer (memory grows with it; so does recall).
        ef_construction: beam width while building.
        ef: search beam by default (``galr-run --ef``).
    """

    M: int = 32
    ef_construction: int = 80
    ef: int = 96

    def checked(self) -> "HnswSettings":
        _positive(self.M, "M", upper=256)
        _positive(self.ef_construction, "ef_construction", upper=MAX_EF)
        _positive(self.ef, "ef", upper=MAX_EF)
        return self


def _settings(cls: type, params: Mapping[str, Any], kind: str) -> Any:
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(params) - known)
    if unknown:
        raise InputError(f"unknown {kind} searcher settings {unknown}; it takes {sorted(known)}")
    return cls(**params).checked()


class ApproximateSearcher:
    """Common body of the FAISS searchers: keys in gallery order, training, edits, persistence."""

    kind: ClassVar[str]
    _settings_class: ClassVar[type]

    def __init__(self, dim: int, storage: str = "fp32", **params: Any) -> None:
        self._faiss = faiss_module()
        self.dim = int(dim)
        self.storage = storage
        checked_storage(storage)
        self.settings = _settings(self._settings_class, params, self.kind)
        self._index: Any = None  # the FAISS structure, once trained
        self._keys = np.zeros(0, dtype=np.int64)
        self._pending: list[np.ndarray] = []  # vectors added before training, in key order of _keys
        self._edits = 0  # bumped by every edit of the FAISS structure: keys the GPU copy
        self._gpu: tuple[Any, int, Any, Any] | None = None  # (structure, edits, GPU resources, GPU copy)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} x {self.dim}, {self.storage}, {self.settings})"

    @property
    def trained(self) -> bool:
        """Whether the FAISS structure exists (else added rows wait for training; see the module docstring)."""
        return self._index is not None

    @property
    def keys(self) -> np.ndarray:
        view = self._keys.view()
        view.flags.writeable = False
        return view

    # -- kind-specific pieces -----------------------------------------------------------------
    def _new_index(self, rows: int) -> Any:
        raise NotImplementedError

    #: The search settings the kind takes (``search(..., **params)``).
    _search_names: ClassVar[frozenset[str]] = frozenset()

    def _check_search_names(self, params: Mapping[str, Any]) -> None:
        unknown = sorted(set(params) - self._search_names)
        if unknown:
            raise InputError(f"the {self.kind} searcher takes {sorted(self._search_names)}, not {unknown}")

    def _search_parameters(self, params: Mapping[str, Any], k: int) -> Any:
        raise NotImplementedError

    def _exhaustive_parameters(self) -> Any:
        """Search parameters that find ``k`` rows whenever ``k <= len`` (``None``: use the exact fallback)."""
        return None

    def _structure_class(self) -> type:
        """The FAISS class this kind saves (checked when a file is read)."""
        raise NotImplementedError

    def _check_loaded(self, index: Any) -> None:
        if not isinstance(index, self._structure_class()):
            raise InputError(f"the .gidx says {self.kind} but its FAISS structure is a {type(index).__name__}")

    # -- training -----------------------------------------------------------------------------
    def _ready(self) -> Any:
        """The trained FAISS structure with every row in it (trains and flushes pending rows first)."""
        if self._index is None:
            pending = np.concatenate(self._pending) if self._pending else np.zeros((0, self.dim), np.float32)
            index = self._new_index(len(pending))
            if not index.is_trained:
                sample = pending
                if len(pending) > self.settings.train_size:
                    chosen = np.random.default_rng(_SEED).choice(len(pending), self.settings.train_size, replace=False)
                    sample = pending[np.sort(chosen)]
                index.train(np.ascontiguousarray(sample, dtype=np.float32))
            if len(pending):
                index.add_with_ids(np.ascontiguousarray(pending, dtype=np.float32), self._keys)
            self._index, self._pending = index, []
        return self._index

    # -- editing ------------------------------------------------------------------------------
    def _missing(self, keys: np.ndarray) -> list[int]:
        return keys[~np.isin(keys, self._keys)].tolist()

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(keys), self.dim)
        taken = keys[np.isin(keys, self._keys)].tolist()
        if taken or len(np.unique(keys)) != len(keys):
            raise KeyError(f"keys already present or repeated: {taken[:5] or 'repeated in the call'}")
        self._keys = np.concatenate([self._keys, keys])
        if self._index is None:
            self._pending.append(vectors)
            if self._trains_early():
                self._ready()  # bounded memory for big builds: the rest goes straight into the index
        else:
            self._index.add_with_ids(vectors, keys)
        self._edits += 1

    def _trains_early(self) -> bool:
        """Whether the structure can be built from the waiting rows now (its settings do not depend on the total)."""
        return False

    def _checked_present(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        missing = self._missing(keys)
        if missing:
            raise KeyError(f"key {missing[0]} is not in the searcher")
        return keys

    def replace(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = self._checked_present(keys)
        index = self._ready()
        index.remove_ids(keys)
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(keys), self.dim), keys)
        self._edits += 1

    def remove(self, keys: np.ndarray) -> None:
        keys = self._checked_present(keys)
        self._ready().remove_ids(keys)
        self._keys = self._keys[~np.isin(self._keys, keys)]
        self._edits += 1

    # -- search -------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, *, device: str = "auto", allowed: np.ndarray | None = None,
               **params: Any) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top ``k`` per query; ``params`` are the kind's search settings (``nprobe``/``ef``).

        ``allowed`` (keys) restricts the search inside FAISS (an ID selector), so the answer is the
        best ``k`` among the allowed rows. ``device``: see the module docstring (GPU searches).
        """
        if device not in SEARCH_DEVICES:
            raise InputError(f"device must be one of {SEARCH_DEVICES}, got {device!r}")
        self._check_device(device)
        if allowed is not None:
            allowed = np.asarray(allowed, np.int64)
            allowed = allowed[np.isin(allowed, self._keys)]  # once per search: the keys that are here
        k = min(int(k), len(self) if allowed is None else len(allowed))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if k == 0:
            self._check_search_names(params)
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        return self._search(queries, k, device, allowed, params)

    def _search(self, queries: np.ndarray, k: int, device: str, allowed: np.ndarray | None,
                params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` once its inputs are checked: float32 ``queries``, ``1 <= k <=`` the rows
        searched, ``allowed`` only keys of this searcher (or ``None``)."""
        selector = None
        search_params = self._search_parameters(params, k)
        if allowed is not None:
            selector = self._faiss.IDSelectorBatch(allowed)
            search_params.sel = selector
        gpu = self._gpu_copy(device) if allowed is None and k <= GPU_MAX_K and \
            getattr(search_params, "nprobe", 0) <= GPU_MAX_K else None
        scores, keys = (gpu if gpu is not None else self._ready()).search(queries, k, params=search_params)
        short = np.nonzero((keys < 0).any(axis=1))[0]
        if len(short):  # a probe found fewer than k rows: answer those queries exhaustively
            fuller = self._exhaustive_parameters()
            if fuller is not None and selector is None:
                scores[short], keys[short] = self._index.search(queries[short], k, params=fuller)
            else:
                scores[short], keys[short] = self._exact(queries[short], k, allowed)
        # FAISS returns equal scores in no fixed order: list them by key (the order images were added).
        order = np.lexsort((keys, -scores), axis=-1)
        scores, keys = np.take_along_axis(scores, order, 1), np.take_along_axis(keys, order, 1)
        return scores.astype(np.float32, copy=False), keys.astype(np.int64, copy=False)

    #: Whether FAISS has a GPU form of this kind.
    _gpu_capable: ClassVar[bool] = True

    def _check_device(self, device: str) -> None:
        if device != "cuda":
            return
        reason = faiss_gpu_missing(self._faiss) if self._gpu_capable else "FAISS has no GPU form of HNSW"
        if reason:
            raise BackendUnavailableError(f"{self.kind} search on device='cuda' is not possible: {reason}; "
                                          "use device='cpu'")

    def _gpu_cloner_options(self) -> Any:
        return None

    def _gpu_copy(self, device: str) -> Any:
        """FAISS's GPU copy of the structure, current with every edit (``None``: search on the CPU)."""
        if device == "cpu" or not self._gpu_capable or faiss_gpu_missing(self._faiss):
            return None
        index = self._ready()
        if self._gpu is None or self._gpu[0] is not index or self._gpu[1] != self._edits:
            resources = self._faiss.StandardGpuResources()
            options = self._gpu_cloner_options()
            copy = self._faiss.index_cpu_to_gpu(resources, 0, index, options) if options is not None else \
                self._faiss.index_cpu_to_gpu(resources, 0, index)
            self._gpu = (index, self._edits, resources, copy)
        return self._gpu[3]

    def _exact(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        best_scores = np.zeros((len(queries), 0), np.float32)
        best_rows = np.zeros((len(queries), 0), np.int64)
        usable = None if allowed is None else np.isin(self._keys, allowed)
        for start, block in self._blocks():
            scores = queries @ block.T
            if usable is not None:
                scores[:, ~usable[start:start + len(block)]] = -np.inf
            block_scores, columns = top_k_block(np, scores, min(k, len(block)))
            best_scores, best_rows = merge_top_k(np.concatenate([best_scores, block_scores], axis=1),
                                                 np.concatenate([best_rows, columns + start], axis=1), k)
        return best_scores, self._keys[best_rows]

    def _blocks(self):
        for start in range(0, len(self), SCORE_BLOCK_ROWS):
            yield start, self.reconstruct(self._keys[start:start + SCORE_BLOCK_ROWS])

    def scores(self, queries: np.ndarray, *, device: str = "auto", **_: Any) -> np.ndarray:
        """Scores against the stored (for ``ivfpq``: reconstructed) vectors, block by block, in gallery order."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        out = np.empty((len(queries), len(self)), dtype=np.float32)
        for start, block in self._blocks():
            out[:, start:start + len(block)] = queries @ block.T
        return out

    def reconstruct(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        if len(keys) == 0:
            return np.zeros((0, self.dim), np.float32)
        index = self._ready()
        try:
            return np.asarray(index.reconstruct_batch(keys), dtype=np.float32).reshape(len(keys), self.dim)
        except RuntimeError:
            missing = self._missing(keys)
            raise KeyError(f"key {missing[0] if missing else '?'} is not in the searcher") from None

    # -- persistence --------------------------------------------------------------------------
    def save(self, writer: ContainerWriter, prefix: str) -> dict[str, Any]:
        writer.write_array(prefix + KEYS_MEMBER, self.keys)
        params = {"settings": asdict(self.settings), "faiss_bytes": 0, "faiss_version": str(self._faiss.__version__)}
        if len(self) or self.trained:  # an empty, untrained searcher has no structure yet: keys only
            blob = self._faiss.serialize_index(self._ready())
            writer.write_array(prefix + FAISS_MEMBER, blob)
            params["faiss_bytes"] = int(blob.size)
        return params

    @classmethod
    def load(cls, reader: ContainerReader, entries: Mapping[str, Any], prefix: str, *, dim: int, storage: str,
             count: int, params: Mapping[str, Any]) -> "ApproximateSearcher":
        settings, size = params.get("settings"), params.get("faiss_bytes")
        if not isinstance(settings, dict) or isinstance(size, bool) or not isinstance(size, int) or size < 0 or \
                (size == 0 and count > 0):
            raise reader.damaged(f"the {cls.kind} searcher's header entry lacks its settings or size")
        try:
            searcher = cls(dim, storage, **settings)
        except InputError as exc:
            raise reader.damaged(f"the {cls.kind} searcher's settings are invalid ({exc})") from None
        keys = reader.read_array(prefix + KEYS_MEMBER, entries[prefix + KEYS_MEMBER], np.int64, (count,))
        if size == 0:
            return searcher  # saved empty and untrained
        blob = reader.read_array(prefix + FAISS_MEMBER, entries[prefix + FAISS_MEMBER], np.uint8, (size,))
        try:
            index = searcher._faiss.deserialize_index(blob)
        except RuntimeError as exc:
            raise reader.damaged(f"the {cls.kind} structure cannot be read by FAISS ({str(exc).splitlines()[0]})"
                                 ) from None
        problems = []
        if index.d != dim:
            problems.append(f"it holds {index.d}-dimensional vectors, the index {dim}")
        if index.ntotal != count:
            problems.append(f"it holds {index.ntotal} vectors, the header {count}")
        if index.metric_type != searcher._faiss.METRIC_INNER_PRODUCT:
            problems.append("its metric is not the inner product")
        if len(np.unique(keys)) != len(keys):
            problems.append("its keys repeat")
        if problems:
            raise reader.damaged(f"the {cls.kind} structure does not fit the index: {'; '.join(problems)}")
        searcher._check_loaded(index)
        searcher._index, searcher._keys = index, keys
        return searcher


class IvfSearcher(ApproximateSearcher):
    """IVF-Flat (or IVF with fp16 scalar quantiser for fp16 storage): exact vectors, probed lists.

    Args:
        dim: vector size.
        storage: ``"fp32"`` or ``"fp16"``.
        **params: :class:`IvfSettings` fields.
    """

    kind = "ivf"
    _settings_class = IvfSettings
    _search_names = frozenset({"nprobe"})

    def _nlist(self, rows: int) -> int:
        if self.settings.nlist is not None:
            return self.settings.nlist
        return default_nlist(rows)

    def _trains_early(self) -> bool:
        nlist = self.settings.nlist
        return nlist is not None and sum(map(len, self._pending)) >= (self.settings.train_size or 64 * nlist)

    def _new_index(self, rows: int) -> Any:
        faiss = self._faiss
        nlist = self._nlist(rows)
        self.settings = replace(self.settings, nlist=nlist,
                                nprobe=self.settings.nprobe or max(1, min(nlist, max(8, nlist // 32))),
                                train_size=self.settings.train_size or 64 * nlist)
        index = self._new_ivf(faiss.IndexFlatIP(self.dim), nlist)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct and remove by key
        # FAISS warns on stderr when clusters get fewer than 39 training rows; small galleries are
        # expected here and the warning is not something a galr user can act on.
        index.cp.min_points_per_centroid = 1
        if hasattr(index, "pq"):
            index.pq.cp.min_points_per_centroid = 1
        return index

    def _new_ivf(self, quantiser: Any, nlist: int) -> Any:
        faiss = self._faiss
        if self.storage == "fp16":
            return faiss.IndexIVFScalarQuantizer(quantiser, self.dim, nlist, faiss.ScalarQuantizer.QT_fp16,
                                                 faiss.METRIC_INNER_PRODUCT)
        return faiss.IndexIVFFlat(quantiser, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)

    def _search_parameters(self, params: Mapping[str, Any], k: int) -> Any:
        self._check_search_names(params)
        index = self._ready()
        nprobe = params.get("nprobe")
        nprobe = self.settings.nprobe if nprobe is None else _positive(nprobe, "nprobe", upper=index.nlist)
        return self._faiss.SearchParametersIVF(nprobe=min(int(nprobe), index.nlist))

    def _exhaustive_parameters(self) -> Any:
        return self._faiss.SearchParametersIVF(nprobe=self._index.nlist)

    def _structure_class(self) -> type:
        return self._faiss.IndexIVFScalarQuantizer if self.storage == "fp16" else self._faiss.IndexIVFFlat


class IvfPqSearcher(IvfSearcher):
    """IVF with product-quantised vectors: ``m`` bytes per vector, approximate scores.

    Needs at least ``2 ** nbits`` rows to train its codebooks.
    """

    kind = "ivfpq"

    def _sub_quantisers(self) -> int:
        if self.settings.m is not None:
            if self.dim % self.settings.m:
                raise InputError(f"m={self.settings.m} must divide the embedding size {self.dim}")
            return self.settings.m
        return max(m for m in range(1, max(1, self.dim // 8) + 1) if self.dim % m == 0)

    def _new_ivf(self, quantiser: Any, nlist: int) -> Any:
        self.settings = replace(self.settings, m=self._sub_quantisers())
        return self._faiss.IndexIVFPQ(quantiser, self.dim, nlist, self.settings.m, self.settings.nbits,
                                      self._faiss.METRIC_INNER_PRODUCT)

    def _ready(self) -> Any:
        if self._index is None:
            rows = sum(len(part) for part in self._pending)
            needed = 1 << self.settings.nbits
            if rows < needed:
                raise InputError(f"an ivfpq index needs at least {needed} images to train its codebooks "
                                 f"(2**nbits), got {rows}; use --search ivf or exact for a gallery this small")
        return super()._ready()

    def _structure_class(self) -> type:
        return self._faiss.IndexIVFPQ

    def _gpu_cloner_options(self) -> Any:
        options = self._faiss.GpuClonerOptions()
        options.useFloat16 = True  # FAISS's GPU IVF-PQ needs float16 lookup tables past m = 48 at 8 bits
        return options

    # -- exact re-ranking from vectors kept beside the codes ------------------------------------
    _exact_store: ExactRows | None = None  # rows in the order of _keys (storage dtype; on disk when large)
    _lookup: tuple[np.ndarray, np.ndarray] | None = None  # sorted keys, and their rows

    def _rows_of(self, keys: np.ndarray) -> np.ndarray:
        if self._lookup is None:
            order = np.argsort(self._keys, kind="stable")
            self._lookup = (self._keys[order], order)
        sorted_keys, order = self._lookup
        places = np.clip(np.searchsorted(sorted_keys, keys), 0, max(len(sorted_keys) - 1, 0))
        if len(sorted_keys) == 0 or not np.array_equal(sorted_keys[places], keys):
            raise KeyError(f"key {self._missing(keys)[:1] or '?'} is not in the searcher")
        return order[places]

    def _exact_rows(self) -> ExactRows:
        if self._exact_store is None:
            self._exact_store = ExactRows(self.dim, STORAGE_DTYPES[self.storage])
        return self._exact_store

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        super().add(keys, vectors)
        if self.settings.rerank:
            self._exact_rows().append(np.asarray(vectors).reshape(-1, self.dim))
            self._lookup = None

    def replace(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        super().replace(keys, vectors)
        if self.settings.rerank:
            self._exact_rows().replace(self._rows_of(np.asarray(keys, np.int64).reshape(-1)), vectors)

    def remove(self, keys: np.ndarray) -> None:
        keep = ~np.isin(self._keys, np.asarray(keys, np.int64).reshape(-1))
        super().remove(keys)
        if self.settings.rerank:
            self._exact_store, self._lookup = self._exact_rows().kept(keep), None

    def reconstruct(self, keys: np.ndarray) -> np.ndarray:
        """The exact vectors when they are kept (``rerank``), else the PQ reconstructions."""
        if not self.settings.rerank:
            return super().reconstruct(keys)
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        return self._exact_rows().rows(self._rows_of(keys)) if len(keys) else np.zeros((0, self.dim), np.float32)

    _search_names = frozenset({"nprobe", "rerank"})

    def _check_search_names(self, params: Mapping[str, Any]) -> None:
        super()._check_search_names(params)
        self._rerank_depth(params.get("rerank"))

    def _rerank_depth(self, rerank: Any) -> int:
        """A search's re-rank depth: the index's own unless given; a given one is checked."""
        if rerank is None:
            return self.settings.rerank
        if rerank != 0:
            _positive(rerank, "rerank", upper=1000)
            if not self.settings.rerank:
                raise InputError("this ivfpq index keeps no exact vectors to re-rank with; rebuild it with "
                                 "--search-setting rerank=R (or search with rerank=0)")
        return int(rerank)

    def _search(self, queries: np.ndarray, k: int, device: str, allowed: np.ndarray | None,
                params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """PQ search; with ``rerank``, ``rerank x k`` PQ candidates re-scored with the exact vectors.

        ``rerank`` may also be given per search (``1..1000``; ``0`` = PQ scores only) when the index
        keeps the exact vectors (built with ``rerank``).
        """
        rerank = self._rerank_depth(params.pop("rerank", None))
        if not rerank:
            return super()._search(queries, k, device, allowed, params)
        wide = min(len(self) if allowed is None else len(allowed), max(k, k * int(rerank)))
        _, candidates = super()._search(queries, wide, device, allowed, params)
        vectors = self._exact_rows().rows(self._rows_of(candidates.reshape(-1)))
        exact = np.einsum("qd,qkd->qk", queries, vectors.reshape(*candidates.shape, self.dim))
        order = np.lexsort((candidates, -exact), axis=-1)[:, :k]  # best exact score, ties by key
        return np.take_along_axis(exact, order, 1).astype(np.float32), np.take_along_axis(candidates, order, 1)

    def save(self, writer: ContainerWriter, prefix: str) -> dict[str, Any]:
        params = super().save(writer, prefix)
        if self.settings.rerank:
            writer.write_array(prefix + EXACT_MEMBER, self._exact_rows().array())
        return params

    @classmethod
    def load(cls, reader: ContainerReader, entries: Mapping[str, Any], prefix: str, *, dim: int, storage: str,
             count: int, params: Mapping[str, Any]) -> "ApproximateSearcher":
        searcher = super().load(reader, entries, prefix, dim=dim, storage=storage, count=count, params=params)
        if searcher.settings.rerank:
            # Memory-mapped: the exact vectors stay on disk; a query reads only its candidates' rows.
            searcher._exact_store = ExactRows(dim, STORAGE_DTYPES[storage], reader.read_array(
                prefix + EXACT_MEMBER, entries[prefix + EXACT_MEMBER], STORAGE_DTYPES[storage], (count, dim),
                mapped=True))
        return searcher


class HnswSearcher(ApproximateSearcher):
    """HNSW graph over the exact vectors (fp16 storage: a scalar quantiser). FAISS cannot remove from
    an HNSW graph, so removal and replacement rebuild it (time grows with the gallery).

    Args:
        dim: vector size.
        storage: ``"fp32"`` or ``"fp16"``.
        **params: :class:`HnswSettings` fields.
    """

    kind = "hnsw"
    _settings_class = HnswSettings
    _search_names = frozenset({"ef"})
    _gpu_capable = False

    def _trains_early(self) -> bool:
        return True  # nothing to train: rows go straight into the graph

    def _new_index(self, rows: int) -> Any:
        faiss = self._faiss
        if self.storage == "fp16":
            graph = faiss.IndexHNSWSQ(self.dim, faiss.ScalarQuantizer.QT_fp16, self.settings.M,
                                      faiss.METRIC_INNER_PRODUCT)
        else:
            graph = faiss.IndexHNSWFlat(self.dim, self.settings.M, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = self.settings.ef_construction
        return faiss.IndexIDMap2(graph)  # FAISS's wrapper keeps ``graph`` alive with the map

    def _search_parameters(self, params: Mapping[str, Any], k: int) -> Any:
        self._check_search_names(params)
        ef = params.get("ef")
        ef = self.settings.ef if ef is None else _positive(ef, "ef", upper=MAX_EF)
        return self._faiss.SearchParametersHNSW(efSearch=max(int(ef), k))

    def _rebuild(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        index = self._new_index(len(keys))
        if len(keys):
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), keys)
        self._index, self._keys = index, keys

    def replace(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = self._checked_present(keys)
        everything = self.reconstruct(self._keys)
        everything[_positions(self._keys, keys)] = np.asarray(vectors, dtype=np.float32).reshape(len(keys), self.dim)
        self._rebuild(self._keys, everything)

    def remove(self, keys: np.ndarray) -> None:
        keys = self._checked_present(keys)
        kept = ~np.isin(self._keys, keys)
        self._rebuild(self._keys[kept], self.reconstruct(self._keys)[kept])

    def _structure_class(self) -> type:
        return self._faiss.IndexIDMap2


def _positions(haystack: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """Positions of ``needles`` in ``haystack`` (all present, haystack unique)."""
    order = np.argsort(haystack, kind="stable")
    return order[np.searchsorted(haystack, needles, sorter=order)]


__all__ = ["GPU_MAX_K", "ApproximateSearcher", "ExactRows", "HnswSearcher", "HnswSettings", "IvfPqSearcher", "IvfSearcher", "IvfSettings",
           "default_nlist", "faiss_gpu_missing", "faiss_module"]
