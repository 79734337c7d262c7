"""Records in SQLite: an index of millions of tiles opens in seconds and reads only the records it shows.

The table lives in a file beside the ``.gidx`` (SQLite cannot open a database inside a zip), named
after its content hash (``gallery.gidx.records-0123456789ab.sqlite``) and checked against the
index's header (size and SHA-256) before use, then opened read-only and immutable. Anyone can read
it with the ``sqlite3`` shell::

    sqlite3 gallery.gidx.records-0123456789ab.sqlite "select id, lat, lon from records limit 5"

Edits (``galr-index --update/--remove``) are kept in memory over the opened file and written as a
new database when the index is saved (a copy of the old one plus the changes, in one transaction);
the ``.gidx`` then names the new file, and files no longer named are removed. Each row keeps the
record's footprint bounds and acquisition time as columns, so place and date filters need no JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from galr.errors import InputError
from galr.runtime.index.records import ImageRecord, UnknownIdError, record_place

SCHEMA_VERSION = 1
_COLUMNS = "key, position, id, path_id, width, height, lat, lon, west, south, east, north, time, footprint, extra"
_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE paths (path_id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE);
CREATE TABLE records (
    key INTEGER PRIMARY KEY,          -- the index's stable key (what searchers return)
    position INTEGER NOT NULL,        -- gallery order
    id TEXT NOT NULL UNIQUE,          -- the image or tile id people use
    path_id INTEGER NOT NULL REFERENCES paths(path_id),
    width INTEGER NOT NULL, height INTEGER NOT NULL,
    lat REAL, lon REAL,               -- centre (WGS84 degrees)
    west REAL, south REAL, east REAL, north REAL,  -- footprint bounds
    time INTEGER,                     -- acquisition time, seconds since 1970 (UTC)
    footprint TEXT,                   -- JSON [[lon, lat], ...]
    extra TEXT                        -- JSON object
);
CREATE INDEX records_by_position ON records(position);
"""
_BATCH = 10_000


def _place_columns(record: ImageRecord) -> tuple[Any, ...]:
    box, stamp = record_place(record)
    seconds = None if stamp is None else int(stamp.astype("datetime64[s]").astype(np.int64))
    return (*(box or (None, None, None, None)), seconds)


def _row(key: int, position: int, record: ImageRecord, path_id: int) -> tuple[Any, ...]:
    return (key, position, record.id, path_id, record.width, record.height, record.lat, record.lon,
            *_place_columns(record), json.dumps(record.footprint) if record.footprint else None,
            json.dumps(record.extra, separators=(",", ":")) if record.extra else None)


def _record(row: tuple[Any, ...], path: str) -> ImageRecord:
    footprint = tuple(tuple(point) for point in json.loads(row[13])) if row[13] else None
    return ImageRecord(row[2], path, row[4], row[5], row[6], row[7], footprint, json.loads(row[14]) if row[14] else {})


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class SqliteRecordStore:
    """Records by key and by id in a SQLite file, with in-memory edits on top (see the module docstring).

    Same interface as :class:`~galr.runtime.index.records.RecordStore`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        self._base_count = int(self._db.execute("SELECT count(*) FROM records").fetchone()[0])
        self._paths: dict[int, str] = {}
        self._added: dict[int, ImageRecord] = {}  # new keys, in the order added
        self._replaced: dict[int, ImageRecord] = {}  # base keys with a new record
        self._removed: set[int] = set()  # base keys removed
        self._ids: dict[str, int] = {}  # ids of added and replaced records
        self._hidden_ids: set[str] = set()  # base ids no longer valid (removed, or replaced by another id)
        self._places: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def edited(self) -> bool:
        return bool(self._added or self._replaced or self._removed)

    def close(self) -> None:
        self._db.close()

    # -- reading -------------------------------------------------------------------------------
    def _path(self, path_id: int) -> str:
        path = self._paths.get(path_id)
        if path is None:
            path = self._db.execute("SELECT path FROM paths WHERE path_id = ?", (path_id,)).fetchone()[0]
            if len(self._paths) < 100_000:
                self._paths[path_id] = path
        return path

    def _base_row(self, key: int) -> tuple[Any, ...] | None:
        return self._db.execute(f"SELECT {_COLUMNS} FROM records WHERE key = ?", (key,)).fetchone()

    def __len__(self) -> int:
        return self._base_count - len(self._removed) + len(self._added)

    def __contains__(self, image_id: object) -> bool:
        if not isinstance(image_id, str):
            return False
        if image_id in self._ids:
            return True
        if image_id in self._hidden_ids:
            return False
        return self._db.execute("SELECT 1 FROM records WHERE id = ?", (image_id,)).fetchone() is not None

    def key_of(self, image_id: str) -> int:
        key = self._ids.get(image_id)
        if key is None and image_id not in self._hidden_ids:
            row = self._db.execute("SELECT key FROM records WHERE id = ?", (image_id,)).fetchone()
            key = None if row is None or row[0] in self._removed else int(row[0])
        if key is None:
            raise UnknownIdError(f"no image with id {image_id!r} in the index ({len(self)} images)")
        return key

    def get(self, key: int) -> ImageRecord:
        key = int(key)
        record = self._added.get(key) or self._replaced.get(key)
        if record is not None:
            return record
        row = None if key in self._removed else self._base_row(key)
        if row is None:
            raise UnknownIdError(f"no image with key {key} in the index ({len(self)} images)")
        return _record(row, self._path(row[3]))

    def _base_rows(self) -> Iterator[tuple[Any, ...]]:
        cursor = self._db.execute(f"SELECT {_COLUMNS} FROM records ORDER BY position")
        while True:
            rows = cursor.fetchmany(_BATCH)
            if not rows:
                return
            yield from rows

    def __iter__(self) -> Iterator[ImageRecord]:
        for row in self._base_rows():
            key = int(row[0])
            if key in self._removed:
                continue
            yield self._replaced.get(key) or _record(row, self._path(row[3]))
        yield from self._added.values()

    def keys(self) -> list[int]:
        base = [int(k) for (k,) in self._db.execute("SELECT key FROM records ORDER BY position")
                if int(k) not in self._removed]
        return base + list(self._added)

    def ids(self) -> list[str]:
        return [record.id for record in self]

    # -- editing (in memory until saved) -------------------------------------------------------
    def put(self, key: int, record: ImageRecord) -> None:
        key = int(key)
        self._places = None
        if key in self._added or key in self._replaced or (key not in self._removed and self._base_row(key)):
            previous = self.get(key)
            if previous.id != record.id:
                self._ids.pop(previous.id, None)
                self._hidden_ids.add(previous.id)
            target = self._added if key in self._added else self._replaced
            target[key] = record
        else:
            if record.id in self:
                raise InputError(f"id {record.id!r} is already in the index")
            self._added[key] = record
        self._ids[record.id] = key
        self._hidden_ids.discard(record.id)

    def remove(self, keys: Iterable[int]) -> None:
        self._places = None
        for key in (int(k) for k in keys):
            record = self.get(key)
            self._ids.pop(record.id, None)
            self._hidden_ids.add(record.id)
            if key in self._added:
                del self._added[key]
            else:
                self._replaced.pop(key, None)
                self._removed.add(key)

    def places(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(keys, bounds, times)`` in gallery order, read from the columns (see :meth:`RecordStore.places`)."""
        if self._places is None:
            keys, bounds, times = [], [], []
            cursor = self._db.execute("SELECT key, west, south, east, north, time FROM records ORDER BY position")
            while rows := cursor.fetchmany(100_000):
                block = np.array(rows, dtype=np.float64)
                keys.append(block[:, 0].astype(np.int64))
                bounds.append(block[:, 1:5])
                times.append(block[:, 5])
            key_array = np.concatenate(keys) if keys else np.zeros(0, np.int64)
            bound_array = np.concatenate(bounds) if bounds else np.zeros((0, 4))
            seconds = np.concatenate(times) if times else np.zeros(0)
            time_array = np.full(len(seconds), np.datetime64("NaT"), dtype="datetime64[s]")
            known = ~np.isnan(seconds)
            time_array[known] = seconds[known].astype(np.int64).astype("datetime64[s]")
            if self.edited:  # changed rows: drop the old, append the new (few, by construction)
                from galr.runtime.index.records import RecordStore

                changed = np.isin(key_array, list(self._removed | set(self._replaced)))
                overlay = RecordStore.from_records([*self._replaced, *self._added],
                                                   [*self._replaced.values(), *self._added.values()]).places()
                key_array = np.concatenate([key_array[~changed], overlay[0]])
                bound_array = np.concatenate([bound_array[~changed], overlay[1]])
                time_array = np.concatenate([time_array[~changed], overlay[2]])
            self._places = (key_array, bound_array, time_array)
        return self._places


def write_sqlite_records(records: Iterable[tuple[int, ImageRecord]], folder: Path, stem: str,
                         base: SqliteRecordStore | None = None) -> tuple[Path, str, int]:
    """Write records as a new SQLite file in ``folder``; returns ``(path, sha256, size)``.

    With ``base`` (its edits pending), the file starts as a copy of ``base``'s and only the changes
    are written; otherwise every record of ``records`` (key, record) is inserted, in order.
    The file is complete (fsync) before its final, content-addressed name is given.
    """
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{stem}.", suffix=".sqlite.tmp", dir=folder)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        if base is not None:
            shutil.copyfile(base.path, temporary_path)
        db = sqlite3.connect(temporary_path)
        try:
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("PRAGMA synchronous=OFF")
            if base is None:
                db.executescript(_SCHEMA)
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                _insert(db, ((key, record, position) for position, (key, record) in enumerate(records)))
            else:
                kept_positions = {int(k): int(p) for k, p in db.execute("SELECT key, position FROM records WHERE key IN "
                                                                       f"({','.join('?' * len(base._replaced))})",
                                                                       list(base._replaced))} if base._replaced else {}
                with db:
                    db.executemany("DELETE FROM records WHERE key = ?",
                                   [(k,) for k in [*base._removed, *base._replaced]])
                    start = int(db.execute("SELECT coalesce(max(position), -1) + 1 FROM records").fetchone()[0])
                # replaced records keep their place in the gallery order; added ones come after the rest
                _insert(db, [*((k, r, kept_positions[k]) for k, r in base._replaced.items()),
                             *((k, r, start + n) for n, (k, r) in enumerate(base._added.items()))])
            db.execute("INSERT OR REPLACE INTO meta VALUES ('count', (SELECT count(*) FROM records))")
            db.commit()
        finally:
            db.close()
        with open(temporary_path, "rb") as written:
            os.fsync(written.fileno())
        digest = file_sha256(temporary_path)
        final = folder / f"{stem}.records-{digest[:12]}.sqlite"
        os.replace(temporary_path, final)
        return final, digest, final.stat().st_size
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise


def _insert(db: sqlite3.Connection, rows: Iterable[tuple[int, ImageRecord, int]]) -> None:
    """Insert ``(key, record, position)`` rows in batches, adding each new path once."""
    path_ids = {path: path_id for path_id, path in db.execute("SELECT path_id, path FROM paths")}
    batch: list[tuple[Any, ...]] = []
    with db:
        for key, record, position in rows:
            path_id = path_ids.get(record.path)
            if path_id is None:
                path_id = path_ids[record.path] = len(path_ids) + 1
                db.execute("INSERT INTO paths VALUES (?, ?)", (path_id, record.path))
            batch.append(_row(int(key), position, record, path_id))
            if len(batch) == _BATCH:
                db.executemany(f"INSERT INTO records ({_COLUMNS}) VALUES ({', '.join('?' * 15)})", batch)
                batch.clear()
        if batch:
            db.executemany(f"INSERT INTO records ({_COLUMNS}) VALUES ({', '.join('?' * 15)})", batch)


__all__ = ["SCHEMA_VERSION", "SqliteRecordStore", "file_sha256", "write_sqlite_records"]
