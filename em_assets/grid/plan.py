"""What the grid sensor should do now: pure planning from the grid, its cursor and what the instance holds."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from em_assets.grid.schema import BaseModelSpec, GridConfig, config_hash

# The trained judges are part of the catalog: organisms are judged by them, so they must exist before they run;
# so must judge_agreement, whose error rates correct the sweeps' EM rates when an organism's run computes them.
CATALOG_ASSETS = (
    "base_models",
    "training_datasets",
    "eval_questions",
    "reference_judgements",
    "distilled_judge",
    "probe_judge",
    "judge_agreement",
)


class GridCursor(BaseModel):
    """What the grid sensor has acted on: base model and threshold fingerprints, and organisms waiting for the
    catalog."""

    models: dict[str, str] = {}
    thresholds: str = ""
    pending: list[str] = []
    # When `pending` last grew: only catalog materializations of runs started later read the grid it was for.
    since: float = 0.0


@dataclass(frozen=True)
class GridPlan:
    """Partitions to add, runs to request (a catalog run key, or organism (partition, run key) pairs)."""

    cursor: GridCursor
    new_partitions: list[str] = field(default_factory=list)
    catalog_run_key: str | None = None
    organism_runs: list[tuple[str, str]] = field(default_factory=list)
    skip_reason: str | None = None


def model_fingerprint(spec: BaseModelSpec) -> str:
    """What makes a base model's organisms stale when it changes: grid text only, never the model files."""
    return config_hash({"source": spec.source, "revision": spec.revision})


def plan_grid(
    grid: GridConfig, cursor: GridCursor, existing: set[str], marks: dict[str, float], now: float
) -> GridPlan:
    """New organisms, changed base models and changed thresholds first go through the catalog, then get one
    organism run each. `marks`: per catalog asset, when the run behind its latest materialization started."""
    fingerprints = {spec.name: model_fingerprint(spec) for spec in grid.base_models}
    # A model the cursor has not seen yet is the baseline, not a change: its new organisms are caught below.
    changed = {name for name, fp in fingerprints.items() if cursor.models.get(name, fp) != fp}
    # The probe's calibration, the judge's error rates, the sweeps' rates and the EM directions are all taken
    # at the thresholds, so a change redoes every organism (its adapter, answers and scores come from caches).
    thresholds = config_hash(grid.thresholds.model_dump(mode="json"))
    rethreshold = cursor.thresholds not in ("", thresholds)
    work = [
        o.key for o in grid.organisms() if o.key not in existing or o.base_model in changed or rethreshold
    ]
    seen = {**cursor.models, **fingerprints}
    if work:
        # Organism assets read base models and datasets from the catalog tables, so a new model or revision
        # must be resolved there first; the runs are held until a catalog run started after now has materialised
        # every catalog asset.
        pending = list(dict.fromkeys([*cursor.pending, *work]))
        after = GridCursor(models=seen, thresholds=thresholds, pending=pending, since=now)
        return GridPlan(
            cursor=after,
            new_partitions=[key for key in work if key not in existing],
            catalog_run_key=f"catalog:{config_hash(after.model_dump(mode='json'))}",
        )
    if not cursor.pending:
        return GridPlan(
            cursor=GridCursor(models=seen, thresholds=thresholds),
            skip_reason="every organism has a partition; no base model source or revision, nor the thresholds, changed",
        )
    # A catalog run that started before the change (still running when it came) may not have read it.
    behind = [name for name in CATALOG_ASSETS if marks[name] <= cursor.since]
    if behind:
        return GridPlan(
            cursor=cursor.model_copy(update={"models": seen}),
            skip_reason=f"{len(cursor.pending)} organism runs wait for catalog_job to materialise "
            f"{', '.join(behind)} (launch catalog_job if its run failed)",
        )
    in_grid = {o.key for o in grid.organisms()}
    ready = [key for key in cursor.pending if key in in_grid and key in existing]
    # The catalog marks make the key unique per catalog rebuild, so reverting a revision re-runs too.
    stamp = config_hash(marks)
    return GridPlan(
        cursor=GridCursor(models=seen, thresholds=thresholds),
        organism_runs=[(key, f"{key}@{stamp}") for key in ready],
        skip_reason=None if ready else "the pending organisms left the grid",
    )
