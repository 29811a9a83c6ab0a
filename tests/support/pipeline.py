"""Dagster resources over a test grid, and materialisation against the test's own instance."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from dagster._core.storage.defs_state.base import set_defs_state_storage

from em_assets.defs.modules import ASSET_MODULES
from em_assets.defs.resources import ExperimentResource, ResultsDB


def pipeline_resources(tmp_path: Path, grid_file: Path, mirror: Path, profile: str = "test") -> dict:
    """The two resources, every path of theirs under tmp_path, on the CPU."""
    return {
        "experiment": ExperimentResource(
            grid_path=str(grid_file),
            profile=profile,
            data_mirror=str(mirror),
            cache_dir=str(tmp_path / "cache"),
            artifacts_dir=str(tmp_path / "artifacts"),
            figures_dir=str(tmp_path / "figures"),
            device="cpu",
        ),
        "results": ResultsDB(database=str(tmp_path / "results.duckdb")),
    }


def materialize(
    instance, resources: dict, selection, partition_key: str | None = None, must_succeed: bool = True
):
    """Materialise the selection of the project's assets; the test fails unless it succeeded (or, with
    must_succeed=False, the result of a run that may fail)."""
    # Definitions load against this test's instance, whatever defs-state storage an earlier test left current.
    with set_defs_state_storage(instance.defs_state_storage):
        result = dg.materialize(
            dg.load_assets_from_modules(ASSET_MODULES),
            instance=instance,
            resources=resources,
            selection=selection,
            partition_key=partition_key,
            raise_on_error=must_succeed,
        )
    assert result.success or not must_succeed
    return result
