"""Checked zip containers: the storage under ``galr.plan`` bundles and ``.gidx`` indexes.

A container is an uncompressed zip whose JSON table of contents (the bundle's ``manifest.json``,
the index's ``header.json``) records the SHA-256 and size of every other member. This module owns
the rules both formats share:

* **Writing** (:class:`ContainerWriter`) goes through the one atomic writer: a temporary file in
  the destination folder, fsync, rename. Members are stored (never compressed) and hashed while
  they are written, so a large array is streamed, not held twice.
* **Reading** (:class:`ContainerReader`) trusts nothing in the file: a member must be stored, its
  size in the zip directory must equal the size the table declares (checked *before* anything is
  inflated or read), and its bytes must hash to the declared SHA-256. The table itself is size-capped
  and carries a hash of its own content (:func:`table_sha256`), so a damaged table is refused too,
  not read as other values. ``.npy`` headers are checked against the expected dtype and shape before
  an array is allocated. Every way ``zipfile`` fails on a damaged file (bad offsets, an unknown
  compression method, the encrypted flag, a truncated stream) comes out as the caller's error class
  with the caller's fix.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
import tokenize
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

import numpy as np
from numpy.lib import format as npy_format

from galr.atomic import atomic_output
from galr.errors import InputError

#: What ``zipfile`` raises on damaged archives (offsets, headers, methods, flags, streams).
ZIP_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError, RuntimeError,
    ValueError, OverflowError, struct.error, zlib.error, KeyError, UnicodeDecodeError,
)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_ENCRYPTED_FLAG = 0x1

#: Where an array member's data starts in the file: a multiple of this many bytes. A memory map of
#: a misaligned float32 array is not "aligned" to numpy, which then multiplies it without BLAS
#: (about x5 slower for an exact search of a mapped index).
ARRAY_ALIGNMENT = 64
#: The zip extra field that pads a local header to an alignment (the ID Android's zipalign uses).
_PADDING_EXTRA_ID = 0xD935


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def table_sha256(table: Mapping[str, Any], field: str) -> str:
    """SHA-256 of a table of contents without its own ``field``, over canonical JSON (sorted keys,
    no whitespace): what the table's self-check stores and compares."""
    content = {key: value for key, value in table.items() if key != field}
    return sha256_bytes(json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                   allow_nan=False).encode("utf-8"))


def check_member_entry(name: str, entry: Any) -> str | None:
    """Why a table-of-contents entry is malformed (``None`` when it is ``{"sha256", "size"}``)."""
    if not isinstance(entry, Mapping):
        return f"member {name!r}: entry is a {type(entry).__name__}, not an object"
    unknown = sorted(set(entry) - {"sha256", "size"})
    if unknown:
        return f"member {name!r}: unknown fields {unknown}"
    if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
        return f"member {name!r}: sha256 must be 64 lowercase hex digits"
    size = entry.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        return f"member {name!r}: size must be a non-negative integer"
    return None


class _HashingReader:
    """A read-only stream that hashes and counts what passes through it, refusing to go past ``limit``."""

    def __init__(self, source: BinaryIO, limit: int) -> None:
        self._source, self._limit = source, limit
        self.sha256, self.size = hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        remaining = self._limit - self.size
        want = remaining + 1 if size is None or size < 0 else min(size, remaining + 1)
        data = self._source.read(want)
        self.size += len(data)
        if self.size > self._limit:
            raise InputError(f"more than the declared {self._limit} bytes")
        self.sha256.update(data)
        return data

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` in chunks (a large array is never held twice)."""
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            data = self.read(min(1 << 24, len(view) - filled))
            if not data:
                break
            view[filled:filled + len(data)] = data
            filled += len(data)
        return filled

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class _HashingWriter:
    """A write-only stream that hashes and counts what passes through it."""

    def __init__(self, target: BinaryIO) -> None:
        self._target, self.sha256, self.size = target, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._target.write(data)


class ContainerReader:
    """An open container; every read is checked (see the module docstring).

    Args:
        path: the file.
        error: the error class raised for anything wrong with the file (an :class:`InputError`).
        fix: what the user should do about a damaged file, appended to messages
            (e.g. ``"re-export it with galr-export"``).
        map_arrays: :meth:`read_array` returns read-only memory maps of stored (uncompressed) members
            instead of copies, so processes opening the same file share its pages.

    Raises:
        error: the file is not a readable zip.
    """

    def __init__(self, path: str | Path, *, error: type[InputError], fix: str, map_arrays: bool = False) -> None:
        self.path, self._error, self._fix, self._map_arrays = Path(path), error, fix, map_arrays
        try:
            self._zip = zipfile.ZipFile(self.path)
            self._infos = {info.filename: info for info in self._zip.infolist()}
        except ZIP_ERRORS as exc:
            raise self.damaged(f"not a readable zip archive ({_describe(exc)})") from None

    def __enter__(self) -> "ContainerReader":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    def damaged(self, what: str) -> InputError:
        """The caller's error for a damaged file, with its fix."""
        return self._error(f"{self.path}: {what}; the file is damaged or was not copied completely. {self._fix}")

    def names(self) -> set[str]:
        return set(self._infos)

    def _checked_info(self, name: str, declared_size: int | None) -> zipfile.ZipInfo:
        info = self._infos.get(name)
        if info is None:
            raise self.damaged(f"member {name!r} is missing")
        if info.flag_bits & _ENCRYPTED_FLAG:
            raise self.damaged(f"member {name!r} is marked encrypted")
        if info.compress_type != zipfile.ZIP_STORED:
            raise self.damaged(f"member {name!r} is compressed (method {info.compress_type}); the format stores "
                               "members uncompressed")
        if declared_size is not None and info.file_size != declared_size:
            raise self.damaged(f"member {name!r} is {info.file_size} bytes, the table says {declared_size}")
        return info

    def read_table(self, name: str, max_bytes: int) -> Any:
        """Parse the JSON table of contents (at most ``max_bytes``); the caller checks its format and
        version, then its self-hash (:meth:`check_table_hash`), then its shape."""
        info = self._checked_info(name, None)
        if info.file_size > max_bytes:
            raise self.damaged(f"{name} is implausibly large ({info.file_size} bytes, at most {max_bytes})")
        try:
            with self._zip.open(info) as member:
                raw = member.read(max_bytes + 1)
        except ZIP_ERRORS as exc:
            raise self.damaged(f"{name} cannot be read ({_describe(exc)})") from None
        if len(raw) != info.file_size:
            raise self.damaged(f"{name} is truncated")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise self.damaged(f"{name} is not valid JSON ({_describe(exc)})") from None

    def check_table_hash(self, name: str, table: Mapping[str, Any], hash_field: str, *, required: bool) -> None:
        """Refuse a table whose ``hash_field`` is not :func:`table_sha256` of the rest of it.

        ``required=False`` accepts a table without the field (files of an older format version).
        """
        if hash_field not in table and not required:
            return
        stored = table.get(hash_field)
        try:
            intact = isinstance(stored, str) and stored == table_sha256(table, hash_field)
        except (TypeError, ValueError):  # e.g. a NaN the canonical form refuses
            intact = False
        if not intact:
            raise self.damaged(f"{name} fails its own SHA-256 check ({hash_field})")

    @contextmanager
    def open_member(self, name: str, entry: Mapping[str, Any]) -> Iterator[BinaryIO]:
        """A stream of a member's bytes; on leaving, the rest is read and the SHA-256 checked.

        ``entry`` is the table's ``{"sha256", "size"}`` for the member (checked with
        :func:`check_member_entry` by the caller). Parse errors inside the block (``ValueError``)
        and zip errors become the caller's error class.
        """
        size = int(entry["size"])
        info = self._checked_info(name, size)
        try:
            with self._zip.open(info) as member:
                reader = _HashingReader(member, size)
                yield reader  # type: ignore[misc]
                reader.drain()
        except InputError:
            raise
        except ZIP_ERRORS as exc:
            raise self.damaged(f"member {name!r} cannot be read ({_describe(exc)})") from None
        if reader.size != size or reader.sha256.hexdigest() != entry["sha256"]:
            raise self.damaged(f"member {name!r} fails its SHA-256 check")

    def read_member(self, name: str, entry: Mapping[str, Any]) -> bytes:
        """A whole member's bytes, checked as :meth:`open_member` does."""
        with self.open_member(name, entry) as stream:
            return stream.read()

    def read_array(self, name: str, entry: Mapping[str, Any], dtype: Any, shape: tuple[int, ...],
                   mapped: bool | None = None) -> np.ndarray:
        """A checked ``.npy`` member that must hold ``dtype`` and ``shape``.

        The ``.npy`` header is checked against both, and against the member's size, before any array
        is allocated: a damaged header declaring terabytes is refused, not attempted. Object arrays
        (pickles) are never loaded. ``mapped`` (default: the reader's ``map_arrays``) returns a
        read-only memory map of a stored member instead of a copy.
        """
        expected = np.dtype(dtype)
        with self.open_member(name, entry) as stream:
            try:
                version = npy_format.read_magic(stream)
                header = (npy_format.read_array_header_1_0 if version == (1, 0) else
                          npy_format.read_array_header_2_0)(stream)
            except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError, tokenize.TokenError) as exc:
                raise self.damaged(f"member {name!r} has no valid .npy header ({_describe(exc)})") from None
            found_shape, fortran, found_dtype = header
            if found_dtype != expected or tuple(found_shape) != tuple(shape) or fortran:
                raise self.damaged(f"member {name!r} holds {found_dtype} {tuple(found_shape)}, expected {expected} "
                                   f"{tuple(shape)}")
            nbytes = expected.itemsize * int(np.prod(shape))
            wanted = self._map_arrays if mapped is None else mapped
            data_offset = self._stored_data_offset(name) if wanted and nbytes else None
            array = None if data_offset is not None else np.empty(shape, dtype=expected)
            header_bytes = stream.size  # the stream still reads and hashes the whole member on leaving
            if array is not None:
                view = memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")
                if stream.readinto(view) != len(view):
                    raise self.damaged(f"member {name!r} is shorter than its array")
        if array is None:
            if int(entry["size"]) - header_bytes < nbytes:
                raise self.damaged(f"member {name!r} is shorter than its array")
            return np.memmap(self.path, dtype=expected, mode="r", offset=data_offset + header_bytes, shape=tuple(shape))
        return array

    def _stored_data_offset(self, name: str) -> int | None:
        """Where a stored (uncompressed) member's bytes start in the file; ``None`` for compressed ones."""
        info = self._infos.get(name)
        if info is None or info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(self.path, "rb") as handle:
            handle.seek(info.header_offset)
            local = handle.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            return None
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        return info.header_offset + 30 + name_length + extra_length

    def read_json_member(self, name: str, entry: Mapping[str, Any]) -> Any:
        """A checked member parsed as UTF-8 JSON."""
        data = self.read_member(name, entry)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise self.damaged(f"member {name!r} is not valid JSON ({_describe(exc)})") from None


class ContainerWriter:
    """Write a container atomically; :attr:`entries` collects the table of contents.

    Use as a context manager: the file replaces ``path`` only when the block ends without an error.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        self._output: Any = None
        self._handle: BinaryIO | None = None
        self._zip: zipfile.ZipFile | None = None

    def __enter__(self) -> "ContainerWriter":
        self._output = atomic_output(self.path)
        self._handle = self._output.__enter__()
        self._zip = zipfile.ZipFile(self._handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> bool | None:
        try:
            self._zip.close()
        except Exception:
            if exc_type is None:
                raise
            # Already failing: the temporary file is discarded below; keep the original error.
        return self._output.__exit__(exc_type, exc, traceback)

    @contextmanager
    def open(self, name: str, align: int = 1) -> Iterator[BinaryIO]:
        """Stream one member; its hash and size land in :attr:`entries`.

        ``align``: the member's first byte lands on a multiple of this in the file (its local
        header is padded with an extra field that zip readers skip).
        """
        with self._zip.open(self._aligned_info(name, align), "w", force_zip64=True) as member:
            writer = _HashingWriter(member)
            yield writer  # type: ignore[misc]
        self.entries[name] = {"sha256": writer.sha256.hexdigest(), "size": writer.size}

    def _aligned_info(self, name: str, align: int) -> zipfile.ZipInfo:
        """A stored member's zip entry whose data will start on a multiple of ``align``."""
        info = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
        info.compress_type = zipfile.ZIP_STORED
        info.CRC = info.compress_size = 0  # placeholders (zipfile rewrites both), so the header can be sized
        if align > 1:
            data_start = self._handle.tell() + len(info.FileHeader(zip64=True))
            padding = -data_start % align
            if padding:
                padding += align if padding < 4 else 0  # an extra field is at least its 4-byte heading
                info.extra = struct.pack("<HH", _PADDING_EXTRA_ID, padding - 4) + bytes(padding - 4)
        return info

    def write_bytes(self, name: str, data: bytes) -> dict[str, Any]:
        """Store a member given as bytes; returns its table entry."""
        self._zip.writestr(name, data)
        self.entries[name] = {"sha256": sha256_bytes(data), "size": len(data)}
        return self.entries[name]

    def write_array(self, name: str, array: np.ndarray) -> dict[str, Any]:
        """Store an array as ``.npy`` (streamed, never pickled); returns its table entry."""
        # The .npy header pads itself to a multiple of 64 bytes, so aligned member = aligned data.
        with self.open(name, align=ARRAY_ALIGNMENT) as stream:
            npy_format.write_array(stream, np.ascontiguousarray(array), allow_pickle=False)
        return self.entries[name]

    def write_json(self, name: str, payload: Any) -> dict[str, Any]:
        """Store ``payload`` as a member of compact UTF-8 JSON (only then does json run its C encoder)."""
        return self.write_bytes(name, _json_bytes(payload, indent=None))

    def write_table(self, name: str, table: Mapping[str, Any], hash_field: str) -> None:
        """Store the table of contents (readable JSON, not listed in itself) with its self-hash in
        ``hash_field``; call it last, once :attr:`entries` lists every other member."""
        full = {**table, hash_field: table_sha256(table, hash_field)}
        self._zip.writestr(name, _json_bytes(full, indent=1))


def _json_bytes(payload: Any, indent: int | None) -> bytes:
    return json.dumps(payload, indent=indent, separators=None if indent else (",", ":"), ensure_ascii=False,
                      allow_nan=False, sort_keys=bool(indent)).encode("utf-8")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


__all__ = [
    "ARRAY_ALIGNMENT",
    "ZIP_ERRORS",
    "ContainerReader",
    "ContainerWriter",
    "check_member_entry",
    "sha256_bytes",
    "table_sha256",
]
