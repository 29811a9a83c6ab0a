"""Resources: the experiment settings (grid, mirror, paths, device) and the results database."""

from pathlib import Path

import dagster as dg

from em_assets.catalog.stage import check_grid_names
from em_assets.context import StageContext
from em_assets.grid.load import GridError, load_grid
from em_assets.grid.schema import GridConfig, Organism
from em_assets.results.store import Store
from em_assets.settings import DB_ENV, Settings, settings, torch_device

_DEFAULTS = Settings()


class ExperimentResource(dg.ConfigurableResource):
    """Where the grid, upstream mirror, caches and artifacts are, and which device to compute on."""

    grid_path: str = str(_DEFAULTS.grid_path)
    profile: str = _DEFAULTS.profile
    data_mirror: str = ""
    cache_dir: str = str(_DEFAULTS.cache_dir)
    artifacts_dir: str = str(_DEFAULTS.artifacts_dir)
    figures_dir: str = str(_DEFAULTS.figures_dir)
    calibration_path: str = str(_DEFAULTS.calibration_path)
    device: str = _DEFAULTS.device

    def grid(self) -> GridConfig:
        """The grid's profile, its catalog names checked too: a step run from the UI fails on a typo as the CLI
        does, naming the key, whatever step meets it first."""
        grid = load_grid(self.grid_path, self.profile)
        check_grid_names(grid)
        return grid

    @property
    def mirror(self) -> str | None:
        return self.data_mirror or None

    @property
    def torch_device(self) -> str | None:
        return torch_device(self.device)

    @classmethod
    def from_env(cls) -> "ExperimentResource":
        current = settings()
        return cls(
            grid_path=str(current.grid_path),
            profile=current.profile,
            data_mirror=current.data_mirror or "",
            cache_dir=str(current.cache_dir),
            artifacts_dir=str(current.artifacts_dir),
            figures_dir=str(current.figures_dir),
            calibration_path=str(current.calibration_path),
            device=current.device,
        )


class ResultsDB(dg.ConfigurableResource):
    """The results store (DuckDB file or DuckLake); connections are opened per unit of work, never held across
    model work."""

    database: str = _DEFAULTS.database
    # A DuckLake's data files (None: EM_DB_DATA_PATH; a PostgreSQL catalog needs one).
    db_data_path: str | None = None
    # How long a write waits for another process's lock (None: EM_DB_LOCK_TIMEOUT, else 600 s).
    lock_timeout_s: float | None = None

    def store(self) -> Store:
        store = Store(self.database, self.lock_timeout_s, self.db_data_path)
        store.init()
        return store

    @classmethod
    def from_env(cls) -> "ResultsDB":
        current = settings()
        return cls(
            # EM_DB may hold a PostgreSQL catalog's password: Dagster keeps a resource's values in every run's
            # job snapshot (its storage, the UI's launchpad), an EnvVar only by name, read in the step's process.
            database=dg.EnvVar(DB_ENV) if current.database != _DEFAULTS.database else current.database,
            db_data_path=current.db_data_path,
            lock_timeout_s=current.lock_timeout_s,
        )


def stage_context(
    context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB
) -> StageContext:
    """The organism stage's inputs for the asset's partition, which must be an organism of the grid."""
    grid, key = experiment.grid(), context.partition_key
    # Partitions outlive the grid (an organism removed, another profile's): a backfill over them computes nothing.
    if key not in {o.key for o in grid.organisms()}:
        raise GridError(
            f"organism {key} is not in profile {experiment.profile!r} of {experiment.grid_path} (removed from "
            "the grid, or another profile's): nothing is computed for it"
        )
    return StageContext(
        store=results.store(),
        grid=grid,
        organism=Organism.parse(key),
        run_id=context.run.run_id,
        artifacts_dir=Path(experiment.artifacts_dir),
        log=context.log,
        device=experiment.torch_device,
        cache_dir=Path(experiment.cache_dir),
        data_mirror=experiment.mirror,
    )
