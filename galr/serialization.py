"""Reading typed configs back from JSON-like dicts (manifests, checkpoints, benchmark files)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from galr.errors import InputError


def fields_from_dict(cls: type, values: Mapping[str, Any], *, lists_to_tuples: bool = True) -> dict[str, Any]:
    """Constructor arguments of dataclass ``cls`` from ``values``.

    Unknown keys are an error, so a file written by a newer galr is never half-read; JSON turns
    tuples into lists, so lists are turned back into tuples (frozen configs hold tuples).

    Raises:
        ValueError: ``values`` names a field ``cls`` does not have.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"unknown {cls.__name__} fields {unknown}; is this file from a newer galr?")
    return {k: tuple(v) if lists_to_tuples and isinstance(v, list) else v for k, v in values.items()}
