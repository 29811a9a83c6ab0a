"""em-assets: model organisms for Emergent Misalignment as Dagster software-defined assets."""

from em_assets.judging.scoring import score_from_probs

__all__ = ["score_from_probs"]
