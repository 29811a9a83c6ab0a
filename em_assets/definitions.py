"""The Dagster code location: `dagster dev -w workspace.yaml` loads `defs` from here."""

import dagster as dg

from em_assets.defs import catalog_assets, organism_assets, report_assets
from em_assets.defs.automation import catalog_job, grid_sensor, organism_job, reports_job
from em_assets.defs.resources import ExperimentResource, ResultsDB

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([catalog_assets, organism_assets, report_assets]),
    asset_checks=dg.load_asset_checks_from_modules([catalog_assets, organism_assets, report_assets]),
    jobs=[catalog_job, organism_job, reports_job],
    sensors=[grid_sensor],
    resources={"experiment": ExperimentResource.from_env(), "results": ResultsDB.from_env()},
)
