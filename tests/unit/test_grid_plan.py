"""The grid sensor's planning, without Dagster: partitions to add, catalog first, then one run per organism."""

from support.paths import REPO

from em_assets.grid.load import load_grid
from em_assets.grid.plan import CATALOG_ASSETS, GridCursor, plan_grid
from em_assets.grid.schema import BaseModelSpec


def _marks(n: int) -> dict[str, int]:
    return dict.fromkeys(CATALOG_ASSETS, n)


def test_new_organisms_wait_for_the_catalog_then_run_once_each():
    grid = load_grid(REPO / "data/grid.yaml", "demo")
    keys = [o.key for o in grid.organisms()]
    first = plan_grid(grid, GridCursor(), set(), _marks(0))
    assert first.new_partitions == keys and first.catalog_run_key and not first.organism_runs
    assert first.cursor.pending == keys

    waiting = plan_grid(grid, first.cursor, set(keys), _marks(0))
    assert not waiting.organism_runs and "wait for catalog_job" in waiting.skip_reason

    ready = plan_grid(grid, first.cursor, set(keys), _marks(5))
    assert [k for k, _ in ready.organism_runs] == keys and not ready.cursor.pending
    assert len({r for _, r in ready.organism_runs}) == len(keys)

    idle = plan_grid(grid, ready.cursor, set(keys), _marks(5))
    assert not idle.organism_runs and not idle.catalog_run_key and "no base model" in idle.skip_reason


def test_a_changed_revision_reruns_only_that_models_organisms():
    grid = load_grid(REPO / "data/grid.yaml", "demo")
    keys = {o.key for o in grid.organisms()}
    settled = plan_grid(grid, plan_grid(grid, GridCursor(), set(), _marks(0)).cursor, keys, _marks(1)).cursor
    moved = grid.model_copy(
        update={"base_models": [BaseModelSpec(**{**grid.base_models[0].model_dump(), "revision": "abc"})]}
    )
    plan = plan_grid(moved, settled, keys, _marks(1))
    # Imported answers organisms name other base models (labels, not grid models): they stay as they are.
    on_model = sorted(o.key for o in grid.organisms() if o.base_model == grid.base_models[0].name)
    assert on_model and len(on_model) < len(keys)
    assert plan.catalog_run_key and not plan.new_partitions and sorted(plan.cursor.pending) == on_model
    rerun = plan_grid(moved, plan.cursor, keys, _marks(2))
    assert sorted(k for k, _ in rerun.organism_runs) == on_model


def test_changed_thresholds_redo_the_catalog_and_every_organism():
    grid = load_grid(REPO / "data/grid.yaml", "demo")
    keys = {o.key for o in grid.organisms()}
    settled = plan_grid(grid, plan_grid(grid, GridCursor(), set(), _marks(0)).cursor, keys, _marks(1)).cursor
    assert not plan_grid(grid, settled, keys, _marks(1)).catalog_run_key
    stricter = grid.model_copy(
        update={"thresholds": grid.thresholds.model_copy(update={"coherent_above": 70})}
    )
    plan = plan_grid(stricter, settled, keys, _marks(1))
    assert plan.catalog_run_key and not plan.new_partitions and set(plan.cursor.pending) == keys
    rerun = plan_grid(stricter, plan.cursor, keys, _marks(2))
    assert {k for k, _ in rerun.organism_runs} == keys
    assert not plan_grid(stricter, rerun.cursor, keys, _marks(2)).catalog_run_key
    # Going back is a change too.
    assert plan_grid(grid, rerun.cursor, keys, _marks(2)).catalog_run_key
