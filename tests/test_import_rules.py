"""The layering rules of docs/design.md, checked from the source with `ast` alone (no project module is imported).

Every import counts: module level, under `if TYPE_CHECKING:`, inside `try:`, inside functions. Import cycles
are checked over the imports that run when a module is imported (everything but imports inside function
bodies: those run later, on call). Each rule's exceptions are an explicit dict {file: reason}; a failure names
the file, the line, the import and, for rules that follow imports through the project, the whole chain.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The project's packages: every top-level folder with an __init__.py (a new package is picked up by itself).
PACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests")
HTTP = ("fastapi", "starlette")

# ------------------------------------------------------------------------------------ exceptions, with reasons

# Only kg_index/ imports faiss.
FAISS_EXCEPTIONS: dict[str, str] = {
    "service/offline/bench_scale.py": "`el bench-scale` builds, tunes and times each FAISS factory itself (offline, "
                                      "never on the serving path); the service still searches through kg_index",
}

# Only the runtime wrapper (models/runtime.py) imports onnxruntime.
ONNXRUNTIME_EXCEPTIONS: dict[str, str] = {
    "models/export.py": "the export's parity check runs each exported graph in onnxruntime against torch, and "
                        "int8 export calls onnxruntime.quantization; both are build-time, never on the serving path",
}

# Nothing in models/ or kg_index/ imports service/.
SERVICE_FROM_LIBRARY_EXCEPTIONS: dict[str, str] = {}

# models/ does not import kg_index/.
KG_INDEX_FROM_MODELS_EXCEPTIONS: dict[str, str] = {}

# Only the `el` command (where online and offline meet) imports the offline tools from outside service/offline/.
OFFLINE_FROM_ONLINE_EXCEPTIONS: dict[str, str] = {
    "service/cli.py": "the `el` subcommands build-index, eval, bench, bench-scale, train and tune-weights run the offline tools",
}

# Neither the pipeline nor the job worker side (store, runner, intake) nor the shared conversions reach the
# HTTP layer, directly or through project modules.
NO_HTTP_EXCEPTIONS: dict[str, str] = {}

# ------------------------------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class Import:
    file: str  # path relative to the repository root
    line: int
    target: str  # the imported module, absolute and dotted
    eager: bool  # runs when the importing module is imported (not inside a function body)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_files() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    return out


FILES = _project_files()


def _resolve(module: str, importer: str, level: int, is_package: bool) -> str:
    if level == 0:
        return module
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _walk(node: ast.AST, eager: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, eager
        lazy = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _walk(child, eager and not lazy)


def _imports(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = str(path.relative_to(ROOT))
    is_package = path.name == "__init__.py"
    out: list[Import] = []
    for node, eager in _walk(tree, True):
        if isinstance(node, ast.Import):
            out += [Import(rel, node.lineno, alias.name, eager) for alias in node.names]
            continue
        base = _resolve(node.module or "", module, node.level, is_package)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            out.append(Import(rel, node.lineno, sub if sub in FILES else base, eager))  # `from pkg import submodule`
    return out


IMPORTS: dict[str, list[Import]] = {m: _imports(m, p) for m, p in FILES.items()}


def _rel(module: str) -> str:
    return str(FILES[module].relative_to(ROOT))


def _top(name: str) -> str:
    return name.split(".")[0]


def _is(target: str, names: tuple[str, ...] | str) -> bool:
    names = (names,) if isinstance(names, str) else names
    return any(target == n or target.startswith(n + ".") for n in names)


def _project_edges(module: str, *, eager_only: bool) -> list[Import]:
    return [i for i in IMPORTS[module] if i.target in FILES and (i.eager or not eager_only)]


def _chains_to(start: str, forbidden: tuple[str, ...]) -> list[str]:
    """Every import of a forbidden package reachable from start through project imports, as a readable chain."""
    found: list[str] = []
    seen = {start}
    stack: list[tuple[str, list[str]]] = [(start, [])]
    while stack:
        module, path = stack.pop()
        for imp in IMPORTS[module]:
            step = f"{imp.file}:{imp.line} imports {imp.target}"
            if _is(imp.target, forbidden):
                found.append(" -> ".join([*path, step]))
            elif imp.target in FILES and imp.target not in seen:
                seen.add(imp.target)
                stack.append((imp.target, [*path, step]))
    return found


def _report(rule: str, violations: list[str], exceptions: dict[str, str]) -> str:
    lines = [f"rule broken: {rule}", *(f"  {v}" for v in violations)]
    if exceptions:
        lines.append("  (documented exceptions: " + ", ".join(sorted(exceptions)) + ")")
    return "\n".join(lines)


def _direct(rule_files: list[str], forbidden: tuple[str, ...] | str, exceptions: dict[str, str]) -> list[str]:
    out = []
    for module in rule_files:
        rel = _rel(module)
        if rel in exceptions:
            continue
        out += [f"{i.file}:{i.line} imports {i.target}" for i in IMPORTS[module] if _is(i.target, forbidden)]
    return sorted(set(out))


def _under(*prefixes: str) -> list[str]:
    return [m for m in FILES if any(_rel(m).startswith(p) for p in prefixes)]


# ------------------------------------------------------------------------------------------------- the rules


def test_the_parser_sees_the_project() -> None:
    """Guards the guard: the graph holds the packages and edges the rules below rely on."""
    assert {"service", "models", "kg_index"} <= set(PACKAGES)
    assert "service.pipeline.linker" in FILES and "models.runtime" in FILES and "kg_index.load" in FILES
    targets = {i.target for i in IMPORTS["service.pipeline.linker"]}
    assert {"kg_index.load", "models.runtime", "service.pipeline.encode"} <= targets
    assert any(_is(i.target, "onnxruntime") for i in IMPORTS["models.runtime"])  # a lazy import is seen too
    assert any(_is(i.target, "fastapi") for i in IMPORTS["service.app"])


def test_no_import_cycle() -> None:
    """No cycle among project modules over the imports that run at import time (TYPE_CHECKING ones included)."""
    index = {m: i for i, m in enumerate(sorted(FILES))}
    cycles: list[str] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[tuple[str, Import | None]] = []

    def visit(module: str, via: Import | None) -> None:
        state[module] = 1
        stack.append((module, via))
        for imp in _project_edges(module, eager_only=True):
            if state.get(imp.target) == 1:
                start = next(k for k, (m, _) in enumerate(stack) if m == imp.target)
                steps = [f"{v.file}:{v.line} imports {m}" for m, v in stack[start + 1 :] if v is not None]
                cycles.append(" -> ".join([*steps, f"{imp.file}:{imp.line} imports {imp.target}"]))
            elif imp.target not in state:
                visit(imp.target, imp)
        stack.pop()
        state[module] = 2

    for module in sorted(FILES, key=index.__getitem__):
        if module not in state:
            visit(module, None)
    assert not cycles, _report("no import cycle among project modules", cycles, {})


def test_pipeline_and_job_worker_never_reach_the_http_layer() -> None:
    modules = _under("service/pipeline/") + [
        m for m in ("service.jobs.store", "service.jobs.runner", "service.jobs.intake", "service.conversions")
        if m in FILES
    ]
    assert "service.jobs.runner" in modules and "service.pipeline.decode" in modules
    violations = []
    for module in sorted(modules):
        if _rel(module) not in NO_HTTP_EXCEPTIONS:
            violations += _chains_to(module, HTTP)
    violations = sorted(set(violations))  # `from fastapi import A, B` is one import per name
    assert not violations, _report("service/pipeline, the job store/runner/intake and service/conversions.py "
                                   "import no fastapi/starlette (not even through project modules)",
                                   violations, NO_HTTP_EXCEPTIONS)


def test_faiss_only_in_kg_index() -> None:
    violations = _direct([m for m in FILES if not _rel(m).startswith("kg_index/")], "faiss", FAISS_EXCEPTIONS)
    assert not violations, _report("only kg_index/ imports faiss", violations, FAISS_EXCEPTIONS)


def test_onnxruntime_only_in_the_runtime_module() -> None:
    violations = _direct([m for m in FILES if _rel(m) != "models/runtime.py"], "onnxruntime", ONNXRUNTIME_EXCEPTIONS)
    assert not violations, _report("only models/runtime.py imports onnxruntime", violations, ONNXRUNTIME_EXCEPTIONS)


def test_models_and_kg_index_never_import_service() -> None:
    violations = _direct(_under("models/", "kg_index/"), "service", SERVICE_FROM_LIBRARY_EXCEPTIONS)
    assert not violations, _report("nothing in models/ or kg_index/ imports service/", violations,
                                   SERVICE_FROM_LIBRARY_EXCEPTIONS)


def test_models_never_import_kg_index() -> None:
    violations = _direct(_under("models/"), "kg_index", KG_INDEX_FROM_MODELS_EXCEPTIONS)
    assert not violations, _report("nothing in models/ imports kg_index/", violations, KG_INDEX_FROM_MODELS_EXCEPTIONS)


def test_the_request_path_never_imports_the_offline_tools() -> None:
    online = [m for m in _under("service/") if not _rel(m).startswith("service/offline/")]
    violations = _direct(online, "service.offline", OFFLINE_FROM_ONLINE_EXCEPTIONS)
    assert not violations, _report("nothing outside service/offline/ imports it but the `el` command", violations,
                                   OFFLINE_FROM_ONLINE_EXCEPTIONS)


@pytest.mark.parametrize("exceptions", [FAISS_EXCEPTIONS, ONNXRUNTIME_EXCEPTIONS, SERVICE_FROM_LIBRARY_EXCEPTIONS,
                                        KG_INDEX_FROM_MODELS_EXCEPTIONS, NO_HTTP_EXCEPTIONS,
                                        OFFLINE_FROM_ONLINE_EXCEPTIONS],
                         ids=["faiss", "onnxruntime", "service-from-library", "kg_index-from-models", "no-http",
                              "offline-from-online"])
def test_every_exception_names_a_file_and_a_reason(exceptions: dict[str, str]) -> None:
    """A stale exception (the file is gone) or one without a reason is itself a failure."""
    for rel, reason in exceptions.items():
        assert (ROOT / rel).is_file(), f"exception for {rel}, which no longer exists: delete the entry"
        assert reason.strip(), f"exception for {rel} gives no reason"
