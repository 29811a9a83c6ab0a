"""The asset graph says what each asset reads: a refitted judge or re-measured error rates make the assets that
use them stale, and steps that load a local judge take the accelerator's pool."""

from __future__ import annotations

import dagster as dg
import pytest

from em_assets.definitions import defs

JUDGES = {"distilled_judge", "probe_judge"}


def parents(name: str) -> set[str]:
    graph = defs.resolve_asset_graph()
    return {k.to_user_string() for k in graph.get(dg.AssetKey(name)).parent_keys}


@pytest.mark.parametrize("sweep", ["em_over_training", "lora_scaling"])
def test_dynamics_sweeps_follow_the_judge_and_its_error_rates(sweep):
    assert JUDGES | {"judge_agreement"} <= parents(sweep)


@pytest.mark.parametrize("sweep", ["steering_sweep", "direction_ablation"])
def test_direction_sweeps_follow_the_judges_error_rates(sweep):
    assert {"judge_agreement", "misalignment_directions"} <= parents(sweep)


@pytest.mark.parametrize("sweep", ["steering_sweep", "direction_ablation"])
def test_direction_sweeps_follow_the_judge_that_scores_them(sweep):
    """Regression: a refitted judge reached the sweeps only through misalignment_directions, whose data version is
    its file's sha256: a direction unchanged by the new scores left them fresh, though they judge with it."""
    assert parents(sweep) >= JUDGES


def test_completions_follow_the_base_model_they_are_sampled_from():
    """Regression: the base model reached completions only through lora_adapter, whose data version the control
    ("control") and a published adapter (its sha256) keep when the base model's revision changes."""
    assert "base_models" in parents("completions")


def test_steps_that_load_a_local_judge_take_the_gpu_pool():
    job = defs.resolve_job_def("catalog_job")
    pools = {n.name: n.pools for n in job.graph.node_defs}
    assert pools["judge_agreement"] == {"gpu"}
    assert pools["judge_agreement_judge_sanity"] == {"gpu"}
