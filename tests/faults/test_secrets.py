"""The judge's API key reaches the judge and nothing else: not error messages, DuckDB, Dagster storage, or any
file a run leaves.
"""

from __future__ import annotations

import dagster as dg
import pytest
from support.db import count, files_containing, table_dump
from support.organisms import CONTROL, SECRET, resources

from em_assets.defs.modules import ASSET_MODULES
from em_assets.defs.partitions import organisms

ASSETS = dg.load_assets_from_modules(ASSET_MODULES)
pytestmark = pytest.mark.timeout(300)


def test_failing_judge_fails_the_dagster_step_without_leaking_the_key(ws_sampled, tmp_path):
    ws = ws_sampled
    ws.judge.reset(ok_first=0, failure="500")  # the body echoes the Authorization header
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        instance.add_dynamic_partitions(organisms.name, [CONTROL])
        result = dg.materialize(
            ASSETS,
            instance=instance,
            resources=resources(ws.args(CONTROL)),
            selection=["judgements"],
            partition_key=CONTROL,
            raise_on_error=False,
        )
        assert not result.success
        (failure,) = result.get_step_failure_events()
        message = failure.step_failure_data.error.to_string()
        assert (
            "JudgeRequestError" in message and "HTTP 500" in message and "gave up after 2 attempts" in message
        )
        records = "\n".join(dg.serialize_value(r) for r in instance.all_logs(result.run_id))
    assert f"Bearer {SECRET}" in ws.judge.auth
    assert SECRET not in message and SECRET not in records and "HTTP 500" in records
    assert files_containing(home, SECRET) == []
    assert count(ws.db, "judgements") == 0 and count(ws.db, "judge_cache") == 0


def test_api_key_never_reaches_duckdb_or_dagster_storage(parallel_run):
    run = parallel_run
    assert run.codes == [0, 0]
    assert f"Bearer {SECRET}" in run.auth  # the key was in use by both runs
    dump = table_dump(run.db)
    assert dump["judgements"].count("\n") == 33 and not [t for t, text in dump.items() if SECRET in text]
    with dg.DagsterInstance.from_config(str(run.home)) as instance:
        for r in run.results:
            records = [dg.serialize_value(rec) for rec in instance.all_logs(r["run_id"])]
            assert any("ASSET_MATERIALIZATION" in rec for rec in records)
            assert not [rec for rec in records if SECRET in rec]
            assert SECRET not in dg.serialize_value(instance.get_run_by_id(r["run_id"]))
    # Every file the runs left: the database and its WAL, adapters, Dagster storage and compute logs, outputs.
    assert files_containing(run.root, SECRET) == []
