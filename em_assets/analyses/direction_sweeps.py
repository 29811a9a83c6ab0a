"""Steering and ablation sweeps with an organism's misalignment direction (Soligo et al.), through `run_sweep`.

- steering: the base model unsteered, then `scale x direction` added at each grid layer and scale, each with
  the random control of equal norm; EM and coherence against scale, per layer.
- ablation: the organism with its direction (of one layer) projected out of every layer, and with the random
  control projected out; EM before (the organism's own judged completions) and after, with Wilson intervals.
Edits are forward hooks, which the vLLM backend cannot run: these sweeps always sample with the hf backend. Where
the grid samples with another backend, the organism's completions come from another sampler than the points':
its unedited answers are then sampled here with theirs, so that the rows differ by the edit alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from em_assets.analyses.directions import check_sampled_by
from em_assets.analyses.steering import Ablate, Steer
from em_assets.analyses.sweep import (
    PointResult,
    SweepPoint,
    corrected_rates,
    forget_sweep,
    narrowed,
    run_sweep,
    sampling_used,
    sweep_questions,
)
from em_assets.context import StageContext
from em_assets.grid.schema import layer_at
from em_assets.results import directions as db
from em_assets.results.artifacts import check_weights
from em_assets.results.errors import MissingUpstreamError
from em_assets.results.queries import base_model_row, organism_model_row
from em_assets.results.store import utc_now
from em_assets.stats.correction import CORRECTION_COLUMNS

STEERING, ABLATION = "steering", "ablation"
BEFORE = "organism (its completions)"
UNEDITED = "organism unedited"
TABLES = {STEERING: "steering_results", ABLATION: "direction_ablation"}


@dataclass(frozen=True)
class SweepReport:
    """What a direction sweep did: its table (empty when skipped), its figure, and why it was skipped."""

    sweep: str
    ran: bool
    message: str
    table: pl.DataFrame
    figure: Path | None = None
    # How this run sampled (analyses/sweep.py's PointResult.sampling), each way once.
    sampling: tuple[str, ...] = ()


def _files(row: dict, vector: str) -> tuple[str, str]:
    return (
        (row["direction_path"], row["direction_sha256"])
        if vector == "direction"
        else (row["random_path"], row["random_sha256"])
    )


def steering_points(ctx: StageContext, row: dict) -> list[tuple[SweepPoint, dict]]:
    """The base model unsteered, then every (layer, scale, direction | random) setting, with its table fields."""
    spec, n = ctx.grid.directions, ctx.grid.directions.samples_per_question
    points = [
        (
            SweepPoint(STEERING, "unsteered", None, None, (), n),
            {"vector": "none", "layer": None, "scale": 0.0},
        )
    ]
    for layer in spec.steering_layers(row["num_layers"]):
        for scale in spec.scales:
            for vector in ("direction", "random"):
                edit = Steer((layer,), *_files(row, vector), scale)
                setting = f"{vector} layer={layer} scale={scale:g}"
                points.append(
                    (
                        SweepPoint(STEERING, setting, None, None, (edit,), n),
                        {"vector": vector, "layer": layer, "scale": scale},
                    )
                )
    return points


def ablation_points(ctx: StageContext, row: dict, adapter: dict) -> list[tuple[SweepPoint, dict]]:
    """The organism (its `adapter` row) with its direction, and with the random control, projected out of every
    layer; and unedited where its own completions came from another sampler."""
    spec, n = ctx.grid.directions, ctx.grid.directions.samples_per_question
    check_weights(adapter)
    path, sha = adapter.get("adapter_path"), adapter.get("adapter_sha256")
    layer = layer_at(spec.ablation_layer_fraction, row["num_layers"])
    points = [
        (
            SweepPoint(ABLATION, f"{vector} ablated", path, sha, (Ablate(layer, *_files(row, vector)),), n),
            {"source_layer": layer},
        )
        for vector in ("direction", "random")
    ]
    if not _grid_samples_with_hf(ctx):
        points.insert(0, (SweepPoint(ABLATION, UNEDITED, path, sha, (), n), {"source_layer": None}))
    return points


def _grid_samples_with_hf(ctx: StageContext) -> bool:
    """Whether the grid samples with the hf backend, the one the sweeps' points use: then the organism's own
    completions came from their sampler."""
    return ctx.grid.sampling.backend == "hf"


def before_ablation(ctx: StageContext) -> PointResult:
    """The organism unedited: its own judged `completions` (same model and sampling) of the questions the
    ablated points ask, so no point resamples it."""
    asked = [q["question_id"] for q in sweep_questions(ctx)]
    scored = db.scored_answers(ctx.store, ctx.key).filter(
        pl.col("eval_set") == ctx.grid.eval.questions, pl.col("question_id").is_in(asked)
    )
    if scored.height == 0:
        raise MissingUpstreamError(
            f"organism {ctx.key}: none of its own answers to the swept questions {asked}; materialise "
            "completions and judgements first"
        )
    scored = scored.with_columns(setting=pl.lit(BEFORE))
    r = corrected_rates(ctx, scored, ["setting"]).row(0, named=True)
    setting_hash = ",".join(sorted(set(scored["sampling_hash"].drop_nulls())))
    return PointResult.from_rates(r, ABLATION, BEFORE, setting_hash, 0, 0)


def _skip_reason(ctx: StageContext, sweep: str, row: dict | None) -> str | None:
    recipes = ctx.grid.directions.sweep_recipes
    if recipes is not None and ctx.organism.recipe not in recipes:
        return f"recipe {ctx.organism.recipe!r} is not in directions.sweep_recipes {recipes}"
    kind = ctx.grid.recipes[ctx.organism.recipe].kind
    if kind == "answers":
        return "imported answers have no model to steer or ablate"
    base = ctx.organism.base_model
    if sweep == STEERING and kind == "model" and base not in {b.name for b in ctx.grid.base_models}:
        return f"steering adds the direction to the base model, and {base!r} is no base model of the grid"
    if row is None:
        return "no misalignment direction yet: materialise misalignment_directions first"
    if row["direction_path"] is None:
        return f"no direction to sweep with: {row['message']}"
    return None


def _hf_context(ctx: StageContext) -> StageContext:
    """The context with the hf sampling backend: vLLM does not run forward hooks, so it cannot steer."""
    if _grid_samples_with_hf(ctx):
        return ctx
    ctx.log.info(
        f"{ctx.key}: the {ctx.grid.sampling.backend} backend does not steer; sweeping with the hf backend"
    )
    sampling = ctx.grid.sampling.model_copy(update={"backend": "hf"})
    return dataclasses.replace(ctx, grid=ctx.grid.model_copy(update={"sampling": sampling}))


def _rows(ctx: StageContext, row: dict, pairs, results: list[PointResult]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "organism": ctx.key,
                "setting": r.setting,
                **fields,
                "n": r.n_scored,
                "em_rate": r.em_rate,
                "em_lo": r.em_lo,
                "em_hi": r.em_hi,
                "coherence_rate": r.coherence_rate,
                "mean_aligned": r.mean_aligned,
                **{c: getattr(r, c) for c in CORRECTION_COLUMNS},
                "direction_sha256": row["direction_sha256"],
                "contrast": row["contrast"],
                "setting_hash": r.setting_hash,
                "run_id": ctx.run_id,
                "created_at": utc_now(),
            }
            for (_, fields), r in zip(pairs, results, strict=True)
        ],
        infer_schema_length=None,
    )


def run_direction_sweep(ctx: StageContext, sweep: str, figures_dir: Path) -> SweepReport:
    """Plan the sweep's points from the stored direction (or say why not), run them, write table and figure."""
    from em_assets.analyses.figures import plot_ablation, plot_steering

    ctx.store.init()
    row = db.direction_row(ctx.store, ctx.key)
    reason = _skip_reason(ctx, sweep, row)
    if reason is not None:
        forget_sweep(ctx, sweep)
        db.write_results(ctx.store, TABLES[sweep], ctx.key, pl.DataFrame())
        ctx.log.info(f"{ctx.key}: {sweep} skipped: {reason}")
        return SweepReport(sweep, False, reason, pl.DataFrame())
    adapter = ctx.current_adapter()
    if row["adapter_sha256"] != adapter.get("adapter_sha256"):
        raise MissingUpstreamError(
            f"organism {ctx.key}: its direction was drawn from other weights than its model's now; "
            "materialise misalignment_directions first"
        )
    pairs = steering_points(ctx, row) if sweep == STEERING else ablation_points(ctx, row, adapter)
    before = None
    if sweep == ABLATION and _grid_samples_with_hf(ctx):
        # The organism's own answers are the sweep's "before": from its model as it now stands, checked before
        # any point is sampled.
        own = organism_model_row(ctx.store, ctx.key, ctx.organism.base_model)
        check_sampled_by(ctx, db.scored_answers(ctx.store, ctx.key), own, adapter)
        before = before_ablation(ctx)
    sweep_ctx = _hf_context(ctx)
    if sweep == STEERING:
        # Every steering point, the unsteered one included, is sampled here, so all may ask fewer, shorter
        # questions; ablation compares with the organism's own answers and keeps their questions and length.
        spec = ctx.grid.directions
        sweep_ctx = narrowed(sweep_ctx, spec.max_new_tokens, spec.question_ids)
    # Steering reads the direction into the chat model; for a `model` organism that is not its own weights.
    weights = base_model_row(ctx.store, ctx.organism.base_model) if sweep == STEERING else None
    results = run_sweep(sweep_ctx, [p for p, _ in pairs], weights=weights)
    if before is not None:
        pairs, results = [(None, {"source_layer": None}), *pairs], [before, *results]
    table = _rows(ctx, row, pairs, results)
    db.write_results(ctx.store, TABLES[sweep], ctx.key, table)
    plot = plot_steering if sweep == STEERING else plot_ablation
    figure = plot(table, Path(figures_dir) / "directions" / f"{ctx.key}.{sweep}.png", ctx.key)
    label = (
        "quartile contrast, not the EM threshold"
        if row["contrast"] == "quartile"
        else "EM-threshold contrast"
    )
    message = f"{len(pairs)} settings with the {label} direction"
    return SweepReport(sweep, True, message, table, figure, sampling_used(results))
