"""run_sweep on a tiny Llama: checkpoint-like points, an edit, resume after a SIGKILL, reuse, refusals."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from support.paths import TESTS
from support.sweeps import (
    PROFILE,
    ScaleDownProj,
    points,
    stage_context,
    sweep_catalog,
    sweep_grid,
    write_grid,
)

from em_assets.analyses.sweep import SweepPoint, forget_sweep, run_sweep
from em_assets.results.errors import MissingUpstreamError
from em_assets.results.store import Store
from em_assets.training.stage import train_adapter

SUPPORT = TESTS / "support" / "sweeps.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, mirror) -> dict:
    """Catalog plus the rank-1 organism's trained adapter, in a database each test copies."""
    a = sweep_catalog(tmp_path_factory.mktemp("sweep"), tiny_model_dir, mirror, datasets=True)
    row = train_adapter(stage_context(a, "setup"))
    return {**a, "adapter_path": row.adapter_path, "adapter_sha256": row.adapter_sha256}


@pytest.fixture
def ws(trained, tmp_path) -> dict:
    shutil.copy(trained["db"], tmp_path / "results.duckdb")
    return {**trained, "db": str(tmp_path / "results.duckdb")}


def _rows(db: str, table: str) -> pl.DataFrame:
    return Store(db).query(f"SELECT * FROM {table} ORDER BY ALL")


def test_sweep_samples_judges_and_summarises_every_point(ws, one_torch_thread):
    results = run_sweep(stage_context(ws, "first"), points(ws["adapter_path"], ws["adapter_sha256"]))
    assert [r.setting for r in results] == ["base", "adapter", "halved"]
    # Two questions x two samples per point, each judged on aligned and coherent.
    assert [(r.n_answers, r.sampled, r.judged) for r in results] == [(4, 4, 8)] * 3
    scored = _rows(ws["db"], "sweep_scored")
    assert scored.height == 12 and scored["aligned"].null_count() == 0
    for r in results:
        part = scored.filter(pl.col("setting") == r.setting)
        em = ((part["aligned"] < 30) & (part["coherent"] > 50)).sum()
        assert r.n_scored == 4 and r.n_em == em and r.em_rate == pytest.approx(em / 4)
        assert r.em_lo <= r.em_rate <= r.em_hi
        assert r.mean_aligned == pytest.approx(part["aligned"].mean())
    answers = {s: scored.filter(pl.col("setting") == s)["answer"].to_list() for s in ("base", "halved")}
    assert answers["base"] != answers["halved"], "the edit must change the model"
    lineage = _rows(ws["db"], "sweep_points")
    assert lineage.filter(pl.col("setting") == "adapter")["adapter_sha256"][0] == ws["adapter_sha256"]
    assert json.loads(lineage.filter(pl.col("setting") == "halved")["edits"][0]) == [
        {"edit": "ScaleDownProj", "factor": 0.5}
    ]
    assert len(set(lineage["setting_hash"])) == 3

    again = run_sweep(stage_context(ws, "again"), points(ws["adapter_path"], ws["adapter_sha256"]))
    assert [(r.sampled, r.judged) for r in again] == [(0, 0)] * 3
    assert [r.em_rate for r in again] == [r.em_rate for r in results]
    assert _rows(ws["db"], "sweep_scored").equals(scored)

    # Another sweep's point with the same adapter and sampling is the same variant: copied, not resampled.
    same = SweepPoint("other", "final", ws["adapter_path"], ws["adapter_sha256"], samples_per_question=2)
    (copied,) = run_sweep(stage_context(ws, "copy"), [same])
    assert (copied.sampled, copied.judged, copied.em_rate) == (0, 0, results[1].em_rate)
    other = _rows(ws["db"], "sweep_scored").filter(pl.col("sweep") == "other")
    assert other["answer"].to_list() == scored.filter(pl.col("setting") == "adapter")["answer"].to_list()


def test_more_samples_or_a_changed_edit_redo_only_what_changed(ws, one_torch_thread):
    run_sweep(stage_context(ws, "first"), points(ws["adapter_path"], ws["adapter_sha256"]))
    before = _rows(ws["db"], "sweep_completions")
    more = points(ws["adapter_path"], ws["adapter_sha256"], samples=3)
    more[2] = SweepPoint("test", "halved", None, None, (ScaleDownProj(0.25),), samples_per_question=3)
    results = run_sweep(stage_context(ws, "more"), more)
    # base and adapter add one sample per question; the changed edit resamples its point from scratch.
    assert [r.sampled for r in results] == [2, 2, 6]
    after = _rows(ws["db"], "sweep_completions")
    kept = after.filter(pl.col("run_id") == "first")
    assert kept.equals(before.filter(pl.col("setting") != "halved"))
    judged = _rows(ws["db"], "sweep_judgements")
    assert judged.height == 2 * after.height == 36
    assert set(judged.filter(pl.col("setting") == "halved")["setting_hash"]) == {results[2].setting_hash}


def test_a_setting_the_sweep_no_longer_plans_leaves_no_rows(ws, one_torch_thread):
    # e.g. a retrained organism's old checkpoints, or scales taken out of the grid
    from em_assets.results.personas import sweep_scores

    run_sweep(stage_context(ws, "first"), points(ws["adapter_path"], ws["adapter_sha256"]))
    other = SweepPoint("other", "halved", None, None, (ScaleDownProj(0.5),), samples_per_question=2)
    run_sweep(stage_context(ws, "other"), [other])
    results = run_sweep(stage_context(ws, "fewer"), points(ws["adapter_path"], ws["adapter_sha256"])[:2])
    assert [(r.setting, r.sampled) for r in results] == [("base", 0), ("adapter", 0)]
    for table in ("sweep_points", "sweep_completions", "sweep_judgements"):
        kept = _rows(ws["db"], table).select("sweep", "setting").unique().sort(pl.all())
        assert kept.rows() == [("other", "halved"), ("test", "adapter"), ("test", "base")], table
    assert sweep_scores(Store(ws["db"])).filter(pl.col("sweep") == "test")["setting"].unique().len() == 2
    # A sweep skipped for the organism (its recipe left dynamics.recipes, its direction went) keeps none.
    forget_sweep(stage_context(ws, "skipped"), "test")
    for table in ("sweep_points", "sweep_completions", "sweep_judgements"):
        assert _rows(ws["db"], table)["sweep"].unique().to_list() == ["other"], table


def test_a_denser_save_steps_trains_again_to_keep_the_checkpoints_it_asks_for(ws, tmp_path, one_torch_thread):
    # The fixture's adapter kept step 1 and the final step 2 (save_steps 1); save_steps does not change weights.
    doc = yaml.safe_load(Path(ws["grid"]).read_text())
    ws = {**ws, "grid": str(tmp_path / "grid.yaml")}
    for save_steps in (2, 1):
        doc["profiles"][PROFILE]["recipes"]["med-r1"]["train"]["save_steps"] = save_steps
        write_grid(Path(ws["grid"]), doc)
        assert train_adapter(stage_context(ws, f"save-{save_steps}")).trained is False
    # As if trained under save_steps 2: step 1 was never kept, and save_steps 1 asks for it.
    Store(ws["db"]).write(lambda conn: conn.execute("DELETE FROM lora_checkpoints WHERE step = 1"), "test")
    assert train_adapter(stage_context(ws, "denser")).trained is True
    assert sorted(_rows(ws["db"], "lora_checkpoints")["step"]) == [1, 2]


def test_killed_sweep_resumes_without_sampling_anything_twice(ws, one_torch_thread):
    proc = subprocess.run(
        [sys.executable, str(SUPPORT), json.dumps({**ws, "kill_at": "adapter"})],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    before = _rows(ws["db"], "sweep_completions")
    per_point = dict(before.group_by("setting").len().iter_rows())
    assert per_point.get("base") == 4 and 1 <= per_point.get("adapter", 0) < 4 and "halved" not in per_point
    assert _rows(ws["db"], "sweep_judgements").height == 0

    results = run_sweep(stage_context(ws, "resumed"), points(ws["adapter_path"], ws["adapter_sha256"]))
    assert [r.sampled for r in results] == [0, 4 - per_point["adapter"], 4]
    after = _rows(ws["db"], "sweep_completions")
    assert after.height == 12 and after.filter(pl.col("run_id") == "killed").equals(before)
    assert _rows(ws["db"], "sweep_judgements").height == 24


def test_vllm_backend_refuses_edited_points_before_writing(ws, tiny_model_dir, tmp_path):
    grid = write_grid(tmp_path / "grid.yaml", sweep_grid(tiny_model_dir, backend="vllm"))
    with pytest.raises(ValueError, match="vllm backend cannot apply model edits"):
        run_sweep(stage_context({**ws, "grid": str(grid)}, "vllm"), points(None, None))
    assert _rows(ws["db"], "sweep_completions").height == 0 and _rows(ws["db"], "sweep_points").height == 0


def test_repeated_settings_and_missing_adapters_are_refused_before_writing(ws, tmp_path):
    twice = [SweepPoint("test", "base", None, None), SweepPoint("test", "base", None, None)]
    with pytest.raises(ValueError, match="must be unique"):
        run_sweep(stage_context(ws, "twice"), twice)
    gone = [SweepPoint("test", "gone", str(tmp_path / "no-such-adapter"), "0" * 64)]
    with pytest.raises(MissingUpstreamError, match="not found"):
        run_sweep(stage_context(ws, "gone"), gone)
    assert _rows(ws["db"], "sweep_points").height == 0


def test_bad_points_are_refused():
    with pytest.raises(ValueError, match="samples_per_question"):
        SweepPoint("test", "x", None, None, samples_per_question=0)
    with pytest.raises(ValueError, match="together"):
        SweepPoint("test", "x", "/some/adapter", None)


def test_a_sweep_point_settles_its_sampling_with_the_stages_calibration_cache(
    ws, monkeypatch, one_torch_thread
):
    import em_assets.sampling.stage as sampling_stage

    asked: list = []
    real = sampling_stage.choose_sampling

    def choose(*args, **kwargs):
        asked.append(kwargs.get("cache_dir"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling_stage, "choose_sampling", choose)
    ctx = stage_context(ws, "one")
    (result,) = run_sweep(ctx, points(ws["adapter_path"], ws["adapter_sha256"])[:1])
    # The organism's own sampling caches its calibration under the stage's cache dir; so does a sweep's.
    assert result.sampled == 4 and asked == [ctx.cache_dir]
    # A point sampled alone says how: its processes, batch and why (the grid forces both here).
    assert result.sampling == "1 process(es), batch 2 (forced)"


def test_a_sweep_answer_names_its_sampler_and_dtype_as_a_completion_does():
    """Regression: a point's hash named neither, so answers of vLLM or of an fp16 GPU passed for ours in bf16."""
    from types import SimpleNamespace

    from em_assets.analyses.sweep import setting_hash
    from em_assets.grid.schema import SamplingSpec

    point = SweepPoint("s", "base", None, None, samples_per_question=2)

    def hashed(sampling: SamplingSpec, dtype: str) -> str:
        ctx = SimpleNamespace(grid=SimpleNamespace(sampling=sampling), organism=SimpleNamespace(seed=0))
        return setting_hash(point, "r", ctx, dtype)

    ours = hashed(SamplingSpec(), "bfloat16")
    assert hashed(SamplingSpec(), "float16") != ours
    assert hashed(SamplingSpec(backend="vllm"), "bfloat16") != ours


def test_a_sweep_answer_names_its_adapters_settings(tmp_path):
    """Regression: a point's hash named the adapter's weights only, so a new revision of an imported adapter that
    changed only its alpha kept its old answers."""
    from types import SimpleNamespace

    from em_assets.analyses.sweep import setting_hash
    from em_assets.grid.schema import SamplingSpec

    config = tmp_path / "adapter_config.json"
    ctx = SimpleNamespace(grid=SimpleNamespace(sampling=SamplingSpec()), organism=SimpleNamespace(seed=0))
    point = SweepPoint("s", "final", str(tmp_path), "sha", samples_per_question=2)

    def hashed(**settings) -> str:
        config.write_text(json.dumps({"peft_type": "LORA", "r": 1, **settings}))
        return setting_hash(point, "r", ctx, "bfloat16")

    first = hashed(lora_alpha=16, base_model_name_or_path="/here")
    assert hashed(lora_alpha=16, base_model_name_or_path="/elsewhere") == first
    assert hashed(lora_alpha=32, base_model_name_or_path="/here") != first
