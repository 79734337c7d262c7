"""The ``galr.plan`` format: names, version, and the manifest's schema.

Layout (a checked container, :mod:`galr.container`)::

    manifest.json                 format + version, model config, vocabulary, preprocessing spec,
                                  I/O per graph, member hashes, toolchain, provenance, reports, engines
    onnx/<precision>/<graph>.onnx four graphs per precision (fp32 always; fp16 / int8 / int8-cpu when exported)
    engines/<key>/<graph>.plan    TensorRT engines, one set per :class:`~galr.bundle.engines.EngineKey`

:func:`validate_manifest` is the schema: a manifest of the wrong shape (not an object, a member
without its hash, a precision without its graphs, a field this version does not know) is refused
with what is wrong, before anything else reads it.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

from galr.container import check_member_entry
from galr.errors import InputError
from galr.graphs import GRAPH_NAMES

FORMAT_NAME = "galr-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: The manifest's hash of its own content (:func:`galr.container.table_sha256`); bundles written
#: before it existed are read without it.
MANIFEST_HASH_FIELD = "manifest_sha256"
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int8-cpu")
#: Precisions TensorRT engines are built from. ``int8-cpu`` is INT8 laid out for ONNX Runtime's CPU
#: provider (u8/s8 integer kernels, the GRU as a loop over INT8 weights); TensorRT keeps the ``int8``
#: Q/DQ set, made for its parser.
ENGINE_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
#: Precisions only ONNX Runtime's CPU provider serves.
CPU_ONLY_PRECISIONS: tuple[str, ...] = ("int8-cpu",)
#: A manifest is metadata: vocabulary, configs, reports. Anything larger is not one of ours.
MAX_MANIFEST_BYTES = 16 << 20
REEXPORT_HINT = "Re-export it with `galr-export`, or copy it again."

# field -> JSON type. Required fields first; a field not listed is refused (a newer galr wrote it).
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": str, "format_version": int, "members": dict, "onnx": dict, "model": dict, "model_hash": str,
    "vocab": dict, "preprocess": dict, "drea": dict, "tokenizer": dict,
}
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "created": str, "embedding": dict, "graphs": dict, "onnx_sha256": dict, "opset": int, "engines": list,
    "toolchain": dict, "provenance": dict, "reports": dict, MANIFEST_HASH_FIELD: str, "detector": dict,
}
#: Where ``galr-export --detector`` stores an oriented-box detector ONNX (the manifest's ``detector``
#: entry describes it: source name, task, class names, input size, DREA category of each class).
DETECTOR_MEMBER = "detector/detector.onnx"


class BundleError(InputError):
    """A bundle is missing, corrupt, truncated, of an unknown version, or lacks what was asked."""


def onnx_member(precision: str, graph: str) -> str:
    """Member name of one ONNX graph."""
    return f"onnx/{precision}/{graph}.onnx"


def engine_member(key: str, graph: str) -> str:
    """Member name of one TensorRT plan of the engine set ``key``."""
    return f"engines/{key}/{graph}.plan"


def model_hash(fp32_graphs: Mapping[str, bytes]) -> str:
    """The model's identity: SHA-256 of its four FP32 graphs, concatenated in ``GRAPH_NAMES`` order.

    Indexes record it, and the runtime refuses an index whose model hash differs from its bundle's.
    """
    digest = hashlib.sha256()
    for name in GRAPH_NAMES:
        digest.update(fp32_graphs[name])
    return digest.hexdigest()


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _schema_problems(manifest: Mapping[str, Any]) -> list[str]:
    problems = []
    for key, kind in {**_REQUIRED, **_OPTIONAL}.items():
        if key not in manifest:
            if key in _REQUIRED:
                problems.append(f"'{key}' is missing")
            continue
        value = manifest[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            problems.append(f"'{key}' must be {_type_name(kind)}, got {type(value).__name__}")
    unknown = sorted(set(manifest) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        problems.append(f"unknown fields {unknown} (written by a newer galr? upgrade galr)")
    return problems


def _member_problems(manifest: Mapping[str, Any]) -> list[str]:
    members = manifest["members"]
    problems = [problem for name, entry in members.items() if (problem := check_member_entry(name, entry))]
    detector = manifest.get("detector")
    if detector is not None:
        named = [detector.get("member")] + [e.get("member") for e in detector.get("engines", [])
                                            if isinstance(e, dict)]
        problems += [f"'detector' names {member!r}, which is not a listed member" for member in named
                     if member not in members]
    onnx = manifest["onnx"]
    if "fp32" not in onnx:
        problems.append("'onnx' has no fp32 graphs")
    for precision, graphs in onnx.items():
        if precision not in PRECISIONS:
            problems.append(f"'onnx' lists unknown precision {precision!r} (known: {list(PRECISIONS)})")
            continue
        if not isinstance(graphs, dict) or sorted(graphs) != sorted(GRAPH_NAMES):
            problems.append(f"'onnx.{precision}' must name the graphs {list(GRAPH_NAMES)}")
            continue
        for graph, member in graphs.items():
            if member != onnx_member(precision, graph) or member not in members:
                problems.append(f"'onnx.{precision}.{graph}' names {member!r}, which is not a listed member")
    return problems


def validate_manifest(manifest: Any, source: str) -> dict[str, Any]:
    """Check a parsed ``manifest.json`` against the schema; returns it unchanged.

    Only the structure is checked here; the model config, vocabulary, preprocessing and engine
    entries are parsed (and so checked) by :class:`~galr.bundle.archive.Bundle`.

    Raises:
        BundleError: naming every problem found, or saying the file is not a galr bundle.
    """
    if not isinstance(manifest, dict):
        raise BundleError(f"{source}: manifest.json is a {type(manifest).__name__}, not an object; "
                          f"this is not a galr bundle")
    if manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{source}: not a galr bundle (manifest format is {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise BundleError(
            f"{source}: bundle format version {version!r} is not supported by this galr (it reads {FORMAT_VERSION}); "
            "upgrade galr or re-export the bundle with this version"
        )
    problems = _schema_problems(manifest)
    if not problems:
        problems = _member_problems(manifest)
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise BundleError(f"{source}: manifest.json does not match the bundle schema: {shown}. {REEXPORT_HINT}")
    return manifest


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "MANIFEST_HASH_FIELD",
    "MAX_MANIFEST_BYTES",
    "PRECISIONS",
    "DETECTOR_MEMBER",
    "ENGINE_PRECISIONS",
    "CPU_ONLY_PRECISIONS",
    "BundleError",
    "engine_member",
    "model_hash",
    "onnx_member",
    "validate_manifest",
]
