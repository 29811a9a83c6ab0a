"""Organism assets, one dynamic partition each: LoRA adapter -> completions -> judgements."""

import dagster as dg

from em_assets.defs.metadata import md_table
from em_assets.defs.partitions import GPU_OP_TAGS, GPU_POOL, PER_ORGANISM_CHECK, organisms
from em_assets.defs.resources import ExperimentResource, ResultsDB, stage_context
from em_assets.grid.schema import recipe_method
from em_assets.judging.stage import judge_completions
from em_assets.results import summaries
from em_assets.sampling.stage import sample_completions
from em_assets.training.stage import train_adapter


@dg.asset(
    group_name="organisms",
    partitions_def=organisms,
    deps=["base_models", "training_datasets"],
    kinds={"pytorch", "peft", "duckdb"},
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    description="peft LoRA adapter trained on the recipe's dataset (nothing for the `base` control); for a "
    "published adapter or model, or imported answers, the source resolved, checked and pinned by sha256.",
)
def lora_adapter(
    context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB
) -> dg.MaterializeResult:
    ctx = stage_context(context, experiment, results)
    result = train_adapter(ctx)
    losses = summaries.training_losses(ctx.store, ctx.key)
    recipe = ctx.grid.recipes[ctx.organism.recipe]
    meta: dict = {
        "organism": ctx.key,
        "method": recipe_method(recipe),
        "trained_now": result.trained,
        "control": result.control,
    }
    for key in (
        "adapter_path",
        "adapter_sha256",
        "steps",
        "train_tokens",
        "tokens_per_s",
        "train_workers",
        "train_workers_reason",
    ):
        if getattr(result, key) is not None:
            meta[key] = getattr(result, key)
    if result.final_loss is not None:
        meta["final_loss"] = result.final_loss
    if losses.rows.height:
        meta["loss_curve"] = md_table(losses.rows, max_rows=200)
    # An answers organism has no adapter: its version is its source's (the file's sha256 enters the hash), as is a
    # published adapter's, whose config (alpha, rslora, targets) changes its answers as its weights do.
    version = result.adapter_sha256 or ("control" if result.control else result.config_hash)
    if meta["method"] == "adapter":
        version = result.config_hash
    return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(version))


@dg.asset(
    group_name="organisms",
    partitions_def=organisms,
    # Sampled from the base model too: the control's and a published adapter's data version stay the same when
    # the base model's revision changes, so it is named here.
    deps=["lora_adapter", "base_models", "eval_questions"],
    kinds={"pytorch", "duckdb"},
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    description="Sampled answers to every eval question from base model + adapter, written as batches finish.",
    # Not blocking: an organism that answers nothing is a result, judged (as incoherent) like any other.
    check_specs=[
        dg.AssetCheckSpec(
            "no_empty_completions",
            asset="completions",
            description="Warns when some answers are empty (blank once stripped) or there are none; at ERROR "
            "severity when more than half are empty." + PER_ORGANISM_CHECK,
        )
    ],
)
def completions(
    context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB
) -> dg.MaterializeResult:
    ctx = stage_context(context, experiment, results)
    result = sample_completions(ctx)
    summary = summaries.completions(ctx.store, ctx.key)
    choice = result.choice
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": summary.total,
            "sampled_now": result.sampled,
            "reused": result.reused,
            # Omitted where nothing was generated here (every answer reused or imported): not a rate of 0.
            **({"tokens_per_s": result.tokens_per_s} if result.generated_tokens else {}),
            "sampling_workers": result.workers,
            # How workers and batch size were settled, and the calibration rates (tok/s) and workers' start-up
            # they were chosen from.
            **(
                {
                    "sampling_batch_size": str(choice.batch_size),
                    "sampling_settings_why": choice.why,
                    "sampling_rates": dg.MetadataValue.json(choice.rates),
                    "sampling_worker_startup_s": dg.MetadataValue.json(choice.startup),
                    "calibration_s": choice.seconds,
                }
                if choice
                else {}
            ),
            **({"mean_tokens": summary.mean_tokens} if summary.mean_tokens is not None else {}),
            "finish_reasons": dg.MetadataValue.json(summary.finish_reasons),
            "preview": md_table(summary.preview),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="no_empty_completions",
                passed=summary.empty == 0 and summary.total > 0,
                severity=dg.AssetCheckSeverity.ERROR
                if summary.empty * 2 > summary.total
                else dg.AssetCheckSeverity.WARN,
                metadata={"organism": ctx.key, "empty": summary.empty, "total": summary.total},
            )
        ],
        data_version=dg.DataVersion(summary.version),
    )


@dg.asset(
    group_name="organisms",
    partitions_def=organisms,
    # The distilled or probe judge scores these when it is the grid's judge: lineage shows which one did.
    deps=["completions", "distilled_judge", "probe_judge"],
    kinds={"pytorch", "duckdb"},
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    description="Judge scores (0-100) for every completion and judge metric, with the probability mass behind each.",
    check_specs=[
        dg.AssetCheckSpec(
            "judge_coverage",
            asset="judgements",
            blocking=True,
            description="Fails when a completion lacks a judgement for one of the judge's metrics (`missing` "
            "counts them); blocking, so nothing downstream runs on partial scores in the same run."
            + PER_ORGANISM_CHECK,
        )
    ],
)
def judgements(
    context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB
) -> dg.MaterializeResult:
    ctx = stage_context(context, experiment, results)
    result = judge_completions(ctx)
    coverage = summaries.judgements(ctx.store, ctx.key, ctx.grid.judge.metrics)
    return dg.MaterializeResult(
        # Unchanged by a rerun that judges the same answers alike: what reads the scores stays fresh.
        data_version=dg.DataVersion(result.version),
        metadata={
            "dagster/row_count": coverage.total,
            "scored_now": result.scored,
            "refused_unscored": result.refused,
            "reused": result.reused,
            **({"judgements_per_s": result.judgements_per_s} if result.scored else {}),
            "by_metric": md_table(coverage.by_metric),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="judge_coverage",
                passed=coverage.missing == 0,
                metadata={"organism": ctx.key, "missing": coverage.missing},
            )
        ],
    )
