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
    # The judges themselves come in through misalignment_directions <- judgements.
    assert {"judge_agreement", "misalignment_directions"} <= parents(sweep)


def test_steps_that_load_a_local_judge_take_the_gpu_pool():
    job = defs.resolve_job_def("catalog_job")
    pools = {n.name: n.pools for n in job.graph.node_defs}
    assert pools["judge_agreement"] == {"gpu"}
    assert pools["judge_agreement_judge_sanity"] == {"gpu"}
