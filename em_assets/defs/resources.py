"""Resources: the experiment settings (grid, mirror, paths, device) and the results database."""

import os
from pathlib import Path

import dagster as dg

from em_assets.config import DEFAULT_GRID, GRID_ENV, PROFILE_ENV, GridConfig, load_grid
from em_assets.store import DB_ENV, DEFAULT_DB, Store
from em_assets.upstream import MIRROR_ENV


class ExperimentResource(dg.ConfigurableResource):
    """Where the grid, upstream mirror, caches and artifacts are, and which device to compute on."""

    grid_path: str = str(DEFAULT_GRID)
    profile: str = "demo"
    data_mirror: str = ""
    cache_dir: str = "data/cache"
    artifacts_dir: str = "data/artifacts"
    figures_dir: str = "data/figures"
    calibration_path: str = "data/judge_calibration.yaml"
    device: str = "auto"

    def grid(self) -> GridConfig:
        return load_grid(self.grid_path, self.profile)

    @property
    def mirror(self) -> str | None:
        return self.data_mirror or None

    @property
    def torch_device(self) -> str | None:
        return None if self.device == "auto" else self.device

    @classmethod
    def from_env(cls) -> "ExperimentResource":
        return cls(
            grid_path=os.environ.get(GRID_ENV, str(DEFAULT_GRID)),
            profile=os.environ.get(PROFILE_ENV, "demo"),
            data_mirror=os.environ.get(MIRROR_ENV, ""),
            cache_dir=os.environ.get("EM_CACHE_DIR", "data/cache"),
            artifacts_dir=os.environ.get("EM_ARTIFACTS_DIR", "data/artifacts"),
            figures_dir=os.environ.get("EM_FIGURES_DIR", "data/figures"),
            device=os.environ.get("EM_DEVICE", "auto"),
        )


class ResultsDB(dg.ConfigurableResource):
    """The DuckDB results file; connections are opened per unit of work, never held across model work."""

    database: str = str(DEFAULT_DB)

    def store(self) -> Store:
        store = Store(Path(self.database))
        store.init()
        return store

    @classmethod
    def from_env(cls) -> "ResultsDB":
        return cls(database=os.environ.get(DB_ENV, str(DEFAULT_DB)))
