"""Recovery from dead runs: a run left STARTED by a process that is gone (kill -9, OOM killer, a crashed host
process) is marked failed with the reason and its pool slots are freed, so later runs do not wait forever.

Run monitoring does this only under the daemon and only for runs that ended; the CLI calls `recover` before
each run and `wait_for_pools` instead of letting Dagster's in-process executor poll a blocked slot in a busy
loop; `dead_run_sensor` does the same for `dagster dev`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import dagster as dg
import psutil
from dagster._core.events import DagsterEventType

from em_assets.defs.partitions import GPU_POOL
from em_assets.settings import SettingsError

log = logging.getLogger("em_assets.recovery")

_ACTIVE = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
_WAITING = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.QUEUED]
# A run queued or going: until it ends, it may still write its partition's files and rows.
IN_PROGRESS = _WAITING + _ACTIVE
# Events that name the process doing a run's work: the run worker (or in-process caller), its step workers,
# and the launcher's "started process" engine event of a run that has not started yet.
_PID_EVENTS = {DagsterEventType.RUN_START, DagsterEventType.STEP_START, DagsterEventType.ENGINE_EVENT}
# Process start times and event times come from different clocks' roundings; allow this much.
_CLOCK_SLACK_S = 2.0


def partitions_in_progress(instance: dg.DagsterInstance) -> set[str]:
    """Organism partitions with a run queued, running or being cancelled."""
    # Any job's: the UI's Materialize button and backfills run the organism assets in the asset job, not
    # organism_job. The organism partitions are the only ones, so a partition tag names an organism.
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=IN_PROGRESS))
    return {run.tags.get("dagster/partition", "") for run in runs}


def job_in_progress(instance: dg.DagsterInstance, job_name: str) -> bool:
    """Whether a run of the job is queued, running or being cancelled."""
    return bool(instance.get_runs(filters=dg.RunsFilter(statuses=IN_PROGRESS, job_name=job_name), limit=1))


@dataclass(frozen=True)
class DeadRun:
    run_id: str
    job_name: str
    partition: str
    pids: tuple[int, ...]

    @property
    def reason(self) -> str:
        pids = ", ".join(map(str, self.pids))
        return (
            f"marked failed by em-assets recovery: the process(es) running it (pid {pids}) are gone "
            "(killed or crashed); its pool slots were freed"
        )


@dataclass(frozen=True)
class SlotHolder:
    run_id: str
    step_key: str
    job_name: str
    partition: str
    status: str


def _alive(pid: int, since: float) -> bool:
    """True when `pid` is a live (non-zombie) process started no later than `since` (a reused pid is not it)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= since + _CLOCK_SLACK_S
    except psutil.Error:
        return False


def _run_pids(instance: dg.DagsterInstance, run_id: str) -> dict[int, float]:
    """Every process recorded as working on the run, with the time it was first seen."""
    pids: dict[int, float] = {}
    for entry in instance.all_logs(run_id, of_type=_PID_EVENTS):
        event = entry.dagster_event
        if event is None:
            continue
        if event.event_type != DagsterEventType.ENGINE_EVENT:
            found = event.pid
        else:
            # An engine event's own pid may be the webserver's; only the process it names counts.
            meta = getattr(event.event_specific_data, "metadata", None) or {}
            value = str(meta["pid"].value) if "pid" in meta else ""
            found = int(value) if value.isdigit() else None
        if found:
            pids.setdefault(found, entry.timestamp)
    return pids


def _local_storage(instance: dg.DagsterInstance) -> bool:
    """Runs in a file-backed (SQLite) instance ran on this machine, so their pids are this machine's; with a
    shared database (Postgres) they may run on other hosts, and run monitoring in the daemon judges them."""
    from dagster._core.storage.runs import InMemoryRunStorage, SqliteRunStorage

    return isinstance(instance.run_storage, SqliteRunStorage | InMemoryRunStorage)


def find_dead_runs(instance: dg.DagsterInstance) -> list[DeadRun]:
    """Active runs none of whose recorded processes is alive (a reused pid is not the run's process)."""
    if not _local_storage(instance):
        return []
    dead = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=_ACTIVE)):
        pids = _run_pids(instance, run.run_id)
        # No process recorded yet: still being launched, run monitoring's start timeout covers it. This
        # process's own runs are alive by _alive's start-time test; a dead run whose pid this process reuses (a
        # container's fixed pid) is not.
        if not pids:
            continue
        if not any(_alive(pid, since) for pid, since in pids.items()):
            dead.append(
                DeadRun(run.run_id, run.job_name, run.tags.get("dagster/partition", ""), tuple(sorted(pids)))
            )
    return dead


def _finished_slot_holders(instance: dg.DagsterInstance) -> set[str]:
    """Runs that ended but still hold pool slots (a crashed step never releases its own)."""
    storage = instance.event_log_storage
    held = {slot.run_id for key in storage.get_concurrency_keys() for slot in _claimed(instance, key)}
    return {
        run_id
        for run_id in held
        if (run := instance.get_run_by_id(run_id)) is None or run.status not in IN_PROGRESS
    }


def _claimed(instance: dg.DagsterInstance, pool: str) -> list:
    return list(instance.event_log_storage.get_concurrency_info(pool).claimed_slots)


def recover(instance: dg.DagsterInstance, say: Callable[[str], None] = log.info) -> list[DeadRun]:
    """Fail every dead run with the reason and free its slots, and free slots that ended runs still hold."""
    dead = find_dead_runs(instance)
    for run in dead:
        dagster_run = instance.get_run_by_id(run.run_id)
        if dagster_run is not None:
            instance.report_run_failed(dagster_run, message=run.reason)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        say(
            f"recovered dead run {run.run_id[:8]} ({' '.join(filter(None, [run.job_name, run.partition]))}): {run.reason}"
        )
    for run_id in _finished_slot_holders(instance):
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
        say(f"freed the pool slots still held by ended run {run_id[:8]}")
    return dead


def slot_holders(instance: dg.DagsterInstance, pool: str) -> list[SlotHolder]:
    """Who holds the pool's slots now."""
    holders = []
    for slot in _claimed(instance, pool):
        run = instance.get_run_by_id(slot.run_id)
        holders.append(
            SlotHolder(
                slot.run_id,
                slot.step_key,
                run.job_name if run else "?",
                run.tags.get("dagster/partition", "") if run else "",
                run.status.value if run else "deleted",
            )
        )
    return holders


def wait_for_pools(
    instance: dg.DagsterInstance,
    pools: Iterable[str] = (GPU_POOL,),
    say: Callable[[str], None] = log.info,
    poll_s: float = 2.0,
    report_every_s: float = 60.0,
) -> float:
    """Sleep until every pool has a free slot, recovering dead holders on the way; returns the seconds waited.
    SettingsError where a pool has no slots at all."""
    start, last_report = time.monotonic(), -report_every_s
    while True:
        recover(instance, say)
        busy = {}
        for pool in pools:
            limit = instance.event_log_storage.get_concurrency_info(pool).limit
            if limit == 0:
                # Nothing would ever free a slot: waiting would never end.
                raise SettingsError(
                    f"the Dagster instance gives pool {pool!r} no slots, so none of its steps can run: "
                    f"`dagster instance concurrency set {pool} 1`"
                )
            holders = slot_holders(instance, pool)
            if limit is not None and len(holders) >= limit:
                busy[pool] = holders
        if not busy:
            return time.monotonic() - start
        if time.monotonic() - last_report >= report_every_s:
            last_report = time.monotonic()
            for pool, holders in busy.items():
                names = "; ".join(
                    f"run {h.run_id} ({h.job_name} {h.partition}, step {h.step_key})" for h in holders
                )
                say(f"waiting for a slot of pool {pool!r}, held by {names}")
        time.sleep(poll_s)


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Fails runs whose processes are gone (killed or crashed) and frees the pool slots they hold.",
)
def dead_run_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    dead = recover(context.instance, context.log.info)
    if dead:
        return dg.SkipReason(f"failed {len(dead)} dead run(s): {', '.join(r.run_id for r in dead)}")
    return dg.SkipReason("no dead runs")


SENSORS = [dead_run_sensor]
