"""Kills mid-stage: a training, sampling or judging child SIGKILLed part-way resumes to the same rows, with no
gaps, duplicates or recomputation.

Every fault hits a real process (tests/support/child.py), a real DuckDB file and a real HTTP judge on 127.0.0.1;
the model is the tiny random Llama and the grid (support/organisms.py) is a few seconds of work. train_lora's
checkpoint arithmetic at the core level is in tests/unit/test_training.py.
"""

from __future__ import annotations

import signal
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file
from support.children import children, kill, spawn, train_killed_at_step, train_uninterrupted, wait_for
from support.db import count, organism_rows, ro_query
from support.organisms import CONTROL, KEYS, TRAINED, ListLog

from em_assets.judging.stage import judge_completions
from em_assets.results.artifacts import ADAPTER_FILE, sha256_file
from em_assets.sampling.stage import sample_completions
from em_assets.training.stage import train_adapter

pytestmark = pytest.mark.timeout(300)


@pytest.mark.timeout(240)
def test_training_killed_at_a_step_resumes_to_the_same_adapter(ws, catalog_db, tmp_path):
    train_killed_at_step(ws, TRAINED, 2, tmp_path / "train.log")
    # Step 2 was being logged when the process died: step 1's checkpoint is the last whole one.
    adapters = ws.root / "artifacts" / "adapters" / TRAINED
    assert [p.name for p in adapters.glob("*/checkpoints/*")] == ["step-00000001"]
    assert count(ws.db, "lora_adapters", TRAINED) == 0 and count(ws.db, "training_losses", TRAINED) == 0

    log = ListLog()
    resumed = train_adapter(ws.ctx(TRAINED, "resumed", log=log))
    assert resumed.trained and resumed.resumed_from_step == 1
    assert [m.split(" step ")[1].split()[0] for m in log.messages if " step " in m] == ["2", "3"]
    assert not list(adapters.glob("*/checkpoints"))

    ref_root = tmp_path / "reference"
    reference = train_uninterrupted(ws, TRAINED, catalog_db, ref_root)
    assert reference.resumed_from_step is None and reference.config_hash == resumed.config_hash

    got = load_file(Path(resumed.adapter_path) / ADAPTER_FILE)
    want = load_file(Path(reference.adapter_path) / ADAPTER_FILE)
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)

    row = organism_rows(ws.db, "lora_adapters", TRAINED).row(0, named=True)
    assert row["run_id"] == "resumed" and row["steps"] == 3
    assert row["adapter_sha256"] == sha256_file(Path(row["adapter_path"]) / ADAPTER_FILE)
    losses = organism_rows(ws.db, "training_losses", TRAINED).sort("step")
    ref_losses = organism_rows(ref_root / "results.duckdb", "training_losses", TRAINED).sort("step")
    assert losses["step"].to_list() == [1, 2, 3]
    torch.testing.assert_close(
        torch.tensor(losses["loss"].to_list()),
        torch.tensor(ref_losses["loss"].to_list()),
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.timeout(240)
def test_sampling_killed_resumes_without_gaps_duplicates_or_recomputation(ws, tmp_path):
    train_adapter(ws.ctx(CONTROL, "control"))
    marker = tmp_path / "paused"
    with children() as started:
        child = spawn(
            "sample",
            ws.args(CONTROL, run_id="killed", pause_after=3, marker=str(marker)),
            ws.env,
            tmp_path / "sample.log",
        )
        started.append(child)
        wait_for(lambda: count(ws.db, "completions", CONTROL) >= 3, 180, "3 completion rows", child.proc)
        wait_for(marker.exists, 30, "the sampler to stop writing", child.proc)
        before = organism_rows(ws.db, "completions", CONTROL)
        kill(child.proc)
        assert child.proc.returncode == -signal.SIGKILL
    assert 3 <= before.height < 8 and set(before["run_id"]) == {"killed"}

    summary = sample_completions(ws.ctx(CONTROL, "resumed"))
    assert summary.reused == before.height and summary.sampled == 8 - before.height

    after = organism_rows(ws.db, "completions", CONTROL)
    questions = ro_query(
        ws.db,
        "SELECT question_id, paraphrase_idx FROM eval_questions WHERE eval_set = 'first_plot_questions'",
    )
    wanted = {(q, p, i) for q, p in questions.iter_rows() for i in range(4)}
    assert after.height == len(wanted) == 8
    assert set(after.select(KEYS).iter_rows()) == wanted
    # The rows written before the kill are the same rows, not resampled ones (created_at, run_id, answer).
    assert after.filter(pl.col("run_id") == "killed").equals(before)
    assert after.filter(pl.col("run_id") == "resumed").height == 8 - before.height


@pytest.mark.timeout(180)
def test_judging_killed_resumes_with_full_coverage_and_no_rejudging(ws_sampled, tmp_path):
    ws = ws_sampled
    # Two prompts a chunk, one request at a time: chunk 1 is written, chunk 2 hangs on its second request.
    ws.judge.reset(ok_first=3, failure="stall")
    with children() as started:
        child = spawn(
            "judge", ws.args(CONTROL, run_id="killed", chunk_size=2), ws.env, tmp_path / "judge.log"
        )
        started.append(child)
        wait_for(lambda: count(ws.db, "judgements", CONTROL) >= 2, 120, "2 judgement rows", child.proc)
        wait_for(ws.judge.stalled.is_set, 60, "the judge to stall", child.proc)
        before = organism_rows(ws.db, "judgements", CONTROL)
        kill(child.proc)
        assert child.proc.returncode == -signal.SIGKILL
    assert before.height == 2 and before["score"].null_count() == 0

    ws.judge.release()
    summary = judge_completions(ws.ctx(CONTROL, "resumed"), chunk_size=4)
    assert summary.scored == 14 and ws.judge.requests == 14

    after = organism_rows(ws.db, "judgements", CONTROL)
    comps = organism_rows(ws.db, "completions", CONTROL)
    wanted = {(*k, m) for k in comps.select(KEYS).iter_rows() for m in ("aligned", "coherent")}
    assert after.height == 16 and set(after.select([*KEYS, "metric"]).iter_rows()) == wanted
    assert after["score"].null_count() == 0
    assert after.filter(pl.col("run_id") == "killed").equals(before)
    assert count(ws.db, "judge_cache") == 16


def test_weights_replaced_after_their_row_was_written_are_not_sampled_under_its_sha(ws):
    from safetensors.torch import save_file

    from em_assets.analyses.dynamics import scaled_adapters
    from em_assets.results.errors import MissingUpstreamError

    train_adapter(ws.ctx(TRAINED, "trained"))
    row = organism_rows(ws.db, "lora_adapters", TRAINED).row(0, named=True)
    weights = Path(row["adapter_path"]) / ADAPTER_FILE
    # A retraining into the same folder killed after replacing the weights and before writing its row.
    save_file({name: t + 1 for name, t in load_file(weights).items()}, weights)
    with pytest.raises(MissingUpstreamError, match="materialise lora_adapter again"):
        sample_completions(ws.ctx(TRAINED, "stale"))
    with pytest.raises(MissingUpstreamError, match="materialise lora_adapter again"):
        scaled_adapters(ws.ctx(TRAINED, "stale"))
    assert count(ws.db, "completions", TRAINED) == 0
    assert train_adapter(ws.ctx(TRAINED, "again")).trained
