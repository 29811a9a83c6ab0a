"""Schedules: a daily catch-up run of every organism of the grid (current work is skipped by the assets)."""

import dagster as dg

from em_assets.defs.jobs import catalog_job, organism_job
from em_assets.defs.partitions import organisms
from em_assets.defs.recovery import job_in_progress, partitions_in_progress
from em_assets.defs.resources import ExperimentResource
from em_assets.grid.load import GridError


@dg.schedule(
    job=organism_job,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=(
        "Daily: one organism_job run per organism partition of the grid without a run in progress; finished, "
        "current work is skipped by the assets, so this retries what failed or is missing."
    ),
)
def catch_up_schedule(
    context: dg.ScheduleEvaluationContext, experiment: ExperimentResource
) -> list[dg.RunRequest] | dg.SkipReason:
    try:
        grid = experiment.grid()
    except GridError as exc:
        return dg.SkipReason(f"grid is invalid, nothing requested: {exc}")
    existing = set(context.instance.get_dynamic_partitions(organisms.name))
    # Organisms without a partition are the grid sensor's: it runs the catalog before their first run.
    keys = [o.key for o in grid.organisms() if o.key in existing]
    if not keys:
        return dg.SkipReason("no organism of the grid has a partition yet")
    # The grid sensor holds organisms for a catalog run it started (a new model, a changed revision): run now,
    # they would read the catalog from before the change.
    if job_in_progress(context.instance, catalog_job.name):
        return dg.SkipReason(
            "a catalog_job run is in progress; the grid sensor runs the organisms waiting for it"
        )
    # A schedule's run keys are unique per tick only: a run still going (a long training) would get a twin that
    # writes the same adapter folder and rows wherever the gpu pool has more than one slot.
    going = partitions_in_progress(context.instance)
    todo = [key for key in keys if key not in going]
    if not todo:
        return dg.SkipReason(f"every organism of the grid has a run in progress ({len(keys)})")
    return [dg.RunRequest(partition_key=key, run_key=key) for key in todo]


SCHEDULES = [catch_up_schedule]
