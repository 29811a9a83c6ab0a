"""Dead runs: a run whose process is gone is failed with the reason and frees its pool slot; a step that waits
for a slot names the run holding it; `em-assets demo` killed with SIGKILL or stopped with SIGTERM mid-judging,
then run again, finishes with every judgement once.

Processes are real (a sleeping child stands in for a live run worker; the demo runs as a child CLI on the tiny
Llama grid of conftest.py, judged by support.judge_server's fault script).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.events import DagsterEvent, DagsterEventType
from support.children import kill, wait_for
from support.db import ro_query
from support.judge_server import FaultJudge as JudgeServer
from support.organisms import KEY_ENV, PROFILE, SECRET, write_grid
from support.paths import EM_ASSETS, REPO
from support.tiny import tiny_grid

from em_assets.defs.partitions import GPU_POOL
from em_assets.defs.recovery import find_dead_runs, recover, slot_holders, wait_for_pools
from em_assets.settings import SettingsError

CONCURRENCY = {"concurrency": {"pools": {"default_limit": 1, "granularity": "op"}}}


def _started_run(instance: dg.DagsterInstance, pid: int) -> str:
    """A STARTED run whose worker is `pid`, holding the gpu slot for its step."""
    run = instance.create_run_for_job(dg.GraphDefinition("g").to_job(), run_id=None)
    start = DagsterEvent(DagsterEventType.RUN_START.value, job_name=run.job_name, pid=pid, message="start")
    instance.report_dagster_event(start, run_id=run.run_id)
    instance.event_log_storage.initialize_concurrency_limit_to_default(GPU_POOL)
    claim = instance.event_log_storage.claim_concurrency_slot(GPU_POOL, run.run_id, "judgements", 0)
    assert claim.is_claimed
    return run.run_id


def test_a_dead_run_is_failed_with_its_reason_and_frees_its_slot_a_live_one_is_waited_for():
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with dg.instance_for_test(overrides=CONCURRENCY) as instance:
        run_id = _started_run(instance, worker.pid)
        assert find_dead_runs(instance) == []
        said: list[str] = []
        waited: list[float] = []
        waiter = threading.Thread(
            target=lambda: waited.append(wait_for_pools(instance, say=said.append, poll_s=0.2)), daemon=True
        )
        waiter.start()
        wait_for(lambda: any("held by" in m for m in said), 20, "the waiting message")
        assert run_id in said[0] and "pool 'gpu'" in said[0]
        time.sleep(1)
        assert waiter.is_alive() and len(said) == 1  # reported once a minute, not once a poll
        worker.kill()
        worker.wait()
        waiter.join(20)
        assert waited and waited[0] > 1
        run = instance.get_run_by_id(run_id)
        assert run.status == dg.DagsterRunStatus.FAILURE
        failure = instance.all_logs(run_id, of_type=DagsterEventType.RUN_FAILURE)[0]
        assert f"pid {worker.pid}" in failure.message and "gone" in failure.message
        assert slot_holders(instance, GPU_POOL) == []
        assert any("recovered dead run" in m for m in said)


@pytest.mark.timeout(60)
def test_waiting_for_a_pool_without_slots_fails_at_once():
    """Regression: a pool set to 0 slots had the CLI wait for ever, "held by" no run."""
    with dg.instance_for_test(overrides=CONCURRENCY) as instance:
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, 0)
        with pytest.raises(SettingsError, match=r"pool 'gpu' no slots.+concurrency set gpu 1"):
            wait_for_pools(instance, say=lambda m: None, poll_s=0.2)


def test_slots_left_by_an_ended_run_are_freed_and_this_process_runs_are_never_dead():
    with dg.instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 2}}}) as instance:
        ours = _started_run(instance, os.getpid())
        ended = _started_run(instance, os.getpid())
        instance.report_run_failed(instance.get_run_by_id(ended))
        recover(instance, say=lambda m: None)
        assert instance.get_run_by_id(ours).status == dg.DagsterRunStatus.STARTED
        assert [h.run_id for h in slot_holders(instance, GPU_POOL)] == [ours]


def test_a_dead_run_whose_pid_this_process_reuses_is_dead():
    """Regression: a run recorded under this process's pid was never dead, so a run killed in a container (the
    same fixed pid on every start) held its gpu slot for good."""
    from dagster._core.events.log import EventLogEntry

    with dg.instance_for_test(overrides=CONCURRENCY) as instance:
        run = instance.create_run_for_job(dg.GraphDefinition("g").to_job(), run_id=None)
        # Started an hour ago, before this process: a process that has since reused the pid.
        start = DagsterEvent(DagsterEventType.RUN_START.value, job_name=run.job_name, pid=os.getpid())
        entry = EventLogEntry(
            error_info=None,
            level=20,
            user_message="",
            run_id=run.run_id,
            timestamp=time.time() - 3600,
            dagster_event=start,
        )
        instance.handle_new_event(entry)
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
        assert [d.run_id for d in find_dead_runs(instance)] == [run.run_id]


# ------------------------------------------------------------------------------ the CLI, killed and re-run


@dataclass
class Demo:
    env: dict[str, str]
    grid: dict

    def start(self, server: JudgeServer, log: Path) -> subprocess.Popen:
        """`em-assets demo` as a child in its own process group, judged by `server`."""
        self.grid["profiles"][PROFILE]["judge"]["base_url"] = server.url
        write_grid(Path(self.env["EM_GRID"]), self.grid)
        with log.open("wb") as fh:
            return subprocess.Popen(
                [EM_ASSETS, "demo"], stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                start_new_session=True,
            )  # fmt: skip


@pytest.fixture
def demo(tmp_path, tiny_model_dir, mirror) -> Demo:
    judge = {"backend": "openai", "model": "fault-judge", "base_url": "", "api_key_env": KEY_ENV}
    judge.update(concurrency=1, max_retries=1, timeout_s=60)
    lora = {"r": 2, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}
    doc = tiny_grid(tiny_model_dir, PROFILE, judge, {"med-r2": ("bad_medical_advice", lora)}, examples=4,
                    batch_size=2, samples=3)  # fmt: skip
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DAGSTER_HOME": str(home),
        "EM_GRID": str(tmp_path / "grid.yaml"),
        "EM_PROFILE": PROFILE,
        "EM_DB": str(tmp_path / "results.duckdb"),
        "EM_DATA_MIRROR": str(mirror),
        "EM_CACHE_DIR": str(tmp_path / "cache"),
        "EM_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "EM_FIGURES_DIR": str(tmp_path / "figures"),
        "EM_LOGS_DIR": str(tmp_path / "logs"),
        "EM_DEVICE": "cpu",
        KEY_ENV: SECRET,
    }
    return Demo(env, doc)


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_demo_stopped_mid_judging_then_run_again_finishes_with_every_judgement_once(demo, tmp_path, sig):
    db = Path(demo.env["EM_DB"])
    # The catalog's judge sanity check scores each calibration answer on both metrics first.
    sanity = 2 * len(yaml.safe_load((REPO / "data/judge_calibration.yaml").read_text()))
    with JudgeServer(ok_first=sanity + 3, failure="stall") as server:
        first = demo.start(server, tmp_path / "first.log")
        try:
            wait_for(server.stalled.is_set, 400, "judging to start", first)
            os.kill(first.pid, sig)  # the CLI process alone, as the OOM killer or `timeout` would
            if sig == signal.SIGTERM:
                time.sleep(2)
                server.release()  # the stalled request returns as a slow server's would
            code = first.wait(120)
        finally:
            kill(first)
        log = (tmp_path / "first.log").read_text()
        assert code == -signal.SIGKILL if sig == signal.SIGKILL else code == 128 + signal.SIGINT, log[-3000:]
        with dg.DagsterInstance.from_config(demo.env["DAGSTER_HOME"]) as instance:
            held = slot_holders(instance, GPU_POOL)
        if sig == signal.SIGKILL:
            assert [(h.job_name, h.step_key, h.status) for h in held] == [
                ("organism_job", "judgements", "STARTED")
            ]
        else:
            assert "interrupted" in log and "Traceback" not in log
            # The run failed and freed its slot by itself; its workers went with it.
            assert held == []
            wait_for(lambda: _group_gone(first.pid), 30, "the demo's processes to exit")
        server.reset()
        second = demo.start(server, tmp_path / "second.log")
        try:
            assert second.wait(500) == 0, (tmp_path / "second.log").read_text()[-4000:]
        finally:
            kill(second)
    out = (tmp_path / "second.log").read_text()
    # The demo names the machine its time depends on.
    assert re.search(r"\[em-assets\] machine: .+ models on the CPU in (float32|bfloat16)", out), out[:2000]
    if sig == signal.SIGKILL:
        assert "recovered dead run" in out
    with dg.DagsterInstance.from_config(demo.env["DAGSTER_HOME"]) as instance:
        statuses = [r.status for r in instance.get_runs()]
        assert dg.DagsterRunStatus.FAILURE in statuses
        assert not {dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING} & set(statuses)
        assert slot_holders(instance, GPU_POOL) == []
    counts = ro_query(
        db,
        "SELECT (SELECT count(*) FROM completions) AS c, (SELECT count(*) FROM judgements) AS j, "
        "(SELECT count(DISTINCT (organism, question_id, paraphrase_idx, sample_idx, metric)) FROM judgements) AS u",
    ).row(0)
    assert counts[0] == 2 * 2 * 3 and counts[1] == counts[2] == 2 * counts[0]
    assert ro_query(db, "SELECT count(*) AS n FROM em_summary")["n"][0] == 2


def test_dead_run_sensor_fails_dead_runs_in_the_code_location():
    from em_assets.definitions import defs

    sensor = defs.resolve_sensor_def("dead_run_sensor")
    worker = subprocess.Popen([sys.executable, "-c", "pass"])
    worker.wait()
    with dg.instance_for_test(overrides=CONCURRENCY) as instance:
        run_id = _started_run(instance, worker.pid)
        result = sensor(dg.build_sensor_context(instance=instance))
        assert run_id in result.skip_message
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
        assert slot_holders(instance, GPU_POOL) == []
