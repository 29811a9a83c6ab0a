"""The Dagster code location: `dagster dev -w workspace.yaml` loads `defs` from here."""

import dagster as dg

from em_assets.defs.jobs import JOBS
from em_assets.defs.modules import ASSET_MODULES
from em_assets.defs.recovery import SENSORS as RECOVERY_SENSORS
from em_assets.defs.resources import ExperimentResource, ResultsDB
from em_assets.defs.schedules import SCHEDULES
from em_assets.defs.sensors import SENSORS
from em_assets.settings import set_openmp_wait

# Run workers and step processes load this module before any step imports torch.
set_openmp_wait()

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(ASSET_MODULES),
    asset_checks=dg.load_asset_checks_from_modules(ASSET_MODULES),
    jobs=JOBS,
    sensors=[*SENSORS, *RECOVERY_SENSORS],
    schedules=SCHEDULES,
    resources={"experiment": ExperimentResource.from_env(), "results": ResultsDB.from_env()},
)
