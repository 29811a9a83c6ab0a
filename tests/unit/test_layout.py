"""The package's shape: no import cycles, a thin Dagster layer, and definitions that load without torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from support.paths import REPO

PKG = REPO / "em_assets"
SQL_WORDS = ("SELECT ", "INSERT ", "DELETE ", "CREATE ", "UPDATE ")


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_no_import_cycles_between_modules():
    files = {_module(p): p for p in PKG.rglob("*.py")}
    graph = {
        m: {i for i in _imports(p, top_level_only=False) if i in files and i != m} for m, p in files.items()
    }
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in graph[m]:
            if state.get(dep) == 1:
                pytest.fail(f"import cycle: {' -> '.join([*path, m, dep])}")
            if dep not in state:
                visit(dep, [*path, m])
        state[m] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_the_dagster_layer_has_no_sql_and_no_torch():
    for path in (PKG / "defs").glob("*.py"):
        imports = _imports(path, top_level_only=False)
        assert not any(i.split(".")[0] in ("torch", "duckdb") for i in imports), path
        strings = [n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)]
        assert not [s for s in strings if isinstance(s, str) and any(w in s for w in SQL_WORDS)], path


def test_the_core_has_no_dagster_import():
    for path in PKG.rglob("*.py"):
        if path.parent.name not in ("defs", "cli") and path.name not in (
            "definitions.py",
            "k8s_definitions.py",
        ):
            assert not any(i.split(".")[0] == "dagster" for i in _imports(path, False)), path


def test_definitions_load_without_torch():
    code = "import sys, em_assets.definitions; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
