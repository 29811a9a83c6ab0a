"""Jobs: pin the inputs, run one organism, rebuild the reports."""

import dagster as dg

from em_assets.grid.plan import CATALOG_ASSETS

# judge_agreement runs with the catalog (cheap once its scores are cached) so the organisms and reports that
# follow can state how far the judge agrees with GPT-4o.
catalog_job = dg.define_asset_job(
    "catalog_job",
    selection=list(CATALOG_ASSETS),
    description="Pin the inputs, fit the probe (or distilled) judge and measure the judge against GPT-4o.",
)
# One run per organism: its adapter, answers and judgements, then the analyses the grid opts it into.
ORGANISM_ASSETS = (
    "lora_adapter",
    "completions",
    "judgements",
    "em_over_training",
    "lora_trajectory",
    "lora_scaling",
    "misalignment_directions",
    "steering_sweep",
    "direction_ablation",
)
organism_job = dg.define_asset_job(
    "organism_job",
    selection=dg.AssetSelection.assets(*ORGANISM_ASSETS),
    description="Train, sample and judge one organism; analyse its training dynamics and EM direction.",
)
reports_job = dg.define_asset_job(
    "reports_job",
    selection=dg.AssetSelection.groups("reports"),
    description="Rebuild every EM table and figure from the results database.",
)

JOBS = [catalog_job, organism_job, reports_job]
