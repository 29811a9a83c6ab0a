"""Training-dynamics stages (Turner et al.): EM over checkpoints, the LoRA B trajectory, and B scaling.

Each reads as plan (which points or checkpoints), compute (run_sweep or the trajectory statistics), write (one
organism's rows of its table). Organisms without an adapter, or outside `dynamics.recipes`, get no rows and a
note saying why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from em_assets.analyses.sweep import PointResult, SweepPoint, forget_sweep, narrowed, run_sweep, sampling_used
from em_assets.context import StageContext
from em_assets.grid.schema import IMPORTED_KINDS, recipe_method
from em_assets.results.artifacts import check_recorded_weights, check_weights
from em_assets.results.errors import MissingUpstreamError
from em_assets.results.store import utc_now
from em_assets.results.sweeps import checkpoints, replace_result
from em_assets.stats.correction import CORRECTION_COLUMNS

RATE_COLUMNS = (
    "n_answers",
    "n_scored",
    "n_em",
    "em_rate",
    "em_lo",
    "em_hi",
    "coherence_rate",
    "mean_aligned",
    "mean_coherent",
    *CORRECTION_COLUMNS,
)


@dataclass(frozen=True)
class DynamicsResult:
    """One organism's rows of an analysis table, why it has none (note), and this run's work."""

    table: pl.DataFrame
    note: str | None = None
    sampled: int = 0
    judged: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    # How this run sampled (analyses/sweep.py's PointResult.sampling), each way once.
    sampling: tuple[str, ...] = ()


def skip_reason(ctx: StageContext, reads_adapter: bool = True) -> str | None:
    """Why the organism has no dynamics to analyse, or None; `reads_adapter`: the analysis reads LoRA A and B
    (a fully fine-tuned organism's checkpoints are whole models, which only em_over_training samples)."""
    recipe = ctx.grid.recipes.get(ctx.organism.recipe)
    method = recipe_method(recipe) if recipe else None
    if method in IMPORTED_KINDS:
        return f"{ctx.key} is imported ({method}), not trained here: no checkpoints, trajectory or B to scale"
    if method == "full" and reads_adapter:
        return (
            f"{ctx.key} is fully fine-tuned (method: full): it has no LoRA adapter, so the LoRA trajectory "
            "and B scaling do not apply"
        )
    if method in (None, "control"):
        return f"{ctx.key} trains no LoRA adapter (the control): no checkpoints, trajectory or B to scale"
    if not ctx.grid.dynamics.covers(ctx.organism.recipe):
        return f"recipe {ctx.organism.recipe!r} is not in the grid's dynamics.recipes: not analysed"
    return None


def sweep_context(ctx: StageContext) -> StageContext:
    """The context the dynamics sweeps sample with (dynamics.max_new_tokens and question_ids where set)."""
    return narrowed(ctx, ctx.grid.dynamics.max_new_tokens, ctx.grid.dynamics.question_ids)


def _skipped(ctx: StageContext, table: str, note: str) -> DynamicsResult:
    ctx.log.info(f"{ctx.key}: {table}: {note}")
    forget_sweep(ctx, table)  # each dynamics sweep is named for its table
    replace_result(ctx.store, table, ctx.key, pl.DataFrame())
    return DynamicsResult(pl.DataFrame(), note)


def _checkpoint_rows(ctx: StageContext) -> list[dict]:
    """The organism's checkpoints in step order, each file still holding the bytes its row recorded."""
    ctx.current_adapter()  # the checkpoints are the adapter's: from the recipe as it stands, or refused
    rows = checkpoints(ctx.store, ctx.key).to_dicts()
    if not rows:
        raise MissingUpstreamError(f"{ctx.key}: no checkpoints recorded; materialise lora_adapter first")
    # A retraining into the same folder (a denser save_steps) rewrites kept checkpoints before their rows: a kill
    # in between would have their new bytes sampled and read under the old sha256.
    for c in rows:
        check_recorded_weights(ctx.key, c["checkpoint_path"], c["checkpoint_sha256"], "checkpoint")
    return rows


def _rates(result: PointResult) -> dict:
    return {c: getattr(result, c) for c in RATE_COLUMNS}


def _swept(ctx, table, rows, results, start) -> DynamicsResult:
    df = pl.DataFrame(rows, infer_schema_length=None)
    replace_result(ctx.store, table, ctx.key, df)
    return DynamicsResult(
        df,
        sampled=sum(r.sampled for r in results),
        judged=sum(r.judged for r in results),
        seconds=time.perf_counter() - start,
        sampling=sampling_used(results),
    )


def em_over_training(ctx: StageContext) -> DynamicsResult:
    """Step 0 (the base model) and every checkpoint sampled and judged; EM, coherence, loss and gradient norm
    per step."""
    if note := skip_reason(ctx, reads_adapter=False):
        return _skipped(ctx, "em_over_training", note)
    start, spq = time.perf_counter(), ctx.grid.dynamics.checkpoint_samples_per_question
    kept = _checkpoint_rows(ctx)
    points = [SweepPoint("em_over_training", "step=0", None, None, samples_per_question=spq)] + [
        SweepPoint(
            "em_over_training", f"step={c['step']}", c["checkpoint_path"], c["checkpoint_sha256"], (), spq
        )
        for c in kept
    ]
    results = run_sweep(sweep_context(ctx), points)
    start_row = {"loss": None, "grad_norm": None, "train_tokens": 0, "checkpoint_sha256": None}
    by_step = {0: start_row} | {c["step"]: c for c in kept}
    rows = [
        {
            "organism": ctx.key,
            "step": step,
            **_rates(r),
            "loss": by_step[step]["loss"],
            "grad_norm": by_step[step].get("grad_norm"),
            "train_tokens": by_step[step]["train_tokens"],
            "checkpoint_sha256": by_step[step]["checkpoint_sha256"],
            "setting_hash": r.setting_hash,
            "run_id": ctx.run_id,
            "created_at": utc_now(),
        }
        for step, r in zip([0, *[c["step"] for c in kept]], results, strict=True)
    ]
    return _swept(ctx, "em_over_training", rows, results, start)


def lora_trajectory(ctx: StageContext) -> DynamicsResult:
    """Per checkpoint and adapted module: A and B norms, B's cosine with the final B, local cosine, 2-D PCA."""
    from em_assets.analyses.lora import lora_factors
    from em_assets.analyses.trajectory import module_trajectory

    if note := skip_reason(ctx):
        return _skipped(ctx, "lora_trajectory", note)
    start, k = time.perf_counter(), ctx.grid.dynamics.local_cosine_k
    kept = _checkpoint_rows(ctx)
    factors = [lora_factors(c["checkpoint_path"]) for c in kept]
    steps = [c["step"] for c in kept]
    rows, sharpest = [], {}
    for module in sorted(factors[-1]):
        traj = module_trajectory(
            module, steps, [f[module]["A"] for f in factors], [f[module]["B"] for f in factors], k
        )
        sharpest[module] = traj.sharpest_step
        for i, c in enumerate(kept):
            rows.append(
                {
                    "organism": ctx.key,
                    "module": module,
                    "step": c["step"],
                    "a_norm": traj.a_norm[i],
                    "b_norm": traj.b_norm[i],
                    "cos_final": traj.cos_final[i],
                    "local_cos": traj.local_cos[i],
                    "local_k": k,
                    "pc1": traj.pc1[i],
                    "pc2": traj.pc2[i],
                    "pc1_share": traj.pc_share[0],
                    "pc2_share": traj.pc_share[1],
                    "sharpest_step": traj.sharpest_step,
                    "checkpoint_sha256": c["checkpoint_sha256"],
                    "run_id": ctx.run_id,
                    "created_at": utc_now(),
                }
            )
    result = _swept(ctx, "lora_trajectory", rows, [], start)
    return DynamicsResult(result.table, seconds=result.seconds, extra={"sharpest_step": sharpest})


def scaled_adapters(ctx: StageContext) -> list[tuple[float, str | None, str | None]]:
    """(factor, adapter dir, sha256) per grid scale factor; factor 1 is the final adapter itself, factor 0 the
    base model (no adapter)."""
    from em_assets.analyses.lora import write_scaled_adapter
    from em_assets.results.artifacts import ADAPTER_FILE, sha256_file

    adapter = ctx.current_adapter()
    if not adapter.get("adapter_path"):
        raise MissingUpstreamError(f"{ctx.key}: no trained adapter; materialise lora_adapter first")
    check_weights(adapter)
    final = Path(adapter["adapter_path"])
    out = []
    for factor in ctx.grid.dynamics.scale_factors:
        if factor == 1.0:
            out.append((factor, str(final), adapter["adapter_sha256"]))
            continue
        if factor == 0.0:
            # B x 0 merges to the base weights exactly, so step 0 of em_over_training is the same setting and
            # its answers are copied rather than sampled again.
            out.append((factor, None, None))
            continue
        path = final.parent / "scaled" / f"b-x{factor:g}"
        # Rewritten every time: cheap next to sampling, and never stale against the final adapter.
        write_scaled_adapter(final, factor, path)
        out.append((factor, str(path), sha256_file(path / ADAPTER_FILE)))
    return out


def lora_scaling(ctx: StageContext) -> DynamicsResult:
    """The final adapter with B scaled by each grid factor, sampled and judged: EM and coherence per scale."""
    if note := skip_reason(ctx):
        return _skipped(ctx, "lora_scaling", note)
    start, spq = time.perf_counter(), ctx.grid.dynamics.scale_samples_per_question
    scaled = scaled_adapters(ctx)
    points = [SweepPoint("lora_scaling", f"scale={f:g}", path, sha, (), spq) for f, path, sha in scaled]
    results = run_sweep(sweep_context(ctx), points)
    rows = [
        {
            "organism": ctx.key,
            "scale": factor,
            **_rates(r),
            "adapter_sha256": sha,
            "setting_hash": r.setting_hash,
            "run_id": ctx.run_id,
            "created_at": utc_now(),
        }
        for (factor, _, sha), r in zip(scaled, results, strict=True)
    ]
    return _swept(ctx, "lora_scaling", rows, results, start)
