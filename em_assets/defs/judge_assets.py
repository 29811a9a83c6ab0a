"""Judge validation assets: reference judgements (GPT-4o), the distilled and probe judges, judge agreement and
the sanity check of the grid's judge on hand-written answers."""

import json
from pathlib import Path

import dagster as dg
import polars as pl

from em_assets.defs.metadata import md_image, md_table
from em_assets.defs.partitions import CPU_OP_TAGS, GPU_OP_TAGS, GPU_POOL
from em_assets.defs.resources import ExperimentResource, ResultsDB
from em_assets.judging import agreement_stage, validation
from em_assets.judging.calibration import grid_judge_sanity
from em_assets.reports.figures import plot_training_curves
from em_assets.reports.judge_figures import plot_agreement_scatter
from em_assets.results import judge_queries


@dg.asset(
    group_name="catalog",
    kinds={"duckdb"},
    op_tags=CPU_OP_TAGS,
    description="GPT-4o-judged answers of published EM organisms (pinned upstream CSVs), one row per answer, "
    "with its source organism and its split (held-out base models are never trained on).",
)
def reference_judgements(experiment: ExperimentResource, results: ResultsDB) -> dg.MaterializeResult:
    df = validation.load_reference(
        results.store(), experiment.grid(), experiment.mirror, Path(experiment.cache_dir)
    )
    per_file = (
        df.group_by("source_organism", "split", "source_sha256")
        .agg(
            pl.len().alias("n"),
            (pl.col("aligned") <= experiment.grid().thresholds.aligned_at_most).mean().alias("misaligned"),
            pl.col("coherent").mean().alias("mean_coherent"),
        )
        .sort("source_organism")
    )
    return dg.MaterializeResult(
        metadata={"dagster/row_count": df.height, "files": md_table(per_file)},
        data_version=dg.DataVersion("|".join(sorted(per_file["source_sha256"].to_list()))),
    )


# What the trained judges share as assets: fitted on the reference judgements with the base model they read.
_TRAINED_JUDGE = dict(
    group_name="catalog",
    deps=[reference_judgements, "base_models"],
    kinds={"pytorch", "duckdb"},
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
)


@dg.asset(
    **_TRAINED_JUDGE,
    description="A LoRA adapter that answers GPT-4o's aligned/coherent scores as a number, trained with the "
    "project's training loop on the reference judgements of the train base models.",
)
def distilled_judge(
    context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB
) -> dg.MaterializeResult:
    grid, store = experiment.grid(), results.store()
    if grid.distill is None:
        return dg.MaterializeResult(metadata={"skipped": "the grid has no distill section"})
    row = validation.materialise_distilled(
        store,
        grid,
        Path(experiment.artifacts_dir),
        Path(experiment.cache_dir),
        experiment.torch_device,
        context.run.run_id,
        on_step=lambda r: context.log.info(f"distilled judge: step {r['step']} loss {r['loss']:.3f}"),
    )
    losses = judge_queries.distilled_losses(store, row["config_hash"]).with_columns(
        organism=pl.lit("distilled judge")
    )
    curve = plot_training_curves(losses, Path(experiment.figures_dir) / "distilled_judge_loss.png")
    return dg.MaterializeResult(
        metadata={
            "trained": row["trained"],
            "adapter_path": dg.MetadataValue.path(row["adapter_path"]),
            "adapter_sha256": row["adapter_sha256"],
            "config_hash": row["config_hash"],
            "held_out_base_models": dg.MetadataValue.json(json.loads(row["held_out_base_models"])),
            "n_examples": row["n_examples"],
            "final_loss": row["final_loss"],
            "loss_curve": md_image(curve, "distilled judge training loss"),
        },
        data_version=dg.DataVersion(row["adapter_sha256"]),
    )


@dg.asset(
    **_TRAINED_JUDGE,
    description="Kernel ridge readouts of GPT-4o's aligned/coherent scores from a frozen model's mean-pooled "
    "hidden states, fitted on the reference judgements of the train base models (bandwidth and penalty by "
    "leave-one-base-model-out cross-validation).",
)
def probe_judge(
    context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB
) -> dg.MaterializeResult:
    grid, store = experiment.grid(), results.store()
    if grid.probe is None:
        return dg.MaterializeResult(metadata={"skipped": "the grid has no probe section"})
    row = validation.materialise_probe(
        store,
        grid,
        Path(experiment.artifacts_dir),
        Path(experiment.cache_dir),
        experiment.torch_device,
        context.run.run_id,
        on_progress=lambda done, n: context.log.info(f"probe judge: pooled {done}/{n} train answers"),
    )
    return dg.MaterializeResult(
        metadata={
            "trained": row["trained"],
            "head_path": dg.MetadataValue.path(row["head_path"]),
            "head_sha256": row["head_sha256"],
            "config_hash": row["config_hash"],
            "held_out_base_models": dg.MetadataValue.json(json.loads(row["held_out_base_models"])),
            "n_answers": row["n_answers"],
            "seconds": round(row["seconds"], 1),
            "readouts": md_table(judge_queries.probe_readouts(store, row["config_hash"])),
        },
        data_version=dg.DataVersion(row["head_sha256"]),
    )


def _number(value: float | None) -> float:
    """A statistic as check metadata: NaN where it is undefined (float metadata takes no None)."""
    return float("nan") if value is None else value


@dg.asset(
    group_name="judges",
    deps=[reference_judgements, distilled_judge, probe_judge],
    kinds={"duckdb", "matplotlib"},
    # A local judge runs on the accelerator, as judgements does.
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    description="The grid's judge (and comparison judges) against GPT-4o on the held-out base models: "
    "Spearman, Pearson, MAE, AUC per metric and the EM rate per source organism under both.",
    check_specs=[
        dg.AssetCheckSpec(
            "judge_agrees_with_reference",
            asset="judge_agreement",
            description="The grid judge against GPT-4o on the held-out base models: warns when its aligned "
            "Spearman or misaligned AUC is under the grid's agreement minimums, or when a file's EM rate is "
            "beyond max_em_gap of GPT-4o's and its corrected interval misses GPT-4o's rate.",
        ),
        dg.AssetCheckSpec(
            "judge_sees_incoherence",
            asset="judge_agreement",
            description="The grid judge's coherent AUC on the held-out answers GPT-4o scored incoherent, and on "
            "the held-out hand-rated answers of the probe's hand_ratings; warns when it is low, and says so when "
            "there are too few incoherent answers to tell.",
        ),
    ],
)
def judge_agreement(
    context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB
) -> dg.MaterializeResult:
    grid = experiment.grid()
    if not grid.agreement.enabled:
        return dg.MaterializeResult(
            metadata={"skipped": "agreement.enabled is false in the grid: the judge is not measured"},
            check_results=[
                dg.AssetCheckResult(
                    check_name=name,
                    passed=False,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={"measured": False},
                )
                for name in ("judge_agrees_with_reference", "judge_sees_incoherence")
            ],
        )
    run = agreement_stage.judge_agreement(
        results.store(),
        grid,
        context.run.run_id,
        mirror=experiment.mirror,
        cache_dir=Path(experiment.cache_dir),
        device=experiment.torch_device,
    )
    meta: dict = {}
    for report in run.reports:
        meta |= _report_metadata(report, grid, Path(experiment.figures_dir))
    checks = [
        _agreement_check(run.reports[0], grid),
        _incoherence_check(run.reports[0], grid, run.hand_rated),
    ]
    return dg.MaterializeResult(metadata=meta, check_results=checks)


def _report_metadata(report, grid, figures_dir: Path) -> dict:
    """One judge's agreement, EM rates, scatter plot, speed, EM error rates and correction coverage."""
    table = pl.DataFrame([{"metric": m.metric, **m.as_dict()} for m in report.metrics])
    path = figures_dir / f"judge_agreement_{report.judge.replace(':', '_')}.png"
    title = f"{report.judge} vs GPT-4o (held-out base models)"
    t = grid.thresholds
    plot_agreement_scatter(report.scores, path, title, t.aligned_at_most, t.coherent_above)
    return {
        f"{report.judge} agreement": md_table(table),
        f"{report.judge} em_rate": md_table(report.em.drop("source_organism")),
        f"{report.judge} scatter": md_image(path, title),
        f"{report.judge} seconds": round(report.seconds, 1),
        f"{report.judge} em_error": _error_rates_md(report),
        f"{report.judge} correction": agreement_stage.correction_coverage(report.em),
    }


def _agreement_check(main, grid) -> dg.AssetCheckResult:
    """Whether the grid's judge ranks misaligned answers as GPT-4o does, and counts each file's EM rate within
    the tolerance of GPT-4o's or with a corrected interval that covers it."""
    aligned = {m.metric: m for m in main.metrics}["aligned"]
    spec = grid.agreement
    spearman, auc, gaps = aligned.spearman, aligned.auc, agreement_stage.em_gaps(main.em, spec.max_em_gap)
    passed = (
        spearman is not None and spearman >= spec.min_spearman and auc is not None and auc >= spec.min_auc
    ) and not gaps.failing
    return dg.AssetCheckResult(
        check_name="judge_agrees_with_reference",
        passed=bool(passed),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            # In words: an undefined statistic is shown below as NaN, which alone says nothing of why.
            "result": "; ".join(
                [
                    _against("aligned Spearman", spearman, spec.min_spearman, _NO_SPEARMAN),
                    _against("misaligned AUC", auc, spec.min_auc, _NO_AUC),
                    gaps.words(),
                ]
            ),
            "aligned_spearman": _number(spearman),
            "aligned_spearman_lo": _number(aligned.spearman_lo),
            "aligned_spearman_hi": _number(aligned.spearman_hi),
            "misaligned_auc": _number(auc),
            "misaligned_auc_lo": _number(aligned.auc_lo),
            "misaligned_auc_hi": _number(aligned.auc_hi),
            "max_em_gap": gaps.max_gap,
            "files_beyond_em_gap": gaps.beyond,
            "files_beyond_and_not_covered": ", ".join(gaps.failing) or "none",
            "thresholds": f"spearman >= {spec.min_spearman}, auc >= {spec.min_auc}; per file, EM gap <= "
            f"{spec.max_em_gap} or the corrected interval covering GPT-4o's rate",
        },
    )


_NO_SPEARMAN = "under two scored answers, or every score alike on one side"
_NO_AUC = "GPT-4o rates no scored answer misaligned, or every one"


def _against(name: str, value: float | None, least: float, undefined: str) -> str:
    """A statistic against its minimum in words, or why it is undefined (which fails the check)."""
    if value is None:
        return f"{name} undefined ({undefined})"
    return f"{name} {value:.3f}" + (f" < {least}" if value < least else f" >= {least}")


def _error_rates_md(report) -> dg.MetadataValue:
    """The judge's EM sensitivity and specificity (what every corrected EM rate of this judge uses)."""
    e = report.error_rates
    if e is None:
        return dg.MetadataValue.md(
            "undefined: the scored answers lack reference-EM or non-EM answers; corrected EM rates stay null"
        )
    fields = ("sensitivity", "specificity", "tp", "n_pos", "tn", "n_neg", "n_files")
    ranges = {
        f"{rate}, 95% of new files": f"{r[0]:.2f}-{r[1]:.2f}" if r else "one file: no spread"
        for rate, r in e.new_file_ranges().items()
    }
    return md_table(pl.DataFrame([{f: getattr(e, f) for f in fields} | ranges]))


def _incoherence_check(report, grid, hand) -> dg.AssetCheckResult:
    found = agreement_stage.coherent_on_incoherent(report, grid)
    metadata = {
        "coherent_auc": _number(found.auc),
        "n_incoherent": found.n_incoherent,
        "result": found.message,
    }
    if hand is not None:
        metadata |= {
            "hand_rated_coherent_auc": _number(hand.auc),
            "hand_rated_n_incoherent": hand.n_incoherent,
            "hand_rated_result": hand.message,
        }
    return dg.AssetCheckResult(
        check_name="judge_sees_incoherence",
        passed=found.passed and (hand is None or hand.passed),
        severity=dg.AssetCheckSeverity.WARN,
        metadata=metadata,
    )


@dg.asset_check(
    # On the judge's measurement: it runs once the judge is trained, and again each time it is measured.
    asset=judge_agreement,
    # Its prompts are the eval set's judge templates.
    additional_deps=["eval_questions"],
    blocking=False,
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    description="Scores a hand-written calibration set with the configured judge; warns when it separates "
    "aligned from harmful, or coherent from incoherent, answers poorly (AUC < 0.8); `incoherence` says how "
    "well it sees incoherent text.",
)
def judge_sanity(experiment: ExperimentResource, results: ResultsDB) -> dg.AssetCheckResult:
    report = grid_judge_sanity(
        results.store(),
        experiment.grid(),
        Path(experiment.calibration_path),
        Path(experiment.cache_dir),
        experiment.torch_device,
    )
    return dg.AssetCheckResult(
        passed=report.passed,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "aligned_auc": _number(report.aligned_auc),
            "coherent_auc": _number(report.coherent_auc),
            "null_fraction": report.null_fraction,
            "n_incoherent": report.incoherence.n_incoherent,
            "incoherence": report.incoherence.message,
            "scores": md_table(pl.DataFrame(report.scores)),
        },
    )
