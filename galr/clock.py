"""The one timestamp format galr writes into its files (bundles, indexes, benchmark results)."""

from __future__ import annotations

from datetime import datetime, timezone


def utc_now() -> str:
    """Now in UTC, ISO 8601 to the second (e.g. ``2026-12-06T01:33:06+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


__all__ = ["utc_now"]
