"""Per-test workspaces for the fault and bad-input tests: a copy of a catalogued (or sampled) results database,
the fault grid file, an artifacts root, a FaultJudge on loopback and the child environment.

A pytest plugin (conftest.py's pytest_plugins): its fixtures are visible to every test module.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from em_assets.catalog import stage as catalog
from em_assets.grid.load import load_grid
from em_assets.grid.schema import GridConfig
from em_assets.results.store import Store
from em_assets.sampling.stage import sample_completions
from em_assets.training.stage import train_adapter
from support.judge_server import FaultJudge
from support.organisms import (
    CONTROL,
    KEY_ENV,
    PROFILE,
    SECRET,
    child_env,
    fault_grid,
    profile,
    stage_context,
    write_grid,
)


@pytest.fixture(scope="session")
def catalog_db(tmp_path_factory, tiny_model_dir, mirror) -> Path:
    """A results database with the catalog of the fault grid (tiny model, one dataset, two questions)."""
    root = tmp_path_factory.mktemp("catalog")
    grid = load_grid(
        write_grid(root / "grid.yaml", fault_grid(tiny_model_dir, "http://127.0.0.1:9/v1")), PROFILE
    )
    store = Store(root / "results.duckdb")
    store.init()
    catalog.resolve_base_models(store, grid, root / "cache")
    catalog.load_training_datasets(store, grid, str(mirror))
    catalog.load_eval_questions(store, grid, str(mirror))
    return store.path


@pytest.fixture(scope="session")
def sampled_db(tmp_path_factory, catalog_db, tiny_model_dir) -> Path:
    """The catalog plus the control organism's 8 completions, ready to judge."""
    root = tmp_path_factory.mktemp("sampled")
    shutil.copy(catalog_db, root / "results.duckdb")
    a = {
        "db": str(root / "results.duckdb"),
        "grid": str(write_grid(root / "grid.yaml", fault_grid(tiny_model_dir, "http://127.0.0.1:9/v1"))),
        "root": str(root),
        "key": CONTROL,
    }
    train_adapter(stage_context(a, run_id="setup"))
    sample_completions(stage_context(a, run_id="setup"))
    return root / "results.duckdb"


@dataclass
class Workspace:
    """One test's copy of a results database, grid file, artifacts root, judge server and child environment."""

    root: Path
    db: Path
    grid: Path
    doc: dict
    judge: FaultJudge
    mirror: Path
    env: dict[str, str] = field(repr=False)  # holds the key: keep it out of failure reports

    def args(self, key: str, **extra) -> dict:
        return {
            "db": str(self.db),
            "grid": str(self.grid),
            "root": str(self.root),
            "mirror": str(self.mirror),
            "key": key,
            **extra,
        }

    def ctx(self, key: str, run_id: str, **kw):
        return stage_context(self.args(key), run_id=run_id, **kw)

    def changed_grid(self, change: Callable[[dict], None]) -> GridConfig:
        """The grid of this workspace with `change` applied to a copy of its profile (the file is left alone)."""
        doc = json.loads(json.dumps(profile(self.doc)))
        change(doc)
        return GridConfig.model_validate(doc)

    def edit(self, change: Callable[[dict], None]) -> None:
        change(profile(self.doc))
        write_grid(self.grid, self.doc)


def _workspace(
    tmp_path: Path, template: Path, model_dir: Path, mirror: Path, monkeypatch
) -> Iterator[Workspace]:
    monkeypatch.setenv(KEY_ENV, SECRET)
    db = tmp_path / "results.duckdb"
    shutil.copy(template, db)
    with FaultJudge() as judge:
        doc = fault_grid(model_dir, judge.url)
        yield Workspace(
            tmp_path, db, write_grid(tmp_path / "grid.yaml", doc), doc, judge, mirror, child_env()
        )


@pytest.fixture
def ws(tmp_path, catalog_db, tiny_model_dir, mirror, monkeypatch) -> Iterator[Workspace]:
    yield from _workspace(tmp_path, catalog_db, tiny_model_dir, mirror, monkeypatch)


@pytest.fixture
def ws_sampled(tmp_path, sampled_db, tiny_model_dir, mirror, monkeypatch) -> Iterator[Workspace]:
    yield from _workspace(tmp_path, sampled_db, tiny_model_dir, mirror, monkeypatch)
