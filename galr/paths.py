"""Default file locations shared by the command-line tools (relative to the working directory).

``galr-demo`` writes the demo model and benchmark here, so that ``galr-export --fp16`` and
``galr-run query.txt --engine galr.plan`` work with no other argument.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path("galr-demo")
DEFAULT_BENCHMARK = DEMO_DIR / "benchmark"
DEFAULT_CHECKPOINT = DEMO_DIR / "model.pt"
DEFAULT_BUNDLE = Path("galr.plan")
DEFAULT_INDEX = Path("gallery.gidx")
DEFAULT_QUERIES = Path("query.txt")
