"""Index records: what is known about each indexed image, and the store that keeps them by key.

Every image in an index has a stable integer key (assigned when it is added, never reused) and a
unique string id (by default its path relative to the indexed folder). The searchers know keys;
people and files know ids. :class:`RecordStore` maps between them and keeps the records in gallery
order (the order images were added, which removals keep).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from galr.errors import InputError, NotFoundError


class UnknownIdError(NotFoundError, KeyError):
    """An image id or key that is not in the index (a ``KeyError`` too, as for any failed lookup)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


_RECORD_FIELDS = frozenset({"id", "path", "width", "height", "lat", "lon", "footprint", "extra"})
_REQUIRED_RECORD_FIELDS = frozenset({"id", "path", "width", "height"})


@dataclass(frozen=True)
class ImageRecord:
    """Metadata of one indexed image.

    Attributes:
        id: unique name of the image in the index (by default its path relative to the indexed folder).
        path: where the image file was when it was indexed.
        width: image width in pixels (0 when unknown).
        height: image height in pixels (0 when unknown).
        lat: latitude of the scene centre in degrees, if known.
        lon: longitude of the scene centre in degrees, if known.
        footprint: the scene outline as ``(lon, lat)`` pairs, if known.
        extra: anything else, as long as it is JSON (str keys; no NaN).
    """

    id: str
    path: str
    width: int
    height: int
    lat: float | None = None
    lon: float | None = None
    footprint: tuple[tuple[float, float], ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # Runs once per image (10^6 in a big gallery): the common case takes the fewest checks.
        if not isinstance(self.id, str) or not self.id:
            raise InputError(f"ImageRecord.id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.path, str):
            raise TypeError(f"ImageRecord {self.id!r}: path must be a string, got {type(self.path).__name__}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if type(value) is not int:
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    raise InputError(f"ImageRecord {self.id!r}: {name} must be a non-negative integer, got {value!r}")
                object.__setattr__(self, name, int(value))
            if value < 0:
                raise InputError(f"ImageRecord {self.id!r}: {name} must be a non-negative integer, got {value!r}")
        for name, limit in (("lat", 90.0), ("lon", 180.0)):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _coordinate(value, limit, f"ImageRecord {self.id!r}: {name}"))
        if self.footprint is not None:
            object.__setattr__(self, "footprint", _footprint(self.footprint, self.id))
        if not isinstance(self.extra, dict):
            raise TypeError(f"ImageRecord {self.id!r}: extra must be a dict with string keys")
        if self.extra:
            if not all(isinstance(key, str) for key in self.extra):
                raise TypeError(f"ImageRecord {self.id!r}: extra must be a dict with string keys")
            try:
                json.dumps(self.extra, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise InputError(f"ImageRecord {self.id!r}: extra is not JSON (str keys, no NaN): {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``footprint`` as a list of ``[lon, lat]`` lists)."""
        return {
            "id": self.id,
            "path": self.path,
            "width": self.width,
            "height": self.height,
            "lat": self.lat,
            "lon": self.lon,
            "footprint": [list(pair) for pair in self.footprint] if self.footprint is not None else None,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ImageRecord":
        """Inverse of :meth:`to_dict`; unknown keys are an error so a newer file is never half-read.

        Raises:
            ValueError: unknown or missing keys, or invalid values.
        """
        keys = values.keys()
        if not keys <= _RECORD_FIELDS:
            raise InputError(f"unknown ImageRecord fields {sorted(keys - _RECORD_FIELDS)}; is this index from a newer galr?")
        if not _REQUIRED_RECORD_FIELDS <= keys:
            raise InputError(f"ImageRecord lacks {sorted(_REQUIRED_RECORD_FIELDS - keys)}")
        if values.get("extra") is None:
            values = {**values, "extra": {}}
        return cls(**values)


def _coordinate(value: Any, limit: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or abs(number) > limit:
        raise InputError(f"{name} must be a finite number in [-{limit:g}, {limit:g}] degrees, got {value!r}")
    return number


def _footprint(points: Any, record_id: str) -> tuple[tuple[float, float], ...]:
    try:
        pairs = [tuple(point) for point in points]
    except TypeError:
        raise TypeError(f"ImageRecord {record_id!r}: footprint must be a list of (lon, lat) pairs") from None
    if any(len(pair) != 2 for pair in pairs):
        raise InputError(f"ImageRecord {record_id!r}: footprint must be a list of (lon, lat) pairs, got {points!r}")
    where = f"ImageRecord {record_id!r}: footprint"
    return tuple((_coordinate(lon, 180.0, f"{where} lon"), _coordinate(lat, 90.0, f"{where} lat")) for lon, lat in pairs)


def record_place(record: ImageRecord) -> tuple[tuple[float, float, float, float] | None, np.datetime64 | None]:
    """What place and date filters see of a record: ``(west, south, east, north)`` of its footprint (its
    centre when it has none; ``None`` when neither is known), and its ``extra["datetime"]`` (``None``
    when missing or unreadable: such a record never passes a date filter)."""
    from galr.geo.filters import parse_date

    box = None
    if record.footprint:
        lons, lats = zip(*record.footprint)
        box = (min(lons), min(lats), max(lons), max(lats))
    elif record.lat is not None and record.lon is not None:
        box = (record.lon, record.lat, record.lon, record.lat)
    stamp = record.extra.get("datetime") if record.extra else None
    try:
        return box, parse_date(stamp) if stamp else None
    except InputError:
        return box, None


class RecordStore:
    """Records by key and by id, in gallery order (in memory).

    Keys are assigned by the index; this store only checks that ids stay unique.
    """

    def __init__(self) -> None:
        self._by_key: dict[int, ImageRecord] = {}
        self._key_of: dict[str, int] = {}
        self._places: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._key_of

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self._by_key.values())

    def keys(self) -> list[int]:
        """Keys in gallery order."""
        return list(self._by_key)

    def ids(self) -> list[str]:
        """Ids in gallery order."""
        return [record.id for record in self._by_key.values()]

    def key_of(self, image_id: str) -> int:
        """The key of ``image_id``.

        Raises:
            UnknownIdError: no image with this id.
        """
        key = self._key_of.get(image_id)
        if key is None:
            raise UnknownIdError(f"no image with id {image_id!r} in the index ({len(self)} images)")
        return key

    def get(self, key: int) -> ImageRecord:
        """The record of ``key``.

        Raises:
            UnknownIdError: no image with this key.
        """
        record = self._by_key.get(int(key))
        if record is None:
            raise UnknownIdError(f"no image with key {key} in the index ({len(self)} images)")
        return record

    def put(self, key: int, record: ImageRecord) -> None:
        """Add ``record`` under a new ``key``, or replace the record of an existing key (same id)."""
        previous = self._by_key.get(key)
        if previous is not None and previous.id != record.id:
            del self._key_of[previous.id]
        elif previous is None and record.id in self._key_of:
            raise InputError(f"id {record.id!r} is already in the index")
        self._by_key[key] = record
        self._key_of[record.id] = key
        self._places = None

    def remove(self, keys: Iterable[int]) -> None:
        for key in keys:
            record = self._by_key.pop(int(key))
            del self._key_of[record.id]
        self._places = None

    def places(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(keys, bounds, times)`` in gallery order, for filters by place and date (built once per edit).

        ``bounds`` is ``[n, 4]`` west, south, east, north of each footprint (its centre when it has
        none; NaN when neither is known); ``times`` is ``datetime64[s]`` from ``extra["datetime"]``
        (NaT when unknown).
        """
        if self._places is None:
            count = len(self._by_key)
            keys = np.fromiter(self._by_key, dtype=np.int64, count=count)
            bounds = np.full((count, 4), np.nan)
            times = np.full(count, np.datetime64("NaT"), dtype="datetime64[s]")
            for row, record in enumerate(self._by_key.values()):
                box, stamp = record_place(record)
                if box is not None:
                    bounds[row] = box
                if stamp is not None:
                    times[row] = stamp
            self._places = (keys, bounds, times)
        return self._places

    @classmethod
    def from_records(cls, keys: Iterable[int], records: Iterable[ImageRecord]) -> "RecordStore":
        """A store of ``records`` under ``keys`` (same order).

        Raises:
            InputError: repeated ids or keys.
        """
        store = cls()
        for key, record in zip(keys, records):
            key = int(key)
            if key in store._by_key:
                raise InputError(f"key {key} occurs twice")
            if record.id in store._key_of:
                raise InputError(f"id {record.id!r} occurs twice")
            store._by_key[key] = record
            store._key_of[record.id] = key
        return store


__all__ = ["ImageRecord", "RecordStore", "UnknownIdError", "record_place"]
