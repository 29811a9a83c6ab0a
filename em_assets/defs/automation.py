"""Jobs, the grid sensor that turns grid changes into partitions and runs, declarative automation, catch-up."""

import dagster as dg
from pydantic import BaseModel

from em_assets.defs.partitions import organisms
from em_assets.defs.resources import ExperimentResource
from em_assets.grid.load import GridError
from em_assets.grid.schema import BaseModelSpec, config_hash

# The distilled judge is part of the catalog: organisms are judged by it, so it must exist before they run.
CATALOG_ASSETS = [
    "base_models",
    "training_datasets",
    "eval_questions",
    "reference_judgements",
    "distilled_judge",
]

# judge_agreement runs with the catalog (cheap once its scores are cached) so the reports that follow can
# state how far the judge agrees with GPT-4o.
catalog_job = dg.define_asset_job(
    "catalog_job",
    selection=[*CATALOG_ASSETS, "judge_agreement"],
    description="Pin the inputs, train the distilled judge and measure the judge against GPT-4o.",
)
organism_job = dg.define_asset_job(
    "organism_job",
    selection=dg.AssetSelection.assets("lora_adapter", "completions", "judgements"),
    description="Train, sample and judge one organism.",
)
reports_job = dg.define_asset_job(
    "reports_job",
    selection=dg.AssetSelection.groups("reports"),
    description="Rebuild every EM table and figure from the results database.",
)


class GridCursor(BaseModel):
    """What the grid sensor has acted on: base model fingerprints, and organisms waiting for the catalog."""

    models: dict[str, str] = {}
    pending: list[str] = []
    # Latest catalog materialization storage ids when `pending` last grew; a larger id means a newer run.
    marks: dict[str, int] = {}


def model_fingerprint(spec: BaseModelSpec) -> str:
    """What makes a base model's organisms stale when it changes: grid text only, never the model files."""
    return config_hash({"source": spec.source, "revision": spec.revision})


def _catalog_marks(instance: dg.DagsterInstance) -> dict[str, int]:
    marks = {}
    for name in CATALOG_ASSETS:
        records = instance.fetch_materializations(dg.AssetKey(name), limit=1).records
        marks[name] = records[0].storage_id if records else 0
    return marks


@dg.sensor(
    jobs=[catalog_job, organism_job],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Adds a partition for every new organism of the grid and, when a base model's source or revision "
        "changes, marks its organisms stale; runs catalog_job, then organism_job for each of them."
    ),
)
def grid_sensor(context: dg.SensorEvaluationContext, experiment: ExperimentResource) -> dg.SensorResult:
    try:
        grid = experiment.grid()
    except GridError as exc:
        return dg.SensorResult(skip_reason=f"grid is invalid, nothing requested: {exc}")
    cursor = GridCursor.model_validate_json(context.cursor or "{}")
    existing = set(context.instance.get_dynamic_partitions(organisms.name))
    fingerprints = {spec.name: model_fingerprint(spec) for spec in grid.base_models}
    # A model the cursor has not seen yet is the baseline, not a change: its new organisms are caught below.
    changed = {name for name, fp in fingerprints.items() if cursor.models.get(name, fp) != fp}
    work = [o.key for o in grid.organisms() if o.key not in existing or o.base_model in changed]
    marks = _catalog_marks(context.instance)
    seen = {**cursor.models, **fingerprints}

    if work:
        # Organism assets read base models and datasets from the catalog tables, so a new model or revision
        # must be resolved there first; the runs are held until the catalog has been materialised again.
        pending = list(dict.fromkeys([*cursor.pending, *work]))
        new = [key for key in work if key not in existing]
        after = GridCursor(models=seen, pending=pending, marks=marks)
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    job_name=catalog_job.name, run_key=f"catalog:{config_hash(after.model_dump(mode='json'))}"
                )
            ],
            dynamic_partitions_requests=[organisms.build_add_request(new)] if new else [],
            cursor=after.model_dump_json(),
        )

    if cursor.pending:
        behind = [name for name in CATALOG_ASSETS if marks[name] <= cursor.marks.get(name, 0)]
        if behind:
            return dg.SensorResult(
                skip_reason=f"{len(cursor.pending)} organism runs wait for catalog_job to materialise "
                f"{', '.join(behind)} (launch catalog_job if its run failed)",
                cursor=GridCursor(models=seen, pending=cursor.pending, marks=cursor.marks).model_dump_json(),
            )
        in_grid = {o.key for o in grid.organisms()}
        ready = [key for key in cursor.pending if key in in_grid and key in existing]
        # The catalog marks make the key unique per catalog rebuild, so reverting a revision re-runs too.
        stamp = config_hash(marks)
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(job_name=organism_job.name, partition_key=key, run_key=f"{key}@{stamp}")
                for key in ready
            ],
            skip_reason=None if ready else "the pending organisms left the grid",
            cursor=GridCursor(models=seen).model_dump_json(),
        )

    return dg.SensorResult(
        skip_reason="every organism has a partition and no base model source or revision changed",
        cursor=GridCursor(models=seen).model_dump_json(),
    )


# Without an explicit sensor, 1.13 creates `default_automation_condition_sensor` in the STOPPED state, and
# the eager report assets would never be evaluated.
automation_sensor = dg.AutomationConditionSensorDefinition(
    "automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Evaluates automation conditions: reports rebuild when judgements change.",
)


@dg.schedule(
    job=organism_job,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=(
        "Daily: one organism_job run per organism partition of the grid; finished, current work is skipped "
        "by the assets, so this retries what failed or is missing."
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
    return [dg.RunRequest(partition_key=key, run_key=key) for key in keys]


JOBS = [catalog_job, organism_job, reports_job]
SENSORS = [grid_sensor, automation_sensor]
SCHEDULES = [catch_up_schedule]
