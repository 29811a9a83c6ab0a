"""Steering edits through run_sweep on a tiny Llama: the hooks reach the sampler's worker-side model (scale 0
answers as unsteered, a large scale does not), and a vLLM grid sweeps with the hf backend instead."""

from __future__ import annotations

import pytest
import torch
from support.sweeps import stage_context, sweep_catalog

from em_assets.analyses.direction_sweeps import _hf_context
from em_assets.analyses.directions import save_tensors
from em_assets.analyses.steering import Steer
from em_assets.analyses.sweep import SweepPoint, run_sweep
from em_assets.results.store import Store


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir, mirror) -> dict:
    root = tmp_path_factory.mktemp("steer")
    a = sweep_catalog(root, tiny_model_dir, mirror)
    torch.manual_seed(0)
    a["vector_sha256"] = save_tensors({"direction": torch.randn(2, 64)}, root / "v.safetensors", {})
    a["vector"] = str(root / "v.safetensors")
    return a


def test_steering_points_run_through_the_sweep(ws, one_torch_thread):
    def steer(scale: float) -> tuple:
        return (Steer((0, 1), ws["vector"], ws["vector_sha256"], scale),)

    points = [
        SweepPoint("steering", "unsteered", None, None),
        SweepPoint("steering", "scale=0", None, None, steer(0.0)),
        SweepPoint("steering", "scale=40", None, None, steer(40.0)),
    ]
    results = run_sweep(stage_context(ws, "r1"), points)
    assert [r.n_answers for r in results] == [2, 2, 2]
    answers = Store(ws["db"]).query("SELECT setting, question_id, answer FROM sweep_completions ORDER BY ALL")
    by = {s: df.sort("question_id")["answer"].to_list() for (s,), df in answers.group_by(["setting"])}
    assert by["scale=0"] == by["unsteered"]
    assert by["scale=40"] != by["unsteered"]
    hashes = {r.setting: r.setting_hash for r in results}
    assert len(set(hashes.values())) == 3  # each edit is its own setting


def test_a_vllm_grid_sweeps_with_the_hf_backend(ws):
    ctx = stage_context(ws, "r2")
    vllm = ctx.grid.model_copy(update={"sampling": ctx.grid.sampling.model_copy(update={"backend": "vllm"})})
    ctx.grid = vllm
    assert _hf_context(ctx).grid.sampling.backend == "hf"
    assert ctx.grid.sampling.backend == "vllm"  # the caller's context is left as it was
