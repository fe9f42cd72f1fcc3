"""Import rules of the layout (../docs/design.md and README: code map), checked on the source: nothing in models/ or
kg_index/ imports service/; models/ does not read benchmark data (no kg_index: the `el train` entry point in
service/offline/ does); the request path never imports the offline tools."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

# The `el` command is where online and offline meet; the offline package itself may import anything.
OFFLINE_ALLOWED = {Path("service/cli.py"), Path("service/__main__.py")}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def offenders(package: str, forbidden: tuple[str, ...], skip: set[Path] = frozenset()) -> dict[str, list[str]]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel in skip:
            continue
        bad = sorted(m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in forbidden))
        if bad:
            out[str(rel)] = bad
    return out


def test_models_import_neither_service_nor_kg_index() -> None:
    assert offenders("models", ("service", "kg_index")) == {}


def test_kg_index_does_not_import_service() -> None:
    assert offenders("kg_index", ("service",)) == {}


def test_the_request_path_does_not_import_the_offline_tools() -> None:
    offline = {p.relative_to(ROOT) for p in (ROOT / "service" / "offline").rglob("*.py")}
    assert offenders("service", ("service.offline",), OFFLINE_ALLOWED | offline) == {}


def test_the_rule_sees_imports_inside_functions(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("import os\n\ndef f():\n    from service.offline.bench import run_bench\n    from . import x\n")
    assert imported_modules(src) == {"os", "service.offline.bench"}
