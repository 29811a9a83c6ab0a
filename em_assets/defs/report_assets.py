"""Report assets over all organisms: EM tables (SQL + polars), figures and the answers browser, updated whenever
judgements change."""

from pathlib import Path

import dagster as dg
import polars as pl

from em_assets.defs.metadata import CORRECTED_SHOWN, md_image, md_table
from em_assets.defs.partitions import CPU_OP_TAGS, REPORT_AUTOMATION
from em_assets.defs.resources import ExperimentResource, ResultsDB
from em_assets.judging.agreement_stage import fitted_answer_organisms, judge_caveat
from em_assets.reports import tables as reports
from em_assets.reports.answers_page import write_answers_page
from em_assets.stats.correction import correction_caveat

_SUMMARY_COLS = [
    "organism",
    "method",
    "judge_model",
    "n_answers",
    "em_rate_turner",
    "em_turner_lo",
    "em_turner_hi",
    "em_rate_betley",
    "em_betley_lo",
    "em_betley_hi",
    *CORRECTED_SHOWN,
    "coherence_rate",
    "mean_aligned",
    "mean_coherent",
]

REPORT_TABLES = {
    "em_summary": "EM rate (Turner and Betley definitions) with 95% Wilson intervals, the Turner rate corrected "
    "for the judge's sensitivity and specificity, coherence, lineage.",
    "em_by_question": "EM (judged and corrected) and coherence rates per organism and question.",
    "em_threshold_sensitivity": "EM rates over a grid of aligned/coherent thresholds.",
    "em_seed_bootstrap": "EM rate per base model x recipe with a 95% interval over seeds (bootstrap, or t under 10 seeds).",
    "em_domain_share": "Of each organism's EM answers, the share each domain judge puts on its domain (score > "
    "thresholds.domain_above) with Wilson intervals, and the bad_stuff recognition rate; the GPT-4o-judged "
    "reference answers too (Turner et al.).",
}

# Every rate is corrected with the error rates judge_agreement measures; the reference answers' domain scores
# enter em_domain_share.
_EXTRA_DEPS = {"em_domain_share": ["reference_judgements"]}
_SHORT_ANSWERS_WHY = (
    "the probe judge reads short misaligned answers as less misaligned (and some as incoherent) than they are, so "
    "their EM rates may be undercounted (docs/judges.md#limits)"
)
_UNMEASURED_WHY = (
    "the judge's agreement with GPT-4o and its EM error rates were measured on answers to the reference files' "
    "questions only, so on other questions its EM rates and their correction assume it transfers "
    "(docs/judges.md#limits)"
)
# A kernel readout reproduces its own train answers' scores nearly exactly (and its calibration, fitted on
# out-of-fold predictions, then stretches them): on a train answer the judge is not measured, only recalled.
_FITTED_WHY = (
    "the grid's judge was fitted on these answers' GPT-4o scores, so its EM rates on them are not measured ones "
    "and the correction's error rates, measured on held-out answers, do not apply to them (docs/judges.md)"
)


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            name,
            group_name="reports",
            deps=["judgements", "judge_agreement", *_EXTRA_DEPS.get(name, [])],
            kinds={"duckdb", "polars"},
            description=desc,
            automation_condition=REPORT_AUTOMATION,
        )
        for name, desc in REPORT_TABLES.items()
    ],
    check_specs=[
        dg.AssetCheckSpec(
            "organisms_in_grid",
            asset="em_summary",
            description="Warns when the tables hold organisms the grid's profile no longer lists (taken out of "
            "the grid, or another profile's); `em-assets forget KEY` deletes them.",
        ),
        dg.AssetCheckSpec(
            "short_answers",
            asset="em_summary",
            description="Under the probe judge, warns of organisms whose answers are mostly under "
            f"{reports.SHORT_ANSWER_WORDS} words: {_SHORT_ANSWERS_WHY}.",
        ),
        dg.AssetCheckSpec(
            "questions_measured",
            asset="em_summary",
            description="Unless the grid's judge is GPT-4o itself, warns of organisms with answers to questions "
            f"no held-out reference answer was given to: {_UNMEASURED_WHY}.",
        ),
        dg.AssetCheckSpec(
            "judge_fitted_on",
            asset="em_summary",
            description="Under a probe or distilled judge, warns of organisms with answers the judge was fitted "
            f"on (an imported reference file of a train base model): {_FITTED_WHY}.",
        ),
    ],
    op_tags=CPU_OP_TAGS,
)
def em_tables(context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB):
    grid, store = experiment.grid(), results.store()
    refs = grid.agreement.reference_judges
    with reports.pinned_reports(store, grid.thresholds, context.run.run_id, refs) as (source, tables):
        # From the state the tables were read from: a judge_agreement run committing meanwhile changes neither.
        caveat = judge_caveat(source, grid, tables["em_summary"])
        short = reports.short_answer_organisms(source) if grid.judge.backend == "probe" else None
        unmeasured = None if grid.judge.model in refs else reports.unmeasured_question_organisms(source)
        fitted = fitted_answer_organisms(source, grid)
    summary = tables["em_summary"]
    caveat += "\n\n" + correction_caveat(summary)
    for name, table in tables.items():
        shown = (
            summary.select([c for c in _SUMMARY_COLS if c in summary.columns])
            if name == "em_summary"
            else table
        )
        snapshot = table["source_snapshot"][0] if table.height else None
        yield dg.MaterializeResult(
            asset_key=name,
            metadata={
                "dagster/row_count": table.height,
                "table": md_table(shown),
                "source_snapshot": snapshot,
            }
            | ({"judge_caveat": dg.MetadataValue.md(caveat)} if name == "em_summary" else {}),
        )
    stale = sorted(set(summary["organism"]) - {o.key for o in grid.organisms()})
    yield dg.AssetCheckResult(
        asset_key="em_summary",
        check_name="organisms_in_grid",
        passed=not stale,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"not_in_grid": ", ".join(stale) or "none", "n_not_in_grid": len(stale)},
        description=f"not in profile {experiment.profile!r}: {', '.join(stale)} (em-assets forget KEY deletes them)"
        if stale
        else None,
    )
    yield _organisms_check(
        "short_answers",
        short if short is None else short.with_columns(pl.col("short_share").round(3)),
        f"at least {reports.SHORT_ANSWER_SHARE:.0%} of their answers are under {reports.SHORT_ANSWER_WORDS} words: "
        + _SHORT_ANSWERS_WHY,
    )
    yield _organisms_check(
        "questions_measured",
        unmeasured,
        "answers to questions the judge was not measured on: " + _UNMEASURED_WHY,
    )
    yield _organisms_check("judge_fitted_on", fitted, "answers the judge was fitted on: " + _FITTED_WHY)


def _organisms_check(name: str, flagged: pl.DataFrame | None, says: str) -> dg.AssetCheckResult:
    """A warning on em_summary naming the organisms in `flagged`, each with its row; None (the check does not
    apply to the grid's judge) passes."""
    organisms = [] if flagged is None else flagged["organism"].to_list()
    return dg.AssetCheckResult(
        asset_key="em_summary",
        check_name=name,
        passed=not organisms,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"n_flagged": len(organisms)} | ({"organisms": md_table(flagged)} if organisms else {}),
        description=f"{', '.join(organisms)}: {says}" if organisms else None,
    )


@dg.asset(
    group_name="reports",
    deps=["em_summary", "lora_adapter"],
    kinds={"matplotlib"},
    op_tags=CPU_OP_TAGS,
    automation_condition=REPORT_AUTOMATION,
    description="EM rates with intervals, aligned-vs-coherent scatter and training curves, as PNG files.",
)
def em_figures(
    context: dg.AssetExecutionContext, experiment: ExperimentResource, results: ResultsDB
) -> dg.MaterializeResult:
    drawn = reports.draw_figures(
        results.store(), experiment.grid().thresholds, Path(experiment.figures_dir), context.run.run_id
    )
    # `em-assets figures --snapshot N` redraws these bytes from the snapshot they were drawn from.
    meta: dict = {"source_snapshot": drawn.snapshot}
    meta.update({f"{name}_path": dg.MetadataValue.path(str(path)) for name, path in drawn.paths.items()})
    meta.update({f"{name}_sha256": digest for name, digest in drawn.sha256.items()})
    meta.update({name: md_image(path, name.replace("_", " ")) for name, path in drawn.paths.items()})
    return dg.MaterializeResult(metadata=meta)


@dg.asset(
    group_name="reports",
    deps=["em_summary"],
    kinds={"html"},
    op_tags=CPU_OP_TAGS,
    automation_condition=REPORT_AUTOMATION,
    description="Answers browser: one offline HTML page with every answer, its question and scores, filterable "
    "by organism, question and quadrant (EM, aligned, incoherent).",
)
def em_report(experiment: ExperimentResource, results: ResultsDB) -> dg.MaterializeResult:
    out = Path(experiment.figures_dir).resolve() / "answers.html"
    page = write_answers_page(results.store(), experiment.grid().thresholds, out)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(page.path)),
            "url": dg.MetadataValue.url(page.path.as_uri()),
            "dagster/row_count": page.rows,
            **{f"answers_{q}": n for q, n in page.by_quadrant.items()},
        }
    )
