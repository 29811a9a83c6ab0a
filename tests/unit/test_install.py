"""The install: `make demo` installs what the demo needs and no test tool; every import is declared."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from support.paths import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
TEST_ONLY = ["pytest", "playwright", "import-linter", "ruff", "llama-cpp-python", "dagster-k8s"]
# Imported only inside the functions of optional backends, each declared by an extra.
OPTIONAL = {"llama-cpp-python": "server", "vllm": "vllm", "dagster-k8s": "k8s"}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement)[0]).lower()


def _commands(target: str, tmp_path) -> str:
    """The commands `make <target>` would run for a fresh venv."""
    return subprocess.run(
        ["make", "-n", target, f"VENV={tmp_path / 'venv'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_demo_installs_the_project_without_extras_and_make_test_adds_them(tmp_path):
    demo = _commands("demo", tmp_path)
    assert (
        "install --no-compile -e .\n" in demo and "scripts/install_smollm2.py" in demo and "pip check" in demo
    )
    assert "[dev" not in demo and "server" not in demo and "CMAKE_ARGS" not in demo
    assert "compileall" not in demo
    test = _commands("test", tmp_path)
    assert "install -e '.[dev,server]'" in test and "pip check" in test
    # The demo's set-up skips bytecode; the suite's set-up compiles it after installing the extras.
    assert test.index("install -e '.[dev,server]'") < test.index("-m compileall")


def test_the_demo_dependencies_hold_no_test_tool():
    core = {_name(r) for r in PROJECT["dependencies"]}
    assert not core & set(TEST_ONLY)
    extras = {
        _name(r) for r in PROJECT["optional-dependencies"]["dev"] + PROJECT["optional-dependencies"]["server"]
    }
    assert set(TEST_ONLY) <= extras


def _imports() -> dict[str, set[str]]:
    """Third-party top-level modules the package imports -> the files importing them."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "em_assets").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"em_assets"}:
                found.setdefault(top, set()).add(path.relative_to(REPO).as_posix())
    return found


def test_every_import_of_the_package_is_declared():
    dists = importlib.metadata.packages_distributions()
    core = {_name(r) for r in PROJECT["dependencies"]}
    missing = []
    for module, files in sorted(_imports().items()):
        names = {_name(d) for d in dists.get(module, [module])}
        optional = [OPTIONAL[n] for n in names if n in OPTIONAL]
        if optional:
            extra = {_name(r) for r in PROJECT["optional-dependencies"][optional[0]]}
            assert names & extra, f"{module} is not in the {optional[0]} extra"
        elif not names & core:
            missing.append(f"{module} ({', '.join(sorted(files))})")
    assert not missing, f"imported but not in [project] dependencies: {missing}"
