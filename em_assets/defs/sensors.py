"""Sensors: the grid sensor turns grid changes into partitions and runs; the automation sensor runs reports."""

import time

import dagster as dg

from em_assets.defs.jobs import catalog_job, organism_job, reports_job
from em_assets.defs.partitions import organisms
from em_assets.defs.recovery import partitions_in_progress
from em_assets.defs.resources import ExperimentResource
from em_assets.grid.load import GridError
from em_assets.grid.plan import CATALOG_ASSETS, GridCursor, plan_grid


def _catalog_marks(instance: dg.DagsterInstance) -> dict[str, float]:
    """Per catalog asset, the latest start of a run behind one of its last materializations (a runless event:
    its time). Runs may finish out of order, so not only the last is read."""
    marks = dict.fromkeys(CATALOG_ASSETS, 0.0)
    # One catalog run materialises every catalog asset: its record is read once a tick.
    starts: dict[str, float | None] = {}
    for name in CATALOG_ASSETS:
        for record in instance.fetch_materializations(dg.AssetKey(name), limit=4).records:
            if record.run_id and record.run_id not in starts:
                run = instance.get_run_record_by_id(record.run_id)
                starts[record.run_id] = run.start_time if run else None
            marks[name] = max(marks[name], starts.get(record.run_id) or record.timestamp)
    return marks


@dg.sensor(
    jobs=[catalog_job, organism_job, reports_job],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Adds a partition for every new organism of the grid and marks organisms stale when their settings "
        "change: a base model's source or revision (its organisms), a recipe (its organisms), the sampling, eval "
        "questions, judge or EM thresholds (every organism it applies to); runs catalog_job, then organism_job for "
        "each of them once no run of it is in progress; runs reports_job when organisms leave the grid."
    ),
)
def grid_sensor(context: dg.SensorEvaluationContext, experiment: ExperimentResource) -> dg.SensorResult:
    try:
        grid = experiment.grid()
    except GridError as exc:
        return dg.SensorResult(skip_reason=f"grid is invalid, nothing requested: {exc}")
    plan = plan_grid(
        grid,
        GridCursor.model_validate_json(context.cursor or "{}"),
        set(context.instance.get_dynamic_partitions(organisms.name)),
        _catalog_marks(context.instance),
        time.time(),
    )
    # A run still going (a long training) would get a twin writing the same adapter folder and rows wherever the
    # gpu pool has more than one slot: its organism stays pending, released on a tick after that run ends.
    going = partitions_in_progress(context.instance) if plan.organism_runs else set()
    held = [k for k, _ in plan.organism_runs if k in going]
    runs = [
        dg.RunRequest(job_name=organism_job.name, partition_key=k, run_key=r)
        for k, r in plan.organism_runs
        if k not in going
    ]
    if plan.catalog_run_key:
        runs.append(dg.RunRequest(job_name=catalog_job.name, run_key=plan.catalog_run_key))
    if plan.reports_run_key:
        runs.append(dg.RunRequest(job_name=reports_job.name, run_key=plan.reports_run_key))
    waiting = None if runs or not held else f"{len(held)} organism runs wait for runs of theirs in progress"
    return dg.SensorResult(
        run_requests=runs,
        dynamic_partitions_requests=[organisms.build_add_request(plan.new_partitions)]
        if plan.new_partitions
        else [],
        skip_reason=plan.skip_reason or waiting,
        cursor=(plan.cursor.model_copy(update={"pending": held}) if held else plan.cursor).model_dump_json(),
    )


# Without an explicit sensor, 1.13 creates `default_automation_condition_sensor` in the STOPPED state, and
# the eager report assets would never be evaluated.
automation_sensor = dg.AutomationConditionSensorDefinition(
    "automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Evaluates automation conditions: reports rebuild when judgements change.",
)

SENSORS = [grid_sensor, automation_sensor]
