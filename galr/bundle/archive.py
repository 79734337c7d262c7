"""Opening, building and writing ``galr.plan`` bundles (on disk or in memory).

:func:`read_bundle` opens a file: the manifest is checked against the schema and parsed into typed
parts (model config, vocabulary, preprocessing spec, engine entries); members are read lazily, each
checked against its declared size and SHA-256. :func:`build_bundle` makes the same object from
members held in memory, so the export can run its accuracy gates through the runtime on the exact
bundle it is about to write, and then write it once (:meth:`Bundle.save`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from galr.bundle.engines import EngineEntry
from galr.bundle.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    MANIFEST_HASH_FIELD,
    MAX_MANIFEST_BYTES,
    PRECISIONS,
    REEXPORT_HINT,
    BundleError,
    model_hash,
    validate_manifest,
)
from galr.config import GaLRConfig
from galr.container import ContainerReader, ContainerWriter, sha256_bytes, table_sha256
from galr.errors import InputError, NotFoundError
from galr.graphs import GRAPH_NAMES
from galr.preprocess.spec import PreprocessSpec
from galr.preprocess.text import Vocabulary, VocabularyError


class Bundle:
    """An opened bundle: the checked manifest, its typed parts, and verified access to members.

    Attributes:
        path: the bundle file (for an in-memory bundle: where it will be written).
        manifest: the parsed ``manifest.json`` (schema-checked).
        config: the model's dimensions.
        vocab: the model's vocabulary.
        spec: the model's preprocessing (image, DREA, token cap).
        engine_entries: the TensorRT engine sets it carries.
    """

    def __init__(self, path: str | os.PathLike, manifest: Mapping[str, Any],
                 members: Mapping[str, bytes] | None = None) -> None:
        self.path = Path(path)
        self.manifest = validate_manifest(dict(manifest), str(self.path))
        self._in_memory = dict(members) if members is not None else None
        try:
            self.config = GaLRConfig.from_dict(self.manifest["model"])
            self.vocab = Vocabulary.from_json_dict(self.manifest["vocab"], source=f"{self.path}:manifest.json")
            self.spec = PreprocessSpec.from_dict(self.manifest)
            if self.spec.image.size != self.config.image_size:
                raise InputError(f"the preprocessing resizes to {self.spec.image.size} px but the model takes "
                                 f"{self.config.image_size} px")
            self.engine_entries = [EngineEntry.from_dict(entry) for entry in self.manifest.get("engines", [])]
        except (TypeError, ValueError, VocabularyError) as exc:
            raise BundleError(f"{self.path}: manifest.json is inconsistent: {exc}. {REEXPORT_HINT}") from None

    @property
    def precisions(self) -> list[str]:
        """Precisions whose graphs the bundle carries, in :data:`PRECISIONS` order."""
        return [p for p in PRECISIONS if p in self.manifest["onnx"]]

    @property
    def model_hash(self) -> str:
        """Identity of the model (:func:`galr.bundle.format.model_hash`); indexes refuse other models by it."""
        return str(self.manifest["model_hash"])

    def read_member(self, name: str) -> bytes:
        """Bytes of one member, checked against the manifest's size and SHA-256 (read anew each time,
        so graphs handed to a runner are not also kept here).

        Raises:
            BundleError: the member is not listed, missing, damaged or fails its checks.
        """
        entry = self.manifest["members"].get(name)
        if entry is None:
            raise BundleError(f"{self.path}: no member '{name}' in the manifest")
        if self._in_memory is not None:
            return self._in_memory[name]
        with ContainerReader(self.path, error=BundleError, fix=REEXPORT_HINT) as reader:
            return reader.read_member(name, entry)

    def verify_model_hash(self) -> None:
        """Recompute the model hash from the FP32 graphs and refuse a bundle whose manifest disagrees.

        Each member hash only proves a member is what the manifest lists; this proves the listed graphs
        are the model the manifest (and every index built with it) names.

        Raises:
            BundleError: the graphs are another model than ``model_hash`` says.
        """
        graphs = {name: self.onnx_bytes(name, "fp32") for name in GRAPH_NAMES}
        if model_hash(graphs) != self.model_hash:
            raise BundleError(f"{self.path}: its FP32 graphs are not the model its manifest names "
                              f"(model hash {self.model_hash[:16]}); the bundle was altered. {REEXPORT_HINT}")

    def onnx_bytes(self, graph: str, precision: str = "fp32") -> bytes:
        """The ONNX graph ``graph`` at ``precision``.

        Raises:
            BundleError: the bundle has no graphs at that precision (with the export command), or the
                member fails its checks.
        """
        graphs = self.manifest["onnx"].get(precision)
        if graphs is None:
            fix = f"; export them with `galr-export --{precision}`" if precision != "fp32" else ""
            raise BundleError(f"{self.path} has no {precision} graphs (it has {self.precisions}){fix}")
        if graph not in graphs:
            raise BundleError(f"{self.path}: no '{graph}' graph at {precision}")
        return self.read_member(graphs[graph])

    @property
    def detector(self) -> dict[str, Any] | None:
        """The manifest's description of the bundled detector (``galr-export --detector``), or ``None``."""
        entry = self.manifest.get("detector")
        return dict(entry) if entry else None

    def detector_bytes(self) -> bytes:
        """The bundled detector's ONNX, checked like every member.

        Raises:
            BundleError: the bundle has no detector, or its member fails its checks.
        """
        entry = self.detector
        if entry is None:
            raise BundleError(f"{self.path} carries no detector; add one with `galr-export --detector det.onnx`")
        return self.read_member(entry["member"])

    def verify(self) -> None:
        """Check every member now (reading is otherwise lazy)."""
        for name in self.manifest["members"]:
            self.read_member(name)

    def members(self, drop: Iterable[str] = ()) -> dict[str, bytes]:
        """Every member's bytes (checked), except ``drop``."""
        dropped = set(drop)
        return {name: self.read_member(name) for name in self.manifest["members"] if name not in dropped}

    def save(self, path: str | os.PathLike | None = None) -> "Bundle":
        """Write this bundle (to ``path``, default :attr:`path`) atomically; returns it opened from disk."""
        target = Path(path) if path is not None else self.path
        write_bundle(target, self.manifest, self.members())
        return read_bundle(target)


def _full_manifest(manifest: Mapping[str, Any], members: Mapping[str, bytes]) -> dict[str, Any]:
    """The manifest as it will be read back: format fields, member table and self-hash filled in, and
    passed through JSON, so an in-memory bundle sees exactly what the file will hold (lists, not tuples)."""
    full = {key: value for key, value in manifest.items() if key not in ("members", MANIFEST_HASH_FIELD)}
    full["format"], full["format_version"] = FORMAT_NAME, FORMAT_VERSION
    full["members"] = {name: {"sha256": sha256_bytes(data), "size": len(data)} for name, data in sorted(members.items())}
    full = json.loads(json.dumps(full, allow_nan=False))
    full[MANIFEST_HASH_FIELD] = table_sha256(full, MANIFEST_HASH_FIELD)
    return full


def build_bundle(path: str | os.PathLike, manifest: Mapping[str, Any], members: Mapping[str, bytes]) -> Bundle:
    """A bundle held in memory (nothing written): ``format``, version and the member table are filled in.

    Raises:
        BundleError: the manifest does not match the schema.
    """
    return Bundle(path, _full_manifest(manifest, members), members)


def read_bundle(path: str | os.PathLike, verify: bool = False) -> Bundle:
    """Open a bundle and check its manifest (and, with ``verify``, every member).

    Raises:
        NotFoundError: no such file.
        BundleError: not a bundle, damaged or truncated, unknown format version, a manifest of the
            wrong shape, members missing.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"bundle not found: {path}; create one with `galr-export`")
    with ContainerReader(path, error=BundleError, fix=REEXPORT_HINT) as reader:
        if MANIFEST not in reader.names():
            raise BundleError(f"{path}: no {MANIFEST}; this is not a galr bundle")
        manifest = reader.read_table(MANIFEST, MAX_MANIFEST_BYTES)
        validate_manifest(manifest, str(path))
        reader.check_table_hash(MANIFEST, manifest, MANIFEST_HASH_FIELD, required=False)
        missing = sorted(set(manifest["members"]) - reader.names())
    if missing:
        raise BundleError(f"{path}: members missing from the file: {missing[:5]}. {REEXPORT_HINT}")
    bundle = Bundle(path, manifest)
    if verify:
        bundle.verify()
    return bundle


def write_bundle(path: str | os.PathLike, manifest: Mapping[str, Any], members: Mapping[str, bytes]) -> Path:
    """Write a bundle atomically (temporary file in the same folder, fsync, rename).

    ``manifest`` gets ``format``, ``format_version`` and the ``members`` table filled in here. A
    crash or error leaves any previous file at ``path`` untouched.

    Raises:
        BundleError: the manifest does not match the schema (nothing is written).
    """
    path = Path(path)
    full = validate_manifest(_full_manifest(manifest, members), str(path))
    with ContainerWriter(path) as writer:
        for name, data in sorted(members.items()):
            writer.write_bytes(name, data)
        writer.write_table(MANIFEST, full, MANIFEST_HASH_FIELD)
    return path


def update_bundle(bundle: Bundle, manifest_changes: Mapping[str, Any], new_members: Mapping[str, bytes],
                  drop_members: Iterable[str] = ()) -> Bundle:
    """Rewrite ``bundle`` with extra members (e.g. engines) and manifest fields, atomically."""
    members = bundle.members(drop=drop_members)
    members.update(new_members)
    manifest = {**bundle.manifest, **manifest_changes}
    write_bundle(bundle.path, manifest, members)
    return read_bundle(bundle.path)


__all__ = ["Bundle", "build_bundle", "read_bundle", "update_bundle", "write_bundle"]
