"""The import map of ``densedet/`` keeps its shape: no import circles and no DenseDet import hidden inside a function
(function-local imports are for optional dependencies only). The layer order itself is import-linter's contract in
``pyproject.toml`` (``make test`` runs ``lint-imports``; :func:`test_import_linter_contracts_are_kept` runs it too
when import-linter is installed)."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "densedet"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the DenseDet modules it imports (any depth, TYPE_CHECKING blocks excluded); and every
    function-local DenseDet import as ``module:line``."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    local: list[str] = []
    for mod, path in modules.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]

        def visit(node: ast.AST, in_function: bool, mod: str = mod, pkg: str = pkg) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                func = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                names: list[str] = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        parts = pkg.split(".")[: len(pkg.split(".")) - (child.level - 1)]
                        base = ".".join(parts + ([base] if base else []))
                    names = [f"{base}.{a.name}" for a in child.names] + [base]
                for n in names:
                    target = resolve(n) if n.startswith("densedet") else None
                    if target and target != mod:
                        graph[mod].add(target)
                        if func:
                            local.append(f"{mod}:{child.lineno} imports {target}")
                visit(child, func)

        visit(ast.parse(path.read_text()), False)
    return graph, sorted(set(local))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            strongconnect(v)
    return out


def test_the_checker_finds_cycles_and_local_imports() -> None:
    """The cycle finder itself: a hand-made three-module cycle is found, a chain is not."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles() -> None:
    graph, _ = _imports(_modules())
    assert _cycles(graph) == []


def test_no_function_local_densedet_imports() -> None:
    _, local = _imports(_modules())
    assert local == []


def test_import_linter_contracts_are_kept() -> None:
    exe = shutil.which("lint-imports") or (str(Path(__import__("sys").executable).parent / "lint-imports"))
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    run = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
