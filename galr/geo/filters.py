"""Where and when: the filter a search can be restricted to (a lon/lat box and a date range)."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import numpy as np

from galr.errors import InputError


def parse_date(text: str, what: str = "date") -> np.datetime64:
    """``2024-05-01``, ``2024-05-01T10:30:00Z`` or TIFF's ``2024:05:01 10:30:00`` -> ``datetime64[s]`` (UTC).

    Raises:
        InputError: not a date in one of those forms.
    """
    value = str(text).strip()
    if len(value) >= 10 and value[4] == ":" and value[7] == ":":  # TIFFTAG_DATETIME
        value = value[:4] + "-" + value[5:7] + "-" + value[8:10] + value[10:].replace(" ", "T", 1)
    try:
        parsed = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"{what} {text!r} is not a date; use YYYY-MM-DD or an ISO time such as "
                         "2024-05-01T10:30:00Z") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    return np.datetime64(parsed, "s")


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """``"W,S,E,N"`` in degrees -> a checked tuple.

    Raises:
        InputError: not four numbers, outside [-180, 180] x [-90, 90], or south above north.
    """
    try:
        west, south, east, north = (float(part) for part in str(text).split(","))
    except ValueError:
        raise InputError(f"--bbox takes W,S,E,N in degrees (e.g. 14.9,44.9,15.1,45.1), got {text!r}") from None
    return PlaceFilter(bbox=(west, south, east, north)).bbox  # type: ignore[return-value]


@dataclass(frozen=True)
class PlaceFilter:
    """Restrict a search to tiles whose footprint meets a box and whose scene date is in a range.

    Attributes:
        bbox: ``(west, south, east, north)`` in WGS84 degrees; ``west > east`` crosses the antimeridian.
        since: earliest scene date (inclusive), ``datetime64``.
        until: latest scene date (inclusive; a bare date means the whole day).
    """

    bbox: tuple[float, float, float, float] | None = None
    since: np.datetime64 | None = None
    until: np.datetime64 | None = None

    def __post_init__(self) -> None:
        if self.bbox is not None:
            west, south, east, north = (float(v) for v in self.bbox)
            if not all(-180.0 <= v <= 180.0 for v in (west, east)) or not all(-90.0 <= v <= 90.0 for v in (south, north)):
                raise InputError(f"bbox {self.bbox} must lie in [-180, 180] x [-90, 90] degrees (W,S,E,N)")
            if south > north:
                raise InputError(f"bbox {self.bbox}: south ({south}) is above north ({north}); the order is W,S,E,N")
            object.__setattr__(self, "bbox", (west, south, east, north))
        if self.since is not None and self.until is not None and self.since > self.until:
            raise InputError(f"--since {self.since} is after --until {self.until}")

    @classmethod
    def from_text(cls, bbox: str | None = None, since: str | None = None, until: str | None = None) -> "PlaceFilter | None":
        """The filter of command-line text (``None`` when nothing is given)."""
        if not (bbox or since or until):
            return None
        end = None
        if until:
            end = parse_date(until, "--until")
            if len(until.strip()) == 10:  # a bare date: the whole day
                end = end + np.timedelta64(86_399, "s")
        return cls(parse_bbox(bbox) if bbox else None, parse_date(since, "--since") if since else None, end)

    def matches(self, bounds: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Which rows pass: ``bounds`` ``[n, 4]`` (west, south, east, north; NaN = unknown), ``times`` ``[n]`` datetime64[s] (NaT = unknown)."""
        keep = np.ones(len(bounds), dtype=bool)
        if self.bbox is not None:
            west, south, east, north = self.bbox
            with np.errstate(invalid="ignore"):
                lat_ok = (bounds[:, 1] <= north) & (bounds[:, 3] >= south)
                if west <= east:
                    lon_ok = (bounds[:, 0] <= east) & (bounds[:, 2] >= west)
                else:  # crosses the antimeridian: [west, 180] or [-180, east]
                    lon_ok = (bounds[:, 2] >= west) | (bounds[:, 0] <= east)
            keep &= lat_ok & lon_ok
        if self.since is not None:
            keep &= ~np.isnat(times) & (times >= self.since)
        if self.until is not None:
            keep &= ~np.isnat(times) & (times <= self.until)
        return keep

    def describe(self) -> str:
        parts = []
        if self.bbox is not None:
            parts.append("bbox " + ",".join(f"{v:g}" for v in self.bbox))
        if self.since is not None:
            parts.append(f"since {self.since}")
        if self.until is not None:
            parts.append(f"until {self.until}")
        return ", ".join(parts)


__all__ = ["PlaceFilter", "parse_bbox", "parse_date"]
