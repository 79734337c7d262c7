"""What an index accepts as embeddings: float ``[n, D]`` rows, finite, unit-norm where it matters."""

from __future__ import annotations

from typing import Any

import numpy as np

from galr.errors import InputError

STORAGE_DTYPES: dict[str, type[np.floating]] = {"fp32": np.float32, "fp16": np.float16}

#: Rows must have an L2 norm within this of 1 (engine outputs are normalised in float32).
UNIT_NORM_TOLERANCE = 1e-3


def checked_storage(storage: str) -> np.dtype:
    """The numpy dtype of a storage name.

    Raises:
        InputError: an unknown storage.
    """
    if storage not in STORAGE_DTYPES:
        raise InputError(f"storage must be one of {sorted(STORAGE_DTYPES)}, got {storage!r}")
    return np.dtype(STORAGE_DTYPES[storage])


def checked_vectors(values: Any, rows: int | None, dim: int, name: str, *, unit_norm: bool) -> np.ndarray:
    """``values`` as float32 ``[rows, dim]``, refusing wrong shapes/dtypes, NaN/inf and (``unit_norm``)
    rows whose L2 norm is not 1.

    Raises:
        TypeError: not a floating-point array.
        InputError: wrong shape, non-finite values or non-unit rows (the message names the rows).
    """
    array = np.asarray(values)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {array.dtype}")
    expected = f"[{rows if rows is not None else 'n'}, {dim}]"
    if array.ndim != 2 or array.shape[1] != dim or (rows is not None and array.shape[0] != rows):
        raise InputError(f"{name} must have shape {expected}, got {array.shape}")
    array = array.astype(np.float32, copy=False)
    bad_rows = np.nonzero(~np.isfinite(array).all(axis=1))[0]
    if len(bad_rows):
        raise InputError(f"{name} has NaN or inf in rows {bad_rows[:10].tolist()}; check the encoder outputs")
    if unit_norm:
        norms = np.linalg.norm(array, axis=1)
        off = np.nonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)[0]
        if len(off):
            raise InputError(
                f"{name} rows {off[:10].tolist()} are not unit-norm (norms {np.round(norms[off[:3]], 4).tolist()}); "
                "L2-normalise them first (engine outputs already are)"
            )
    return array


def duplicates(values: Any) -> list:
    """Values that occur more than once, in order of their second occurrence."""
    seen: set = set()
    repeated: list = []
    for value in values:
        if value in seen and value not in repeated:
            repeated.append(value)
        seen.add(value)
    return repeated


def preview(items: Any, limit: int = 10) -> str:
    """The first ``limit`` items, repr'd and comma-joined, with a count of the rest."""
    items = list(items)
    shown = ", ".join(repr(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
