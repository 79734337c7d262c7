"""The ``galr.plan`` bundle: one file a ground station copies, read without extracting to disk.

Layout (an uncompressed zip, so members can be memory-read and hashed cheaply)::

    manifest.json                 format, model config, vocabulary, preprocessing, DREA, I/O, hashes
    onnx/<precision>/<graph>.onnx four graphs per precision (fp32 always; fp16 / int8 when exported)
    engines/<key>/<graph>.plan    TensorRT engines, keyed by GPU, TensorRT version, precision, ONNX hash

Every member's SHA-256 is in the manifest; :func:`read_bundle` refuses a bundle whose format
version it does not know, whose members are missing or whose bytes do not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from galr.atomic import atomic_output

FORMAT_NAME = "galr-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")


class BundleError(ValueError):
    """A bundle is missing, corrupt, truncated, of an unknown version, or lacks what was asked."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def onnx_member(precision: str, graph: str) -> str:
    return f"onnx/{precision}/{graph}.onnx"


def engine_member(key: str, graph: str) -> str:
    return f"engines/{key}/{graph}.plan"


@dataclass
class Bundle:
    """An opened bundle: the manifest plus lazy, verified access to its members.

    Attributes:
        path: the bundle file.
        manifest: the parsed ``manifest.json``.
    """

    path: Path
    manifest: dict[str, Any]
    _cache: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def precisions(self) -> list[str]:
        return [p for p in PRECISIONS if p in self.manifest.get("onnx", {})]

    @property
    def model_hash(self) -> str:
        """Identity of the model: hash of the FP32 graphs (indexes refuse other models by it)."""
        return str(self.manifest["model_hash"])

    def read_member(self, name: str) -> bytes:
        """Bytes of one member, checked against the manifest's SHA-256."""
        if name in self._cache:
            return self._cache[name]
        expected = self.manifest["members"].get(name)
        if expected is None:
            raise BundleError(f"{self.path}: no member '{name}' in the manifest")
        try:
            with zipfile.ZipFile(self.path) as archive:
                data = archive.read(name)
        except KeyError:
            raise BundleError(f"{self.path}: member '{name}' is listed but missing; re-export the bundle") from None
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise BundleError(f"{self.path}: cannot read '{name}' ({exc}); the file is damaged, re-export it") from None
        if sha256_bytes(data) != expected["sha256"]:
            raise BundleError(f"{self.path}: member '{name}' fails its SHA-256 check; the file is corrupt, re-export it")
        self._cache[name] = data
        return data

    def onnx_bytes(self, graph: str, precision: str = "fp32") -> bytes:
        graphs = self.manifest.get("onnx", {}).get(precision)
        if graphs is None:
            raise BundleError(
                f"{self.path} has no {precision} graphs (it has {self.precisions}); "
                f"export them with `galr-export --{precision}`" if precision != "fp32" else f"{self.path} has no fp32 graphs"
            )
        if graph not in graphs:
            raise BundleError(f"{self.path}: no '{graph}' graph at {precision}")
        return self.read_member(graphs[graph])

    def engines(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("engines", []))

    def verify(self) -> None:
        """Check every member's hash now (reading is otherwise lazy)."""
        for name in self.manifest["members"]:
            self.read_member(name)


def _parse_manifest(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: manifest.json is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{path}: not a galr bundle (manifest format is {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {version} is not supported by this galr (reads {FORMAT_VERSION}); "
            "upgrade galr or re-export the bundle with this version"
        )
    for key in ("members", "onnx", "model", "vocab", "model_hash"):
        if key not in manifest:
            raise BundleError(f"{path}: manifest.json lacks '{key}'")
    return manifest


def read_bundle(path: str | os.PathLike, verify: bool = False) -> Bundle:
    """Open a bundle and check its manifest (and, with ``verify``, every member's hash).

    Raises:
        BundleError: missing file, not a zip (e.g. truncated), unknown format version, missing members.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"bundle not found: {path}; create one with `galr-export`")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if MANIFEST not in names:
                raise BundleError(f"{path}: no manifest.json; this is not a galr bundle")
            manifest = _parse_manifest(path, archive.read(MANIFEST))
    except zipfile.BadZipFile:
        raise BundleError(f"{path}: not a readable bundle (truncated or not a zip file); re-export or copy it again") from None
    missing = sorted(set(manifest["members"]) - names)
    if missing:
        raise BundleError(f"{path}: members missing from the file: {missing[:5]}; re-export the bundle")
    bundle = Bundle(path, manifest)
    if verify:
        bundle.verify()
    return bundle


def write_bundle(path: str | os.PathLike, manifest: Mapping[str, Any], members: Mapping[str, bytes]) -> Path:
    """Write a bundle atomically: a temporary file in the same folder, fsync, then rename.

    ``manifest`` gets ``format``, ``format_version`` and the ``members`` hash table filled in here.
    A crash or error leaves any previous file at ``path`` untouched.
    """
    path = Path(path)
    full = dict(manifest)
    full["format"], full["format_version"] = FORMAT_NAME, FORMAT_VERSION
    full["members"] = {name: {"sha256": sha256_bytes(data), "size": len(data)} for name, data in sorted(members.items())}
    with atomic_output(path) as handle:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(MANIFEST, json.dumps(full, indent=2, sort_keys=True))
            for name, data in sorted(members.items()):
                archive.writestr(name, data)
    return path


def update_bundle(bundle: Bundle, manifest_changes: Mapping[str, Any], new_members: Mapping[str, bytes],
                  drop_members: Iterable[str] = ()) -> Bundle:
    """Rewrite ``bundle`` with extra members (e.g. engines) and manifest fields, atomically."""
    drop = set(drop_members)
    members = {name: bundle.read_member(name) for name in bundle.manifest["members"] if name not in drop}
    members.update(new_members)
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("members",)}
    manifest.update(manifest_changes)
    write_bundle(bundle.path, manifest, members)
    return read_bundle(bundle.path)

