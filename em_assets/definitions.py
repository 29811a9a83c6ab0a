"""The Dagster code location: `dagster dev -w workspace.yaml` loads `defs` from here."""

import dagster as dg

from em_assets.defs.jobs import JOBS
from em_assets.defs.modules import ASSET_MODULES
from em_assets.defs.recovery import SENSORS as RECOVERY_SENSORS
from em_assets.defs.resources import ExperimentResource, ResultsDB
from em_assets.defs.schedules import SCHEDULES
from em_assets.defs.sensors import SENSORS

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(ASSET_MODULES),
    asset_checks=dg.load_asset_checks_from_modules(ASSET_MODULES),
    jobs=JOBS,
    sensors=[*SENSORS, *RECOVERY_SENSORS],
    schedules=SCHEDULES,
    resources={"experiment": ExperimentResource.from_env(), "results": ResultsDB.from_env()},
)
