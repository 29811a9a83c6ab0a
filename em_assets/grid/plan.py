"""What the grid sensor should do now: pure planning from the grid, its cursor and what the instance holds."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from em_assets.grid.schema import BaseModelSpec, GridConfig, Organism, config_hash

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
    """What the grid sensor has acted on: base model, organism and threshold fingerprints, and organisms waiting
    for the catalog."""

    models: dict[str, str] = {}
    # Per organism key; a cursor from before this field reads as empty, so every organism is a baseline.
    organisms: dict[str, str] = {}
    thresholds: str = ""
    pending: list[str] = []
    # When `pending` last grew: only catalog materializations of runs started later read the grid it was for.
    since: float = 0.0
    # The organisms the grid listed: one it no longer lists is named by the reports' organisms_in_grid check,
    # which only a rebuild reads. Empty in a cursor from before the field: the baseline.
    in_grid: list[str] = []


@dataclass(frozen=True)
class GridPlan:
    """Partitions to add, runs to request (a catalog run key, or organism (partition, run key) pairs)."""

    cursor: GridCursor
    new_partitions: list[str] = field(default_factory=list)
    catalog_run_key: str | None = None
    organism_runs: list[tuple[str, str]] = field(default_factory=list)
    # A reports run: organisms left the grid and nothing else would rebuild the reports.
    reports_run_key: str | None = None
    skip_reason: str | None = None


def model_fingerprint(spec: BaseModelSpec) -> str:
    """What makes a base model's organisms stale when it changes: grid text only, never the model files."""
    return config_hash({"source": spec.source, "revision": spec.revision})


def _given(spec: BaseModel | None, exclude: set[str] | None = None) -> dict | None:
    """A spec's settings away from their defaults, so that a setting the schema gains later changes no
    fingerprint."""
    return spec.model_dump(mode="json", exclude_defaults=True, exclude=exclude) if spec else None


def organism_fingerprint(grid: GridConfig, organism: Organism) -> str:
    """What makes an organism stale besides its base model: its recipe (an imported one's own entry), sampling,
    eval questions and judge, as the grid text gives them."""
    return config_hash(
        {
            # An imported recipe's other organisms are not this one's settings: adding one re-runs no other; nor
            # are the other base models a trained recipe runs on.
            "recipe": _given(grid.recipes[organism.recipe], exclude={"organisms", "base_models"}),
            "source": _given(grid.organism_source(organism)),
            "sampling": _given(grid.sampling_for(organism.base_model)),
            "eval": _given(grid.eval),
            "judge": _given(grid.judge),
        }
    )


def plan_grid(
    grid: GridConfig, cursor: GridCursor, existing: set[str], marks: dict[str, float], now: float
) -> GridPlan:
    """New organisms, changed base models, organism settings and thresholds first go through the catalog, then get
    one organism run each. `marks`: per catalog asset, when the run behind its latest materialization started."""
    fingerprints = {spec.name: model_fingerprint(spec) for spec in grid.base_models}
    # The probe's calibration, the judge's error rates, the sweeps' rates and the EM directions are all taken
    # at the thresholds, so a change redoes every organism (its adapter, answers and scores come from caches).
    thresholds = config_hash(grid.thresholds.model_dump(mode="json"))
    organisms = grid.organisms()
    settings = {o.key: organism_fingerprint(grid, o) for o in organisms}
    work = _stale(cursor, organisms, existing, fingerprints, settings, thresholds)
    settled = GridCursor(
        models={**cursor.models, **fingerprints},
        organisms={**cursor.organisms, **settings},
        thresholds=thresholds,
        in_grid=sorted(settings),
    )
    if work:
        return _catalog_plan(cursor, settled, work, existing, now)
    if not cursor.pending:
        return _idle_plan(cursor, settled)
    return _pending_plan(cursor, settled, existing, marks)


def _stale(
    cursor: GridCursor,
    organisms: list[Organism],
    existing: set[str],
    fingerprints: dict[str, str],
    settings: dict[str, str],
    thresholds: str,
) -> list[str]:
    """The organisms to (re)run: new partitions, changed base models or settings, or any after new thresholds."""
    # A model the cursor has not seen yet is the baseline, not a change: its new organisms are caught below.
    changed = {name for name, fp in fingerprints.items() if cursor.models.get(name, fp) != fp}
    rethreshold = cursor.thresholds not in ("", thresholds)
    # As with models, an organism the cursor has not seen is the baseline (a new one is caught by its partition).
    resettled = {key for key, fp in settings.items() if cursor.organisms.get(key, fp) != fp}
    return [
        o.key
        for o in organisms
        if o.key not in existing or o.base_model in changed or o.key in resettled or rethreshold
    ]


def _catalog_plan(
    cursor: GridCursor, settled: GridCursor, work: list[str], existing: set[str], now: float
) -> GridPlan:
    """Add the new partitions and request a catalog run; `work` waits in the cursor until it has run."""
    # Organism assets read base models and datasets from the catalog tables, so a new model or revision
    # must be resolved there first; the runs are held until a catalog run started after now has materialised
    # every catalog asset.
    pending = list(dict.fromkeys([*cursor.pending, *work]))
    after = settled.model_copy(update={"pending": pending, "since": now})
    return GridPlan(
        cursor=after,
        new_partitions=[key for key in work if key not in existing],
        catalog_run_key=f"catalog:{config_hash(after.model_dump(mode='json'))}",
    )


def _idle_plan(cursor: GridCursor, settled: GridCursor) -> GridPlan:
    """Nothing to run: a reports run if organisms left the grid, else a skip."""
    if set(cursor.in_grid) - set(settled.in_grid):
        return GridPlan(cursor=settled, reports_run_key=f"reports:{config_hash(settled.in_grid)}")
    return GridPlan(
        cursor=settled,
        skip_reason="every organism has a partition; no base model source or revision, organism setting "
        "(recipe, sampling, eval, judge) or threshold changed",
    )


def _pending_plan(
    cursor: GridCursor, settled: GridCursor, existing: set[str], marks: dict[str, float]
) -> GridPlan:
    """The waiting organisms' runs once every catalog asset is newer than the change, else a skip that says why."""
    # A catalog run that started before the change (still running when it came) may not have read it.
    behind = [name for name in CATALOG_ASSETS if marks[name] <= cursor.since]
    if behind:
        seen = {"models": settled.models, "organisms": settled.organisms, "in_grid": settled.in_grid}
        return GridPlan(
            cursor=cursor.model_copy(update=seen),
            skip_reason=f"{len(cursor.pending)} organism runs wait for catalog_job to materialise "
            f"{', '.join(behind)} (launch catalog_job if its run failed)",
        )
    in_grid = set(settled.in_grid)
    ready = [key for key in cursor.pending if key in in_grid and key in existing]
    # The catalog marks make the key unique per catalog rebuild, so reverting a revision re-runs too.
    stamp = config_hash(marks)
    return GridPlan(
        cursor=settled,
        organism_runs=[(key, f"{key}@{stamp}") for key in ready],
        skip_reason=None if ready else "the pending organisms left the grid",
    )
