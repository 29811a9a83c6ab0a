"""Simulator Theory assets over all organisms: persona mixtures, the EM transition over sweeps, the stability
of per-question EM rates and the coherence of misaligned answers; each a table and a figure in the UI."""

from pathlib import Path

import dagster as dg
import polars.selectors as cs

from em_assets.defs.metadata import md_image, md_table
from em_assets.defs.partitions import CPU_OP_TAGS, REPORT_AUTOMATION
from em_assets.defs.resources import ExperimentResource, ResultsDB

PERSONA_TABLES = {
    "persona_mixtures": "Per organism, judge and sweep point: a two-Beta mixture of the aligned scores, shapes "
    "shared across the organism's points, the misaligned weight with a bootstrap interval, BIC of one against "
    "two components and a likelihood-ratio test of shared against free shapes.",
    "em_transition": "Per swept organism and parameter (training step, B scale): a logistic with a ceiling "
    "fitted to the EM rate and to the misaligned weight, its midpoint with an interval, beside the sharpest "
    "rotation step of lora_trajectory.",
    "question_em_stability": "Per eval set and judge: Spearman's rho of per-question EM rates between organisms "
    "with Fisher-z intervals, and Kendall's W over all whose rate varies over questions.",
    "persona_coherence": "Per organism and judge: coherence of misaligned against aligned answers (mean and rate), "
    "the differences with 95% intervals.",
}


# The UI shows these columns; the table in the store has them all.
_SHOWN = {
    "persona_mixtures": [
        "organism",
        "judge",
        "sweep",
        "setting",
        "n_scored",
        "misaligned_share",
        "misaligned_weight",
        "weight_lo",
        "weight_hi",
        "prefers_two",
        "lrt_p",
        "note",
    ],
    "em_transition": [
        "organism",
        "judge",
        "sweep",
        "quantity",
        "n_points",
        "midpoint",
        "midpoint_lo",
        "midpoint_hi",
        "top",
        "sharpest_step",
        "note",
    ],
    "question_em_stability": [
        "eval_set",
        "judge",
        "scope",
        "organism_a",
        "organism_b",
        "n_questions",
        "spearman",
        "spearman_lo",
        "spearman_hi",
        "kendall_w",
        "p_value",
        "note",
    ],
    "persona_coherence": [
        "organism",
        "judge",
        "n_misaligned",
        "n_aligned",
        "coherent_diff",
        "coherent_diff_lo",
        "coherent_diff_hi",
        "rate_diff",
        "rate_diff_lo",
        "rate_diff_hi",
        "note",
    ],
}


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            name,
            group_name="reports",
            deps=[
                "judgements",
                "em_over_training",
                "lora_scaling",
                "lora_trajectory",
                "steering_sweep",
                "direction_ablation",
            ],
            kinds={"duckdb", "scipy", "matplotlib"},
            description=desc,
            automation_condition=REPORT_AUTOMATION,
        )
        for name, desc in PERSONA_TABLES.items()
    ],
    op_tags=CPU_OP_TAGS,
)
def persona_tables(experiment: ExperimentResource, results: ResultsDB):
    # Imported here: scipy.stats takes about a second to import, which every load of the definitions would pay.
    from em_assets.reports import personas

    thresholds = experiment.grid().thresholds
    result = personas.build_persona_tables(results.store(), thresholds)
    figures = personas.draw_persona_figures(result, thresholds, Path(experiment.figures_dir))
    for name, table in result.tables.items():
        title = name.replace("_", " ")
        yield dg.MaterializeResult(
            asset_key=name,
            metadata={
                "dagster/row_count": table.height,
                "table": md_table(table.select(_SHOWN[name]).with_columns(cs.float().round(3))),
                "figure_path": str(figures[name]),
                "figure": md_image(figures[name], title),
                "source_snapshot": result.snapshot,
            },
        )
