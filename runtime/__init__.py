"""Torch-free serving of GaLR bundles: encoders, gallery index, multivariate rerank, CLI.

Public API (imported lazily, so ``import galr.runtime`` stays cheap)::

    from galr.runtime import load_engine, Retriever, GalleryIndex, build_index, load_index

The layers, each its own module: :mod:`.backends` (runners and the backend registry),
:mod:`.encoders` (:func:`load_engine` -> :class:`Encoders`), :mod:`.index` (records, searchers,
the ``.gidx`` file), :mod:`.retriever` (search + MR), :mod:`.report` (output formats) and
:mod:`.cli` (``galr-run``, ``galr-index``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_engine": "galr.runtime.encoders",
    "Encoders": "galr.runtime.encoders",
    "QueryError": "galr.runtime.encoders",
    "Retriever": "galr.runtime.retriever",
    "QueryResult": "galr.runtime.retriever",
    "Hit": "galr.runtime.retriever",
    "GalleryIndex": "galr.runtime.index",
    "ImageRecord": "galr.runtime.index",
    "build_index": "galr.runtime.index",
    "load_index": "galr.runtime.index",
    "read_bundle": "galr.bundle",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
