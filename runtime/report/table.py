"""Search results as a plain-text table for the terminal."""

from __future__ import annotations

from typing import Sequence

from galr.console import printable
from galr.runtime.report import timings_text


def format_results(results: Sequence, mode: str) -> str:
    """One block per query: its text and timings, then rank, cosine, MR score and the hit.

    Everything that comes from users or files (queries, ids, captions) is printed through
    :func:`galr.console.printable`, so it can neither forge rows nor reach the terminal as escapes.
    """
    lines = []
    for number, result in enumerate(results, start=1):
        lines.append(f"\n[{number}] {printable(result.query)}   ({timings_text(result)})")
        lines.append(f"  {'rank':>4}  {'cosine':>7}  {'MR':>7}  {'image' if mode == 'text2image' else 'caption'}")
        for hit in result.hits:
            mr = f"{hit.rerank_score:7.3f}" if hit.rerank_score is not None else f"{'-':>7}"
            extra = ""
            if hit.record and hit.record.get("width"):
                extra = f"  {hit.record['width']}x{hit.record['height']}"
            lines.append(f"  {hit.rank:>4}  {hit.score:7.3f}  {mr}  {printable(hit.id)}{extra}")
    return "\n".join(lines)
