"""Output formats of search results: a terminal table (:mod:`.table`) and a self-contained HTML
contact sheet (:mod:`.html`). JSON is :meth:`QueryResult.to_dict` as it is. A new format is a new
module here, called from :mod:`galr.runtime.cli.run`.
"""

from __future__ import annotations

from typing import Any


def timings_text(result: Any, separator: str = ", ") -> str:
    """Where a query's time went, e.g. ``encode 1.2 ms, search 0.40 ms, rerank 0.31 ms``."""
    timings = result.timings_ms
    parts = [f"encode {timings.get('encode', 0):.1f} ms", f"search {timings.get('search', 0):.2f} ms"]
    if result.reranked:
        parts.append(f"rerank {timings.get('rerank', 0):.2f} ms")
    return separator.join(parts)
