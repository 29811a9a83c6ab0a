"""Parallel runs: both organisms' organism_job runs at once on one DuckDB file beside readers (the parallel_run
fixture, faults/conftest.py), and one partition rematerialised replaces exactly its rows. Lock waits and
rollback in isolation: tests/unit/test_store.py.
"""

from __future__ import annotations

import itertools
import json
import shutil

import dagster as dg
import polars as pl
import pytest
from support.db import ORGANISM_TABLES, count, organism_rows, table_dump
from support.judge_server import FaultJudge
from support.organisms import CONTROL, KEY_ENV, SECRET, TRAINED, profile, resources, write_grid

from em_assets.defs.jobs import ORGANISM_ASSETS
from em_assets.defs.modules import ASSET_MODULES
from em_assets.defs.partitions import organisms

ASSETS = dg.load_assets_from_modules(ASSET_MODULES)
pytestmark = pytest.mark.timeout(300)


def test_parallel_organism_runs_with_readers_lose_nothing(parallel_run):
    run = parallel_run
    assert run.codes == [0, 0], "\n\n".join(log[-3000:] for log in run.logs)
    assert all(r["success"] for r in run.results)
    with dg.DagsterInstance.from_config(str(run.home)) as instance:
        statuses = [instance.get_run_by_id(r["run_id"]).status for r in run.results]
        entries = [[e for e in instance.all_logs(r["run_id"]) if e.dagster_event] for r in run.results]
    assert statuses == [dg.DagsterRunStatus.SUCCESS] * 2
    at = [
        {(e.step_key, e.dagster_event_type.value): e.timestamp for e in run_entries}
        for run_entries in entries
    ]
    for evs in ([e.dagster_event for e in run_entries] for run_entries in entries):
        # Multiprocess executor: each step started in a worker process of its own, not in the run's process.
        (run_pid,) = {e.pid for e in evs if e.event_type_value == "PIPELINE_START"}
        assert any("using multiprocess executor" in (e.message or "") for e in evs)
        workers = {e.step_key for e in evs if e.event_type_value == "STEP_WORKER_STARTED"}
        step_pids = {e.step_key: e.pid for e in evs if e.event_type_value == "STEP_START"}
        assert workers == set(step_pids) == set(ORGANISM_ASSETS)
        assert len({run_pid, *step_pids.values()}) == 1 + len(ORGANISM_ASSETS)
    # The runs overlapped, and so did their judging (each run's judgements step began before the other's ended).
    for mine, other in [(0, 1), (1, 0)]:
        assert at[mine][(None, "PIPELINE_START")] < at[other][(None, "PIPELINE_SUCCESS")]
        assert at[mine][("judgements", "STEP_START")] < at[other][("judgements", "STEP_SUCCESS")]
    assert count(run.db, "training_losses", TRAINED) == 3 and count(run.db, "training_losses", CONTROL) == 0
    for key in run.keys:
        assert count(run.db, "lora_adapters", key) == 1
        assert count(run.db, "completions", key) == 8
        assert count(run.db, "judgements", key) == 16
        assert organism_rows(run.db, "judgements", key)["score"].null_count() == 0

    # The user's `em-assets sql` shell stayed open throughout and answered every query in order, while the runs
    # were writing too; counts never went down and it ended with every row.
    shell = run.shell
    assert run.shell_code == 0 and shell.other == [], shell.stderr()[-3000:]
    assert not [line for line in shell.stderr().splitlines() if line.startswith("error")], shell.stderr()
    answers = shell.answers
    assert [x.query for x in answers] == list(range(shell.sent))
    for a, b in itertools.pairwise(answers):
        assert a.completions <= b.completions and a.judgements <= b.judgements, (a, b)
    assert (answers[-1].completions, answers[-1].judgements) == (16, 32)
    start = min(t[(None, "PIPELINE_START")] for t in at)
    end = max(t[(None, "PIPELINE_SUCCESS")] for t in at)
    assert len([x for x in answers if start < x.at < end]) >= 10, answers
    during_hold = [x for x in answers if run.hold[0] < x.at <= run.hold[1]]
    assert during_hold and all(x.completions == 16 and x.judgements < 32 for x in during_hold)
    # Raw read-only duckdb connections: lock waits are expected (DuckDB has one writing process), errors and
    # counts going down are not.
    assert run.reader_code == 0, run.logs[-1][-3000:]
    assert run.reader["errors"] == [] and run.reader["raw_ok"] >= 5, run.reader
    assert run.reader["max_seen"] == {
        f"{t}:{k}": n for k in run.keys for t, n in [("completions", 8), ("judgements", 16)]
    }


@pytest.mark.timeout(180)
def test_rematerialising_one_partition_replaces_exactly_its_rows(parallel_run, tmp_path, monkeypatch, mirror):
    monkeypatch.setenv(KEY_ENV, SECRET)
    first, other = parallel_run.keys
    db = tmp_path / "results.duckdb"
    shutil.copy(parallel_run.db, db)
    before_all, before_other = table_dump(db), table_dump(db, other)
    before_first = table_dump(db, first)
    with FaultJudge() as judge:
        doc = json.loads(json.dumps(parallel_run.doc))
        profile(doc)["judge"]["base_url"] = judge.url
        # New sampling settings: the partition's completions and judgements go stale, its adapter does not.
        profile(doc)["sampling"]["temperature"] = 0.7
        grid = write_grid(tmp_path / "grid.yaml", doc)
        a = {"db": str(db), "grid": str(grid), "root": str(tmp_path), "mirror": str(mirror)}
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions(organisms.name, parallel_run.keys)

            def materialize(selection: list[str]) -> dg.ExecuteInProcessResult:
                result = dg.materialize(
                    ASSETS,
                    instance=instance,
                    resources=resources(a),
                    selection=selection,
                    partition_key=first,
                )
                assert result.success
                return result

            sampled = materialize(["lora_adapter", "completions"])
            # Between the two runs no judgement may score an answer that was replaced.
            assert count(db, "judgements", first) == 0
            judged = materialize(["judgements"])
    meta = sampled.asset_materializations_for_node("lora_adapter")[0].metadata
    assert meta["trained_now"].value is False
    assert sampled.asset_materializations_for_node("completions")[0].metadata["sampled_now"].value == 8

    assert table_dump(db, other) == before_other
    after_all, after_first = table_dump(db), table_dump(db, first)
    for table, text in before_all.items():
        if table == "judge_cache":  # shared across organisms: entries are only added
            assert set(text.splitlines()) <= set(after_all[table].splitlines())
        elif table not in ORGANISM_TABLES:
            assert after_all[table] == text, table
    for table in ("lora_adapters", "training_losses"):
        assert after_first[table] == before_first[table], table
    for table, run, n in [("completions", sampled, 8), ("judgements", judged, 16)]:
        rows = organism_rows(db, table, first)
        assert rows.height == n and set(rows["run_id"]) == {run.run_id}, table
        assert set(rows["sampling_hash"]) != set(pl.read_csv(before_first[table].encode())["sampling_hash"])
