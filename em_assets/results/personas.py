"""SQL behind the Simulator Theory tables: judged answers of organisms and of their sweep points, the sharpest
rotation of each organism's LoRA B, and the tables written back."""

from __future__ import annotations

import polars as pl

from em_assets.results.store import Store

# The organism's own answers are one more point of its mixture fit, beside its sweep points.
ORGANISM_SWEEP, ORGANISM_SETTING = "organism", "final"


def organism_scores(store: Store) -> pl.DataFrame:
    """Every organism answer with its scores under each judge that gave them: the grid's judge and, for an
    imported organism, the scores its file carried (scored_by_judge). Imported answers files count as one
    question set, so organisms imported from several files are compared on the questions they share."""
    return store.query(
        "SELECT organism, CASE WHEN eval_set LIKE 'file:%' THEN 'imported answers' ELSE eval_set END AS eval_set, "
        # An answer not judged yet belongs to its organism's judge, as in em_summary.
        "coalesce(judge_model, max(judge_model) OVER (PARTITION BY organism, judge_source), 'unknown') AS judge, "
        "? AS sweep, ? AS setting, NULL::VARCHAR AS setting_hash, "
        "question_id, paraphrase_idx, sample_idx, aligned, coherent FROM scored_by_judge "
        "ORDER BY organism, judge, question_id, paraphrase_idx, sample_idx",
        [ORGANISM_SWEEP, ORGANISM_SETTING],
    )


def sweep_scores(store: Store) -> pl.DataFrame:
    """Every current sweep answer (its point's setting hash unchanged) with its scores and judge; points of one
    setting hash hold the same answers (sampled once, copied)."""
    return store.query(
        # As in organism_scores: an answer not judged yet belongs to its organism's sweep judge.
        "SELECT s.organism, s.eval_set, "
        "coalesce(s.judge_model, max(s.judge_model) OVER (PARTITION BY s.organism), 'unknown') AS judge, "
        "s.sweep, s.setting, s.setting_hash, "
        "s.question_id, s.paraphrase_idx, s.sample_idx, s.aligned, s.coherent FROM sweep_scored s "
        "JOIN sweep_points p USING (organism, sweep, setting, setting_hash) "
        "ORDER BY s.organism, s.sweep, s.setting, s.question_id, s.paraphrase_idx, s.sample_idx"
    )


def sharpest_steps(store: Store) -> pl.DataFrame:
    """Per organism, the sharpest-rotation step of its LoRA B over adapted modules: median, min and max."""
    return store.query(
        "SELECT organism, median(sharpest_step) AS sharpest_step, min(sharpest_step) AS sharpest_step_min, "
        "max(sharpest_step) AS sharpest_step_max, count(*) AS n_modules FROM "
        "(SELECT DISTINCT organism, module, sharpest_step FROM lora_trajectory) GROUP BY organism"
    )


def write_tables(store: Store, tables: dict[str, pl.DataFrame]) -> None:
    """Replace each whole table with its rows, all in one transaction."""
    store.write_tables(tables)


def comparable_answers(group: pl.DataFrame) -> pl.DataFrame:
    """An organism's answers with its own point narrowed to the sets its sweep points ask, where it has any: the
    sweeps ask one set, and the organism's answers to the others would make its point another mix of questions."""
    swept = group.filter(pl.col("sweep") != ORGANISM_SWEEP)
    if swept.is_empty():
        return group
    sets = swept["eval_set"].unique().to_list()
    return group.filter((pl.col("sweep") != ORGANISM_SWEEP) | pl.col("eval_set").is_in(sets))
