"""The house rules, checked on the source: each layer imports only its own layer or lower ones.

Every ``import`` in every module counts, also those inside functions (the lazy ones). The layers,
lowest first, are those of docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Source folder -> the import name it installs as (pyproject's package-dir).
ROOTS = {"galr": "galr", "runtime": "galr.runtime", "export": "galr.export", "calibration": "galr.calibration",
         "bench": "galr.bench"}
LAYERS: tuple[tuple[str, ...], ...] = (
    ("galr", "galr.errors", "galr.clock", "galr.atomic", "galr.container", "galr.console", "galr.serialization",
     "galr.paths", "galr.config", "galr.graphs"),
    ("galr.preprocess",),
    ("galr.geo",),
    ("galr.retrieval",),
    ("galr.bundle",),
    ("galr.runtime",),
    ("galr.model", "galr.data", "galr.train", "galr.torch_encoder", "galr.synthetic", "galr.cli"),
    ("galr.calibration",),
    ("galr.export",),
    ("galr.bench",),
)


def layer_of(module: str) -> int:
    best, depth = None, -1
    for number, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "galr" and module.startswith(prefix + "."))
            if matches and len(prefix) > depth:
                best, depth = number, len(prefix)
    assert best is not None, f"{module} is in no layer; add it to LAYERS and docs/architecture.md"
    return best


def modules():
    for folder, name in ROOTS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            relative = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            yield ".".join([name, *parts]), path


def imported_galr_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "galr"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "galr":
            found.add(node.module)
    return found


def test_no_module_imports_a_layer_above_its_own():
    violations = []
    for module, path in modules():
        own = layer_of(module)
        for target in imported_galr_modules(path):
            if layer_of(target) > own:
                violations.append(f"{module} (layer {own}) imports {target} (layer {layer_of(target)})")
    assert not violations, "\n".join(violations)


def test_the_runtime_never_imports_the_model_export_or_calibration_side():
    for module, path in modules():
        if module.startswith("galr.runtime"):
            above = {t for t in imported_galr_modules(path) if layer_of(t) > layer_of("galr.runtime")}
            assert not above, (module, above)
