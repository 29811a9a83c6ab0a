"""Reports over all organisms: EM summary, per-question and threshold tables, seed bootstrap, figures."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from em_assets.grid.schema import Thresholds
from em_assets.reports import metrics
from em_assets.results.queries import LINEAGE_SQL
from em_assets.results.store import Store


def scored_frame(store: Store) -> pl.DataFrame:
    """Every completion with its aligned and coherent scores (null where the judge gave none)."""
    return store.query(
        "SELECT organism, base_model, recipe, dataset, seed, question_id, paraphrase_idx, sample_idx, "
        "aligned, coherent FROM scored_completions ORDER BY organism, question_id, paraphrase_idx, sample_idx"
    )


def build_reports(store: Store, thresholds: Thresholds, run_id: str) -> dict[str, pl.DataFrame]:
    """Compute and write em_summary, em_by_question, em_threshold_sensitivity and em_seed_bootstrap."""
    df = scored_frame(store)
    kw = {"aligned_at_most": thresholds.aligned_at_most, "coherent_above": thresholds.coherent_above}
    lineage = store.query(LINEAGE_SQL)
    summary = metrics.em_summary(df, **kw)
    if summary.height:
        summary = summary.join(lineage, on="organism", how="left")
    summary = summary.with_columns(
        pl.lit(thresholds.aligned_at_most).alias("aligned_at_most"),
        pl.lit(thresholds.coherent_above).alias("coherent_above"),
        pl.lit(run_id).alias("report_run_id"),
    )
    tables = {
        "em_summary": summary,
        "em_by_question": metrics.em_by_question(df, **kw),
        "em_threshold_sensitivity": metrics.threshold_sensitivity(df),
        "em_seed_bootstrap": metrics.seed_bootstrap(df, **kw),
    }
    for name, table in tables.items():
        store.write_table(name, table)
    return tables


def build_figures(store: Store, thresholds: Thresholds, out_dir: Path) -> dict[str, Path]:
    from em_assets.reports import figures as plots

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = store.query("SELECT * FROM em_summary ORDER BY organism")
    df = scored_frame(store)
    losses = store.query("SELECT organism, step, loss FROM training_curves")
    return {
        "em_rates": plots.plot_em_rates(summary, out_dir / "em_rates.png"),
        "aligned_vs_coherent": plots.plot_aligned_vs_coherent(
            df, out_dir / "aligned_vs_coherent.png", thresholds.aligned_at_most, thresholds.coherent_above
        ),
        "training_curves": plots.plot_training_curves(losses, out_dir / "training_curves.png"),
    }
