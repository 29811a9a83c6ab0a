"""The Dagster code location: `dagster dev -w workspace.yaml` loads `defs` from here."""

import dagster as dg

from em_assets.defs import catalog_assets, organism_assets, report_assets
from em_assets.defs.automation import JOBS, SCHEDULES, SENSORS
from em_assets.defs.resources import ExperimentResource, ResultsDB

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([catalog_assets, organism_assets, report_assets]),
    asset_checks=dg.load_asset_checks_from_modules([catalog_assets, organism_assets, report_assets]),
    jobs=JOBS,
    sensors=SENSORS,
    schedules=SCHEDULES,
    resources={"experiment": ExperimentResource.from_env(), "results": ResultsDB.from_env()},
)
