"""The search seam: vectors under stable int64 keys, top-k by inner product (cosine on unit rows).

An index keeps two searchers, one over the gallery images and one over the MR text bank, and talks
to both only through :class:`Searcher`. A searcher kind is one module in this package plus one line
in :data:`SEARCHERS`; :func:`create_searcher` and :func:`load_searcher` find it by name, and the
``.gidx`` file records the name, so an index opens with the searcher that built it.

Contract every searcher keeps:

* keys are ``int64``, unique, given by the caller (the index never reuses one); rows are kept in the
  order they were added, which removals preserve ("gallery order");
* ``search`` returns scores ``float32 [q, k']`` best first and keys ``int64 [q, k']`` with
  ``k' = min(k, len)``; an exact searcher breaks ties by gallery order;
* ``scores`` gives every stored row's score against given vectors, ``float32 [q, len]`` in gallery
  order (what MR's reverse search needs);
* ``save``/``load`` go through a :mod:`galr.container` writer/reader under a member prefix, so the
  index file checks their members like any other.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar, Mapping, Protocol, runtime_checkable

import numpy as np

from galr.container import ContainerReader, ContainerWriter
from galr.errors import InputError

#: Searcher kinds: name -> "module:Class". Adding a kind is adding its module and one line here.
SEARCHERS: dict[str, str] = {
    "exact": "galr.runtime.index.searchers.exact:ExactSearcher",
    "ivf": "galr.runtime.index.searchers.approximate:IvfSearcher",
    "ivfpq": "galr.runtime.index.searchers.approximate:IvfPqSearcher",
    "hnsw": "galr.runtime.index.searchers.approximate:HnswSearcher",
}

#: ``auto`` picks exact search up to this many images and ``AUTO_APPROXIMATE`` beyond.
AUTO_EXACT_LIMIT = 250_000
AUTO_APPROXIMATE = "ivf"


def resolve_searcher_kind(kind: str, count: int) -> str:
    """``kind`` itself, or for ``"auto"`` the kind that suits ``count`` images (see :data:`AUTO_EXACT_LIMIT`)."""
    if kind != "auto":
        searcher_class(kind)  # refuses unknown kinds
        return kind
    return "exact" if count <= AUTO_EXACT_LIMIT else AUTO_APPROXIMATE


@runtime_checkable
class Searcher(Protocol):
    """What an index needs from a search structure (see the module docstring)."""

    kind: ClassVar[str]
    dim: int
    storage: str

    def __len__(self) -> int: ...

    @property
    def keys(self) -> np.ndarray:
        """``int64 [len]`` keys in gallery order."""
        ...

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Append rows under new keys."""
        ...

    def replace(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Overwrite the vectors of existing keys (their gallery position is kept)."""
        ...

    def remove(self, keys: np.ndarray) -> None:
        """Drop rows by key; the others keep their order."""
        ...

    def search(self, queries: np.ndarray, k: int, **params: Any) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` rows per query: ``(scores float32 [q, k'], keys int64 [q, k'])``."""
        ...

    def scores(self, queries: np.ndarray, **params: Any) -> np.ndarray:
        """Every row's score against each query: ``float32 [q, len]`` in gallery order."""
        ...

    def reconstruct(self, keys: np.ndarray) -> np.ndarray:
        """The stored vectors of ``keys`` as ``float32 [len(keys), dim]``."""
        ...

    def save(self, writer: ContainerWriter, prefix: str) -> dict[str, Any]:
        """Write the members under ``prefix``; returns the kind's parameters for the index header."""
        ...

    @classmethod
    def load(cls, reader: ContainerReader, entries: Mapping[str, Any], prefix: str, *, dim: int, storage: str,
             count: int, params: Mapping[str, Any]) -> "Searcher":
        """Read what :meth:`save` wrote (``entries``: the header's member table)."""
        ...


def searcher_class(kind: str) -> type:
    """The class of searcher ``kind``.

    Raises:
        InputError: an unknown kind (the message lists the known ones).
    """
    target = SEARCHERS.get(kind)
    if target is None:
        raise InputError(f"unknown searcher {kind!r}; this galr knows {sorted(SEARCHERS)}")
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def create_searcher(kind: str, dim: int, storage: str, **params: Any) -> Searcher:
    """A new, empty searcher of ``kind`` with its build settings ``params``.

    Raises:
        InputError: an unknown kind, or settings the kind does not take.
    """
    cls = searcher_class(kind)
    try:
        return cls(dim, storage, **params)
    except TypeError:
        if not params:
            raise
        raise InputError(f"the {kind} searcher takes no settings, got {sorted(params)}") from None


__all__ = ["AUTO_APPROXIMATE", "AUTO_EXACT_LIMIT", "SEARCHERS", "Searcher", "create_searcher", "resolve_searcher_kind",
           "searcher_class"]
