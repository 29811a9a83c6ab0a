"""Direction assets (Soligo et al.): the misalignment direction per organism, steering and ablation sweeps with
it, and the similarity of directions across organisms of one base model."""

from pathlib import Path

import dagster as dg

from em_assets.analyses import direction_sweeps
from em_assets.analyses import directions as stage
from em_assets.analyses.similarity import build_similarity
from em_assets.defs.metadata import CORRECTED_SHOWN, md_image, md_table, sampling_text
from em_assets.defs.partitions import (
    CPU_OP_TAGS,
    GPU_OP_TAGS,
    GPU_POOL,
    PER_ORGANISM_CHECK,
    REPORT_AUTOMATION,
    organisms,
)
from em_assets.defs.resources import ExperimentResource, ResultsDB, stage_context
from em_assets.results import directions as db
from em_assets.stats.correction import correction_caveat


@dg.asset(
    group_name="directions",
    partitions_def=organisms,
    deps=["judgements"],
    kinds={"pytorch", "safetensors", "duckdb"},
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    description="Per layer, mean answer-token residual activation of misaligned minus aligned answers "
    "(balanced), saved as safetensors with a random control of equal norm; path + sha256 in DuckDB.",
    check_specs=[
        dg.AssetCheckSpec(
            "enough_em_answers",
            asset="misalignment_directions",
            description="Warns when the direction could not contrast answers at the grid's EM thresholds (too few "
            "misaligned or aligned ones, `needed` per class): it used another contrast, or none."
            + PER_ORGANISM_CHECK,
        )
    ],
)
def misalignment_directions(
    context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB
) -> dg.MaterializeResult:
    ctx = stage_context(context, experiment, results)
    result = stage.extract_direction(ctx)
    contrast = result.contrast
    meta: dict = {
        "status": result.status,
        "contrast": contrast.kind or "none",
        "result": result.note or contrast.message,
        "n_misaligned_found": contrast.n_misaligned_found,
        "n_aligned_found": contrast.n_aligned_found,
        "n_per_class": contrast.misaligned.height if contrast.kind else 0,
        "seconds": round(result.seconds, 2),
    }
    if result.path:
        meta.update(direction_path=dg.MetadataValue.path(result.path), direction_sha256=result.sha256)
        meta["layer_norms"] = md_table(db.read_table(ctx.store, "direction_layers", ctx.key), max_rows=200)
    return dg.MaterializeResult(
        metadata=meta,
        check_results=[
            dg.AssetCheckResult(
                check_name="enough_em_answers",
                passed=contrast.kind == stage.EM_CONTRAST,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={
                    "organism": ctx.key,
                    "result": result.note or contrast.message,
                    "needed": contrast.needed,
                },
            )
        ],
        data_version=dg.DataVersion(result.sha256 or "none"),
    )


@dg.asset(
    group_name="reports",
    deps=["misalignment_directions"],
    kinds={"duckdb", "matplotlib"},
    op_tags=CPU_OP_TAGS,
    automation_condition=REPORT_AUTOMATION,
    description="Cosine similarity per layer between the misalignment directions of organisms sharing a base "
    "model: a table and a heatmap (the convergence result).",
)
def direction_similarity(experiment: ExperimentResource, results: ResultsDB) -> dg.MaterializeResult:
    report = build_similarity(results.store(), Path(experiment.figures_dir))
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": report.table.height,
            "organisms_with_directions": report.organisms,
            "table": md_table(report.table.drop("sha256_a", "sha256_b"), max_rows=200),
            "heatmap": md_image(report.figure, "cosine similarity of misalignment directions"),
            "heatmap_path": dg.MetadataValue.path(str(report.figure)),
        }
    )


def _sweep_result(report: direction_sweeps.SweepReport, shown: list[str]) -> dg.MaterializeResult:
    meta: dict = {"ran": report.ran, "result": report.message, "dagster/row_count": report.table.height}
    if report.ran:
        meta["table"] = md_table(report.table.select(*shown, *CORRECTED_SHOWN), max_rows=200)
        meta["em_correction"] = dg.MetadataValue.md(correction_caveat(report.table))
        meta["figure"] = md_image(report.figure, report.sweep)
        meta["figure_path"] = dg.MetadataValue.path(str(report.figure))
        meta["sampling"] = sampling_text(report.sampling)
    return dg.MaterializeResult(metadata=meta)


# What steering and ablation share as assets. Judged by the grid's judge (perhaps the distilled or probe one) and
# corrected by judge_agreement's rates; the judges are named: the direction's data version is its file's, which a
# refitted judge may leave alone.
_DIRECTION_SWEEP = dict(
    group_name="directions",
    partitions_def=organisms,
    deps=["misalignment_directions", "lora_adapter", "distilled_judge", "probe_judge", "judge_agreement"],
    kinds={"pytorch", "duckdb", "matplotlib"},
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
)


@dg.asset(
    **_DIRECTION_SWEEP,
    description="The base model steered with scale x the organism's direction at the grid's layers and scales, "
    "each beside a random vector of equal norm; sampled and judged like completions; EM and coherence vs scale.",
)
def steering_sweep(
    context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB
) -> dg.MaterializeResult:
    ctx = stage_context(context, experiment, results)
    report = direction_sweeps.run_direction_sweep(
        ctx, direction_sweeps.STEERING, Path(experiment.figures_dir)
    )
    return _sweep_result(
        report, ["setting", "layer", "scale", "n", "em_rate", "em_lo", "em_hi", "coherence_rate"]
    )


@dg.asset(
    **_DIRECTION_SWEEP,
    description="The organism with its direction projected out of every layer, and with a random direction of "
    "equal norm projected out: EM before and after, with 95% Wilson intervals.",
)
def direction_ablation(
    context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB
) -> dg.MaterializeResult:
    ctx = stage_context(context, experiment, results)
    report = direction_sweeps.run_direction_sweep(
        ctx, direction_sweeps.ABLATION, Path(experiment.figures_dir)
    )
    return _sweep_result(
        report, ["setting", "source_layer", "n", "em_rate", "em_lo", "em_hi", "coherence_rate"]
    )
