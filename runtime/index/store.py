"""The ``.gidx`` file: a gallery index in one checked container (:mod:`galr.container`).

Version 2 layout::

    header.json        format + version, model_hash, embed_dim, counts, next_key, timestamps, galr
                       version, the bundle that built it, each searcher's kind, storage and
                       parameters, the SHA-256 and size of every other member, and its own hash
    records.json       [{"id", "path", "width", "height", "lat", "lon", "footprint", "extra"}, ...]
                       in gallery order (the order of images/keys.npy); or, for large indexes, a
                       SQLite file beside the index named (and SHA-256 checked) by the header's
                       ``records`` entry (:mod:`~galr.runtime.index.records_sqlite`)
    text_bank.json     ["caption", ...] in the text bank's key order
    images/...         the image searcher's members (exact: keys.npy, vectors.npy)
    text_bank/...      the text bank searcher's members

Version 1 files (one ``embeddings.npy`` and ``text_bank.npy``, keys implied by position) are read
too; saving writes version 2.

Writing goes through the one atomic writer, so a crash or an error while saving leaves the previous
index intact. :func:`load_index` refuses unknown format versions, damaged or truncated files,
members that fail their size or SHA-256 check, headers of the wrong shape, and (given the encoders'
``model_hash``) an index built by another model, whose embeddings would be meaningless to that
model's text encoder. ``.npy`` members are never unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from galr import __version__ as GALR_VERSION
from galr.container import ContainerReader, ContainerWriter, check_member_entry
from galr.errors import InputError, NotFoundError
from galr.runtime.index.gallery import GalleryIndex, IndexModelMismatchError
from galr.runtime.index.records import ImageRecord, RecordStore
from galr.runtime.index.searchers import Searcher, searcher_class
from galr.runtime.index.searchers.exact import ExactSearcher
from galr.runtime.index.vectors import STORAGE_DTYPES

FORMAT_NAME = "galr-index"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
HEADER = "header.json"
HEADER_HASH_FIELD = "header_sha256"
RECORDS = "records.json"
TEXT_BANK_TEXTS = "text_bank.json"
IMAGES_PREFIX, TEXT_BANK_PREFIX = "images/", "text_bank/"
_V1_EMBEDDINGS, _V1_TEXT_BANK = "embeddings.npy", "text_bank.npy"
MAX_HEADER_BYTES = 1 << 24
REBUILD_HINT = "galr-index IMAGES --engine <bundle> -o {path}"


class IndexFormatError(InputError):
    """An index file is missing, damaged, truncated, of an unknown version or lacks a member."""


def _fix(path: Path) -> str:
    return f"Copy it again or rebuild it with `{REBUILD_HINT.format(path=path)}`"


# ---------------------------------------------------------------------------------------------
# Writing


def _searcher_entry(searcher: Searcher, params: Mapping[str, Any]) -> dict[str, Any]:
    return {"kind": searcher.kind, "storage": searcher.storage, "count": len(searcher), "params": dict(params)}


#: ``records="auto"`` keeps records in SQLite beyond this many images (and once they are there).
SQLITE_RECORDS_FROM = 100_000
RECORD_STORES = ("auto", "json", "sqlite")


def _records_kind(index: GalleryIndex, records: str) -> str:
    if records not in RECORD_STORES:
        raise InputError(f"records must be one of {list(RECORD_STORES)}, got {records!r}")
    if records != "auto":
        return records
    from galr.runtime.index.records_sqlite import SqliteRecordStore

    sqlite = isinstance(index.record_store, SqliteRecordStore) or len(index) > SQLITE_RECORDS_FROM
    return "sqlite" if sqlite else "json"


def _sqlite_siblings(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.records-*.sqlite"))


def save_index(index: GalleryIndex, path: Path, records: str = "auto") -> Path:
    """Write ``index`` to ``path`` atomically (format version 2).

    Args:
        index: the index.
        path: the ``.gidx`` file.
        records: ``"json"`` (a member of the file), ``"sqlite"`` (a checked SQLite file beside it,
            :mod:`~galr.runtime.index.records_sqlite`), or ``"auto"`` (SQLite past
            :data:`SQLITE_RECORDS_FROM` images or when the index already uses it).
    """
    kind = _records_kind(index, records)
    sqlite_entry = _write_sqlite(index, path) if kind == "sqlite" else None
    with ContainerWriter(path) as writer:
        images = _searcher_entry(index.images, index.images.save(writer, IMAGES_PREFIX))
        text_bank = _searcher_entry(index.text_bank, index.text_bank.save(writer, TEXT_BANK_PREFIX))
        if sqlite_entry is None:
            writer.write_json(RECORDS, [record.to_dict() for record in index.records])
        writer.write_json(TEXT_BANK_TEXTS, index.text_bank_texts)
        header = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model_hash": index.model_hash,
            "embed_dim": index.embed_dim, "storage": index.storage, "count": len(index),
            "text_bank_count": len(index.text_bank_texts), "next_key": index.next_key,
            "built_with": index.built_with, "image_root": index.image_root, "galr_version": index.galr_version,
            "created": index.created, "updated": index.updated, "searchers": {"images": images, "text_bank": text_bank},
            "members": writer.entries,
        }
        if sqlite_entry is not None:
            header["records"] = sqlite_entry
        writer.write_table(HEADER, header, HEADER_HASH_FIELD)  # the one member people read
    named = path.parent / sqlite_entry["file"] if sqlite_entry is not None else None
    for sibling in _sqlite_siblings(path):  # only the new file is named by the index now
        if sibling != named:
            sibling.unlink(missing_ok=True)
    return path


def _write_sqlite(index: GalleryIndex, path: Path) -> dict[str, Any]:
    from galr.runtime.index.records_sqlite import SqliteRecordStore, file_sha256, write_sqlite_records

    store = index.record_store
    if isinstance(store, SqliteRecordStore) and not store.edited and store.path.parent == path.parent \
            and store.path.name.startswith(f"{path.name}.records-"):
        file, digest, size = store.path, file_sha256(store.path), store.path.stat().st_size  # unchanged: reuse
    else:
        base = store if isinstance(store, SqliteRecordStore) else None
        pairs = zip(store.keys(), store) if base is None else ()
        file, digest, size = write_sqlite_records(pairs, path.parent, path.name, base=base)
    return {"kind": "sqlite", "file": file.name, "sha256": digest, "size": size, "count": len(index)}


# ---------------------------------------------------------------------------------------------
# Reading


def _is_count(value: Any, minimum: int = 0) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


def _checked_header(reader: ContainerReader, path: Path) -> dict[str, Any]:
    if HEADER not in reader.names():
        raise IndexFormatError(f"{path}: no {HEADER}; this is not a galr index (build one with "
                               f"`{REBUILD_HINT.format(path=path)}`)")
    header = reader.read_table(HEADER, MAX_HEADER_BYTES)
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise IndexFormatError(f"{path}: not a galr index ({HEADER} says format {found!r})")
    version = header.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise IndexFormatError(
            f"{path}: index format version {version!r} is not supported by this galr {GALR_VERSION} "
            f"(it reads versions {list(READABLE_VERSIONS)}); upgrade galr, or rebuild the index with this one: "
            f"`{REBUILD_HINT.format(path=path)}`")
    reader.check_table_hash(HEADER, header, HEADER_HASH_FIELD, required=version >= 2)
    problems = []
    if not isinstance(header.get("model_hash"), str) or not header["model_hash"]:
        problems.append("model_hash must be a non-empty string")
    if not _is_count(header.get("embed_dim"), 1):
        problems.append("embed_dim must be a positive integer")
    for key in ("count", "text_bank_count"):
        if not _is_count(header.get(key)):
            problems.append(f"{key} must be a non-negative integer")
    if header.get("storage") not in STORAGE_DTYPES:
        problems.append(f"storage must be one of {sorted(STORAGE_DTYPES)}")
    members = header.get("members")
    if not isinstance(members, dict):
        problems.append("members must be an object")
    else:
        problems += [problem for name, entry in members.items() if (problem := check_member_entry(name, entry))]
    if problems:
        raise reader.damaged(f"{HEADER} is malformed: {'; '.join(problems[:6])}")
    return header


def _searcher_spec(reader: ContainerReader, header: Mapping[str, Any], role: str, count_key: str) -> dict[str, Any]:
    spec = (header.get("searchers") or {}).get(role) if isinstance(header.get("searchers"), dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str) or spec.get("storage") not in STORAGE_DTYPES \
            or spec.get("count") != header[count_key] or not isinstance(spec.get("params", {}), dict):
        raise reader.damaged(f"{HEADER} has no valid '{role}' searcher entry")
    return spec


def _load_searcher(reader: ContainerReader, header: Mapping[str, Any], role: str, prefix: str,
                   count_key: str) -> Searcher:
    members, dim = header["members"], int(header["embed_dim"])
    if header["format_version"] == 1:
        name = _V1_EMBEDDINGS if role == "images" else _V1_TEXT_BANK
        count = int(header[count_key])
        if name not in members:
            raise reader.damaged(f"member {name!r} is missing")
        searcher = ExactSearcher(dim, header["storage"])
        vectors = reader.read_array(name, members[name], STORAGE_DTYPES[header["storage"]], (count, dim))
        searcher.load_arrays(np.arange(count, dtype=np.int64), vectors)
        return searcher
    spec = _searcher_spec(reader, header, role, count_key)
    kind = searcher_class(spec["kind"])
    try:
        return kind.load(reader, _PrefixedEntries(reader, members), prefix, dim=dim, storage=spec["storage"],
                         count=int(spec["count"]), params=spec.get("params", {}))
    except (KeyError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise reader.damaged(f"the {role} searcher cannot be read ({exc})") from None


class _PrefixedEntries(dict):
    """The header's member table; a missing member is reported as damage, not a ``KeyError``."""

    def __init__(self, reader: ContainerReader, members: Mapping[str, Any]) -> None:
        super().__init__(members)
        self._reader = reader

    def __missing__(self, name: str) -> Any:
        raise self._reader.damaged(f"member {name!r} is missing")


def _sqlite_records(reader: ContainerReader, header: Mapping[str, Any]) -> Any:
    from galr.runtime.index.records_sqlite import SqliteRecordStore, file_sha256

    entry = header["records"]
    if not isinstance(entry, dict) or entry.get("kind") != "sqlite" or not isinstance(entry.get("file"), str) \
            or "/" in entry["file"] or not _is_count(entry.get("size")) or entry.get("count") != header["count"]:
        raise reader.damaged(f"{HEADER} has no valid 'records' entry")
    file = reader.path.parent / entry["file"]
    if not file.is_file():
        raise IndexFormatError(f"{reader.path}: its records file {file.name} is missing (copy it along with the "
                               f"index: the two travel together). {_fix(reader.path)}")
    if file.stat().st_size != entry["size"] or file_sha256(file) != entry["sha256"]:
        raise IndexFormatError(f"{reader.path}: its records file {file.name} fails its size or SHA-256 check. "
                               f"{_fix(reader.path)}")
    import sqlite3

    try:
        store = SqliteRecordStore(file)
    except sqlite3.Error as exc:
        raise IndexFormatError(f"{file}: not a readable records database ({exc}). {_fix(reader.path)}") from None
    if len(store) != header["count"]:
        store.close()
        raise reader.damaged(f"the records file holds {len(store)} records, the header says {header['count']}")
    return store


def _records(reader: ContainerReader, header: Mapping[str, Any], keys: np.ndarray) -> Any:
    if "records" in header:
        return _sqlite_records(reader, header)
    entry = header["members"].get(RECORDS)
    if entry is None:
        raise reader.damaged(f"member {RECORDS!r} is missing")
    payload = reader.read_json_member(RECORDS, entry)
    if not isinstance(payload, list) or len(payload) != header["count"]:
        raise reader.damaged(f"{RECORDS} should list {header['count']} records")
    try:
        records = []
        for item in payload:
            if not isinstance(item, dict):
                raise TypeError(f"a record is a {type(item).__name__}, not an object")
            records.append(ImageRecord.from_dict(item))
        return RecordStore.from_records(keys.tolist(), records)
    except (TypeError, ValueError) as exc:
        raise IndexFormatError(f"{reader.path}: {RECORDS} has an invalid record ({exc}). {_fix(reader.path)}") from None


def _texts(reader: ContainerReader, header: Mapping[str, Any]) -> list[str]:
    entry = header["members"].get(TEXT_BANK_TEXTS)
    if entry is None:
        raise reader.damaged(f"member {TEXT_BANK_TEXTS!r} is missing")
    texts = reader.read_json_member(TEXT_BANK_TEXTS, entry)
    if not isinstance(texts, list) or len(texts) != header["text_bank_count"] or \
            not all(isinstance(t, str) for t in texts):
        raise reader.damaged(f"{TEXT_BANK_TEXTS} should list {header['text_bank_count']} strings")
    return texts


def load_index(path: str | os.PathLike, expected_model_hash: str | None = None, *, mapped: bool = False
               ) -> GalleryIndex:
    """Read a ``.gidx`` file, checking its format version, header and every member it reads.

    Args:
        path: the index file.
        expected_model_hash: ``encoders.model_hash`` of the encoders that will search it; an index
            built by another model is refused. ``None`` skips the check (e.g. to only remove images).
        mapped: memory-map the exact searchers' vectors from the file instead of copying them
            (read-only pages shared by every process that maps the same file: service replicas).
            Edits copy them first; every member is still hash-checked.

    Raises:
        NotFoundError: no such file.
        IndexFormatError: not an index, unknown format version, truncated or corrupt file, a missing
            member or one that fails its checks (the message says what to do).
        IndexModelMismatchError: built by another model than ``expected_model_hash``.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"index not found: {path}; build it with `{REBUILD_HINT.format(path=path)}`")
    with ContainerReader(path, error=IndexFormatError, fix=_fix(path), map_arrays=mapped) as reader:
        header = _checked_header(reader, path)
        if expected_model_hash is not None and header["model_hash"] != expected_model_hash:
            raise IndexModelMismatchError(
                f"{path} was built with model {header['model_hash'][:16]} "
                f"(bundle {header.get('built_with') or 'unknown'}), but these encoders run model "
                f"{expected_model_hash[:16]}; its embeddings cannot be compared. "
                f"Rebuild the index with this bundle: `{REBUILD_HINT.format(path=path)}`")
        images = _load_searcher(reader, header, "images", IMAGES_PREFIX, "count")
        text_bank = _load_searcher(reader, header, "text_bank", TEXT_BANK_PREFIX, "text_bank_count")
        records = _records(reader, header, np.asarray(images.keys))
        texts = _texts(reader, header)
    return GalleryIndex.from_parts(header, records, images, text_bank, texts)


__all__ = ["FORMAT_VERSION", "RECORD_STORES", "SQLITE_RECORDS_FROM", "IndexFormatError", "load_index", "save_index"]
