"""Jobs: pin the inputs, run one organism, rebuild the reports."""

import dagster as dg

from em_assets.grid.plan import CATALOG_ASSETS

catalog_job = dg.define_asset_job(
    "catalog_job", selection=list(CATALOG_ASSETS), description="Pin the inputs."
)
organism_job = dg.define_asset_job(
    "organism_job",
    selection=dg.AssetSelection.assets(
        "lora_adapter",
        "completions",
        "judgements",
        "em_over_training",
        "lora_trajectory",
        "lora_scaling",
        "misalignment_directions",
        "steering_sweep",
        "direction_ablation",
    ),
    description="Train, sample and judge one organism; analyse its training dynamics and EM direction.",
)
reports_job = dg.define_asset_job(
    "reports_job",
    selection=dg.AssetSelection.groups("reports"),
    description="Rebuild every EM table and figure from the results database.",
)

JOBS = [catalog_job, organism_job, reports_job]
