"""The asset modules of the code location, listed once: definitions and tests load assets and checks from here."""

from em_assets.defs import (
    catalog_assets,
    direction_assets,
    dynamics_assets,
    judge_assets,
    organism_assets,
    persona_assets,
    report_assets,
)

ASSET_MODULES = [
    catalog_assets,
    judge_assets,
    organism_assets,
    dynamics_assets,
    direction_assets,
    report_assets,
    persona_assets,
]
