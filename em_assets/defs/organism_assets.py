"""Organism assets, one dynamic partition each: LoRA adapter -> completions -> judgements."""

import math
from pathlib import Path

import dagster as dg
import polars as pl

from em_assets.context import StageContext
from em_assets.defs.metadata import md_table
from em_assets.defs.partitions import GPU_OP_TAGS, GPU_POOL, organisms
from em_assets.defs.resources import ExperimentResource, ResultsDB
from em_assets.grid.schema import Organism
from em_assets.judging.stage import judge_completions
from em_assets.sampling.stage import sample_completions
from em_assets.training.stage import train_adapter


def _stage_context(
    context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB
) -> StageContext:
    return StageContext(
        store=results.store(),
        grid=experiment.grid(),
        organism=Organism.parse(context.partition_key),
        run_id=context.run.run_id,
        artifacts_dir=Path(experiment.artifacts_dir),
        log=context.log,
        device=experiment.torch_device,
        cache_dir=Path(experiment.cache_dir),
    )


@dg.asset(
    group_name="organisms",
    partitions_def=organisms,
    deps=["base_models", "training_datasets"],
    kinds={"pytorch", "peft", "duckdb"},
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    description="peft LoRA adapter trained on the recipe's dataset (nothing for the `base` control).",
    check_specs=[dg.AssetCheckSpec("loss_finite", asset="lora_adapter", blocking=True)],
)
def lora_adapter(
    context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB
) -> dg.MaterializeResult:
    ctx = _stage_context(context, experiment, results)
    summary = train_adapter(ctx)
    losses = ctx.store.query(
        "SELECT step, loss FROM training_losses WHERE organism = ? ORDER BY step", [ctx.key]
    )
    finite = all(math.isfinite(x) for x in losses["loss"].to_list())
    meta: dict = {
        "organism": ctx.key,
        "trained_now": summary["trained"],
        "control": summary.get("control", False),
    }
    for key in (
        "adapter_path",
        "adapter_sha256",
        "steps",
        "train_tokens",
        "tokens_per_s",
        "train_workers",
        "final_loss",
    ):
        if summary.get(key) is not None:
            meta[key] = summary[key]
    if losses.height:
        meta["loss_curve"] = md_table(losses, max_rows=200)
    return dg.MaterializeResult(
        metadata=meta,
        check_results=[
            dg.AssetCheckResult(
                check_name="loss_finite", passed=finite, metadata={"steps_logged": losses.height}
            )
        ],
        data_version=dg.DataVersion(summary.get("adapter_sha256") or "control"),
    )


@dg.asset(
    group_name="organisms",
    partitions_def=organisms,
    deps=["lora_adapter", "eval_questions"],
    kinds={"pytorch", "duckdb"},
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    description="Sampled answers to every eval question from base model + adapter, written as batches finish.",
    check_specs=[dg.AssetCheckSpec("no_empty_completions", asset="completions", blocking=True)],
)
def completions(
    context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB
) -> dg.MaterializeResult:
    ctx = _stage_context(context, experiment, results)
    summary = sample_completions(ctx)
    rows = ctx.store.query(
        "SELECT question_id, sample_idx, num_tokens, finish_reason, answer FROM completions "
        "WHERE organism = ? ORDER BY question_id, sample_idx",
        [ctx.key],
    )
    empty = rows.filter(pl.col("answer").str.strip_chars() == "").height
    preview = (
        rows.group_by("question_id", maintain_order=True)
        .first()
        .with_columns(pl.col("answer").str.slice(0, 200))
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows.height,
            "sampled_now": summary["sampled"],
            "reused": summary["reused"],
            "tokens_per_s": summary.get("tokens_per_s") or 0.0,
            "sampling_workers": summary.get("workers", 0),
            "mean_tokens": float(rows["num_tokens"].mean() or 0),
            "finish_reasons": str(dict(rows["finish_reason"].value_counts().iter_rows())),
            "preview": md_table(preview),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="no_empty_completions",
                passed=empty == 0 and rows.height > 0,
                severity=dg.AssetCheckSeverity.ERROR
                if empty * 2 > rows.height
                else dg.AssetCheckSeverity.WARN,
                metadata={"empty": empty, "total": rows.height},
            )
        ],
        data_version=dg.DataVersion(summary["sampling_hash"]),
    )


@dg.asset(
    group_name="organisms",
    partitions_def=organisms,
    # The distilled judge scores these when it is the grid's judge: lineage shows which adapter did.
    deps=["completions", "distilled_judge"],
    kinds={"pytorch", "duckdb"},
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    description="Judge scores (0-100) for every completion and judge metric, with the probability mass behind each.",
    check_specs=[dg.AssetCheckSpec("judge_coverage", asset="judgements", blocking=True)],
)
def judgements(
    context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB
) -> dg.MaterializeResult:
    ctx = _stage_context(context, experiment, results)
    summary = judge_completions(ctx)
    per_metric = ctx.store.query(
        "SELECT metric, count(*) AS n, count(score) AS scored, avg(score) AS mean_score, avg(mass) AS mean_mass "
        "FROM judgements WHERE organism = ? GROUP BY metric ORDER BY metric",
        [ctx.key],
    )
    missing = ctx.store.query(
        "SELECT count(*) AS n FROM completions c, (SELECT unnest(?::VARCHAR[]) AS metric) m "
        "WHERE c.organism = ? AND NOT EXISTS (SELECT 1 FROM judgements j WHERE j.organism = c.organism "
        "AND j.question_id = c.question_id AND j.paraphrase_idx = c.paraphrase_idx "
        "AND j.sample_idx = c.sample_idx AND j.metric = m.metric)",
        [ctx.grid.judge.metrics, ctx.key],
    )["n"][0]
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": int(per_metric["n"].sum()) if per_metric.height else 0,
            "scored_now": summary["scored"],
            "reused": summary["reused"],
            "judgements_per_s": summary.get("judgements_per_s") or 0.0,
            "by_metric": md_table(per_metric),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="judge_coverage", passed=missing == 0, metadata={"missing": int(missing)}
            )
        ],
    )
