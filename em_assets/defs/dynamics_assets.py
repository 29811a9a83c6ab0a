"""Training-dynamics assets per organism (Turner et al.): EM over checkpoints, LoRA trajectory, B scaling."""

from collections.abc import Callable
from pathlib import Path

import dagster as dg
import polars.selectors as cs

from em_assets.analyses import dynamics, plots
from em_assets.defs.metadata import CORRECTED_SHOWN, md_image, md_table, sampling_text
from em_assets.defs.partitions import CPU_OP_TAGS, GPU_OP_TAGS, GPU_POOL, organisms
from em_assets.defs.resources import ExperimentResource, ResultsDB, stage_context
from em_assets.stats.correction import correction_caveat

# Each point's judged and corrected EM rate, as em_over_training and lora_scaling show it.
_RATES = ["n_scored", "em_rate", "em_lo", "em_hi", *CORRECTED_SHOWN, "coherence_rate", "mean_aligned"]
_SHOWN = {
    "em_over_training": ["step", *_RATES, "loss"],
    "lora_trajectory": ["module", "step", "a_norm", "b_norm", "cos_final", "local_cos", "pc1", "pc2"],
    "lora_scaling": ["scale", *_RATES],
}


# The stages that sample (the trajectory reads the checkpoints' weights only).
_SWEEPS = ("em_over_training", "lora_scaling")
_PLOTS: dict[str, Callable] = {
    "em_over_training": plots.plot_em_over_training,
    "lora_trajectory": plots.plot_lora_trajectory,
    "lora_scaling": plots.plot_lora_scaling,
}


def _materialize(
    name: str,
    stage: Callable[..., dynamics.DynamicsResult],
    context: dg.AssetExecutionContext,
    experiment: ExperimentResource,
    results: ResultsDB,
) -> dg.MaterializeResult:
    """Run one dynamics stage for the partition and turn its rows into a table and an inline figure."""
    ctx = stage_context(context, experiment, results)
    out = stage(ctx)
    path = Path(experiment.figures_dir) / "dynamics" / f"{ctx.key}--{name}.png"
    title = name.replace("_", " ")
    meta: dict = {
        "dagster/row_count": out.table.height,
        "note": out.note or "",
        "sampled_now": out.sampled,
        "judged_now": out.judged,
        "seconds": round(out.seconds, 2),
    }
    if out.note:
        # Nothing to draw (the note says why), and no figure of an earlier run is left to contradict it.
        path.unlink(missing_ok=True)
    else:
        figure = _PLOTS[name](out.table, path, ctx.key)
        meta.update(figure_path=str(figure), figure=md_image(figure, title))
    if name in _SWEEPS:
        meta["sampling"] = sampling_text(out.sampling)
    if out.table.height:
        meta["table"] = md_table(out.table.select(_SHOWN[name]).with_columns(cs.float().round(3)))
        if "em_correction" in out.table.columns:
            meta["em_correction"] = dg.MetadataValue.md(correction_caveat(out.table))
    meta.update({k: dg.MetadataValue.json(v) for k, v in out.extra.items()})
    return dg.MaterializeResult(metadata=meta)


_ASSET = {"group_name": "organisms", "partitions_def": organisms}


@dg.asset(
    **_ASSET,
    # Judged by the grid's judge (perhaps the distilled or probe one), corrected by judge_agreement's rates.
    deps=["lora_adapter", "eval_questions", "distilled_judge", "probe_judge", "judge_agreement"],
    kinds={"pytorch", "duckdb", "matplotlib"},
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    description="Every kept checkpoint and step 0 (the base model) sampled and judged: EM, coherence, loss by step.",
)
def em_over_training(
    context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB
) -> dg.MaterializeResult:
    return _materialize("em_over_training", dynamics.em_over_training, context, experiment, results)


@dg.asset(
    **_ASSET,
    deps=["lora_adapter"],
    kinds={"numpy", "duckdb", "matplotlib"},
    op_tags=CPU_OP_TAGS,
    description="LoRA A/B norms, B's cosine with the final B, local cosine and PCA of B over checkpoints.",
)
def lora_trajectory(
    context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB
) -> dg.MaterializeResult:
    return _materialize("lora_trajectory", dynamics.lora_trajectory, context, experiment, results)


@dg.asset(
    **_ASSET,
    # Judged by the grid's judge (perhaps the distilled or probe one), corrected by judge_agreement's rates.
    deps=["lora_adapter", "eval_questions", "distilled_judge", "probe_judge", "judge_agreement"],
    kinds={"pytorch", "duckdb", "matplotlib"},
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    description="The final adapter with B scaled by each grid factor, sampled and judged: EM and coherence by scale.",
)
def lora_scaling(
    context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB
) -> dg.MaterializeResult:
    return _materialize("lora_scaling", dynamics.lora_scaling, context, experiment, results)
