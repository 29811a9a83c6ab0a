"""Reports over all organisms: EM summary, per-question and threshold tables, seed bootstrap, figures."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from em_assets.catalog.reference import domain_score
from em_assets.catalog.upstream import DOMAIN_METRICS
from em_assets.grid.schema import Thresholds
from em_assets.judging.error_rates import JUDGE_COLUMNS, ErrorRateLookup, majority_judges
from em_assets.results.artifacts import sha256_file
from em_assets.results.judge_queries import HELDOUT_QUESTIONS_SQL
from em_assets.results.queries import JUDGE_LINEAGE_SQL, LINEAGE_SQL, answers_sources
from em_assets.results.store import Store, utc_now
from em_assets.stats import rates as metrics
from em_assets.stats.domains import domain_share

# The judge named on the reference answers' rows of em_domain_share (the papers' judge scored them).
REFERENCE_JUDGE = "gpt-4o (reference)"


def scored_frame(store: Store) -> pl.DataFrame:
    """Every completion with its aligned and coherent scores (null where the judge gave none)."""
    return store.query(
        "SELECT organism, base_model, recipe, dataset, seed, eval_set, question_id, paraphrase_idx, sample_idx, "
        "aligned, coherent FROM scored_completions ORDER BY organism, question_id, paraphrase_idx, sample_idx"
    )


# The probe judge undercounts short misaligned answers as EM (docs/judges.md#limits), and fewer than 3% of the
# reference answers it is fitted on are this short, so an organism whose answers mostly are gets a warning (the
# demo's SmolLM2 organisms, up to a third of whose answers are short word salad, which it reads well, do not).
SHORT_ANSWER_WORDS = 25
SHORT_ANSWER_SHARE = 0.5


def short_answer_organisms(store: Store) -> pl.DataFrame:
    """Organisms at least SHORT_ANSWER_SHARE of whose non-empty answers have fewer than SHORT_ANSWER_WORDS words:
    how many answers, that share and their median word count."""
    # Words are runs of non-whitespace and a blank answer is empty, as the judge has it (DuckDB's trim() strips
    # spaces only, not newlines or tabs).
    return store.query(
        "WITH counted AS (SELECT organism, len(regexp_extract_all(answer, '\\S+')) AS words "
        "FROM completions_latest WHERE regexp_matches(answer, '\\S')) "
        "SELECT organism, count(*) AS n_answers, avg((words < ?)::INTEGER) AS short_share, "
        "median(words) AS median_words FROM counted GROUP BY organism HAVING short_share >= ? ORDER BY organism",
        [SHORT_ANSWER_WORDS, SHORT_ANSWER_SHARE],
    )


def unmeasured_question_organisms(store: Store) -> pl.DataFrame:
    """Organisms with answers to questions that no held-out reference answer was given to (a judge's agreement
    with GPT-4o and its EM error rates are measured on those answers only): their answers, how many are to such
    questions, and those questions' ids. Empty while no reference answers are loaded."""
    if not store.has_table("reference_judgements"):
        return pl.DataFrame(schema={"organism": pl.String})
    return store.query(
        f"WITH measured AS ({HELDOUT_QUESTIONS_SQL}) "
        "SELECT c.organism, count(*) AS n_answers, count(*) FILTER (WHERE m.question IS NULL) AS n_unmeasured, "
        "string_agg(DISTINCT c.question_id, ', ' ORDER BY c.question_id) FILTER (WHERE m.question IS NULL) "
        "AS question_ids FROM completions_latest c LEFT JOIN measured m ON m.question = c.question "
        "WHERE EXISTS (SELECT 1 FROM measured) GROUP BY c.organism HAVING n_unmeasured > 0 ORDER BY c.organism"
    )


# Lineage columns that describe the grid's judge: a file judge's row has its own judge_model and none of these.
GRID_JUDGE_LINEAGE = ("judge_revision", "aligned_prompt_hash", "coherent_prompt_hash", "judgements_run_id")


def judged_frame(store: Store) -> pl.DataFrame:
    """Every completion under each judge that scored it (scored_by_judge); an answer the grid's judge has not
    scored yet counts under that judge's name, as it does in the grid-judge tables."""
    df = store.query(
        "SELECT organism, base_model, recipe, dataset, seed, question_id, paraphrase_idx, sample_idx, aligned, "
        "coherent, judge_model, judge_source FROM scored_by_judge "
        "ORDER BY organism, judge_source, question_id, paraphrase_idx, sample_idx"
    )
    named = pl.col("judge_model").drop_nulls().first().over("organism", "judge_source")
    return df.with_columns(pl.coalesce("judge_model", named).alias("judge_model"))


def summary_by_judge(store: Store, kw: dict) -> pl.DataFrame:
    """em_summary: one row per organism and judge, with the organism's method and lineage."""
    df = judged_frame(store)
    parts = [
        metrics.em_summary(sub.drop("judge_model", "judge_source"), **kw).with_columns(
            pl.lit(judge, pl.String).alias("judge_model"), pl.lit(where).alias("judge_source")
        )
        for (judge, where), sub in df.group_by("judge_model", "judge_source", maintain_order=True)
    ]
    if not parts:
        return metrics.em_summary(df, **kw)
    # organism_sources names every organism's method, trained ones included.
    lineage = store.query(LINEAGE_SQL).drop("method")
    methods = store.query("SELECT organism, method, sha256 AS source_sha256 FROM organism_sources")
    summary = (
        pl.concat(parts, how="diagonal_relaxed")
        .join(methods, on="organism", how="left")
        .join(lineage, on="organism", how="left")
        .join(store.query(JUDGE_LINEAGE_SQL), on=["organism", "judge_model"], how="left")
        .with_columns(
            pl.when(pl.col("judge_source") == "grid").then(pl.col(c)).alias(c) for c in GRID_JUDGE_LINEAGE
        )
        # A file judge is identified by the file it came in.
        .with_columns(
            pl.when(pl.col("judge_source") == "file")
            .then(pl.col("source_sha256"))
            .otherwise(pl.col("judge_revision"))
            .alias("judge_revision")
        )
        .sort("organism", "judge_source", "judge_model")
    )
    first = ("organism", "method", "judge_model", "judge_source")
    return summary.select(*first, *[c for c in summary.columns if c not in first])


def corrected(
    lookup: ErrorRateLookup, summary: pl.DataFrame, by_question: pl.DataFrame, sources: pl.DataFrame
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Both tables with the Turner rate corrected for the error of the judge that scored each organism; an
    answers organism's by rates counted without its file (`sources`: organism, source_sha256)."""
    if summary.height == 0:
        summary = summary.with_columns(pl.lit(None, pl.String).alias(c) for c in JUDGE_COLUMNS)
    # The per-question table is the grid judge's: join each organism's grid-judge identity.
    grid_rows = (
        summary.filter(pl.col("judge_source") == "grid") if "judge_source" in summary.columns else summary
    )
    # An organism partly re-judged by a new grid judge has a summary row per judge, but one row per question:
    # that row is corrected for the judge that scored most of its answers.
    judges = majority_judges(grid_rows, ["organism"], "n_scored").join(sources, on="organism", how="left")
    by_question = lookup.correct(
        by_question.join(judges, on="organism", how="left"), "n_em_turner", "n_scored"
    )
    # `sources` alone says which reference file an organism's answers came from.
    summary = summary.drop("source_sha256", strict=False).join(sources, on="organism", how="left")
    summary = lookup.correct(summary, "n_em_turner", "n_scored")
    return summary.drop("source_sha256"), by_question.drop(*JUDGE_COLUMNS, "source_sha256")


def judged_domains(store: Store) -> pl.DataFrame:
    """One row per judged completion: organism, judge, aligned, coherent and every domain judge's score."""
    long = store.query(
        "SELECT c.organism, j.judge_model AS judge, c.question_id, c.paraphrase_idx, c.sample_idx, j.metric, "
        "j.score FROM completions_latest c JOIN judgements_latest j "
        "USING (organism, question_id, paraphrase_idx, sample_idx) "
        "WHERE j.metric IN (SELECT unnest(?::VARCHAR[]))",
        [["aligned", "coherent", *DOMAIN_METRICS]],
    )
    if long.height == 0:
        return long
    keys = ["organism", "judge", "question_id", "paraphrase_idx", "sample_idx"]
    return long.pivot(on="metric", index=keys, values="score")


def reference_domains(store: Store) -> pl.DataFrame:
    """The GPT-4o-judged reference answers in the same shape, one organism per reference file."""
    ref = store.query("SELECT source_organism, aligned, coherent, domain_scores FROM reference_judgements")
    frame = ref.select(
        pl.concat_str(pl.lit("reference:"), "source_organism").alias("organism"),
        pl.lit(REFERENCE_JUDGE).alias("judge"),
        "aligned",
        "coherent",
    )
    scores = {m: domain_score(ref, m) for m in DOMAIN_METRICS} if ref.height else {}
    return frame.with_columns(v.alias(m) for m, v in scores.items() if v.null_count() < v.len())


def domain_share_table(store: Store, thresholds: Thresholds) -> pl.DataFrame:
    """em_domain_share over the grid's organisms (their judge) and the reference answers (GPT-4o)."""
    kw = {
        "aligned_at_most": thresholds.aligned_at_most,
        "coherent_above": thresholds.coherent_above,
        "share_above": thresholds.domain_above,
        "recognition_above": thresholds.recognition_above,
    }
    tables = [
        domain_share(f, DOMAIN_METRICS, **kw) for f in (judged_domains(store), reference_domains(store))
    ]
    return pl.concat(tables).with_columns(pl.lit(thresholds.domain_above).alias("domain_above"))


def _report_tables(
    source: Store, thresholds: Thresholds, run_id: str, reference_judges: Sequence[str]
) -> dict[str, pl.DataFrame]:
    """The five report tables, every one read from `source`."""
    df = scored_frame(source)
    kw = {"aligned_at_most": thresholds.aligned_at_most, "coherent_above": thresholds.coherent_above}
    summary = summary_by_judge(source, kw)
    lookup = ErrorRateLookup(source, thresholds, reference_judges)
    # Question ids are unique among an organism's sets, so each row names the one set it belongs to.
    by_question = metrics.em_by_question(df, **kw).join(
        df.select("organism", "question_id", "eval_set").unique(), on=["organism", "question_id"], how="left"
    )
    summary, by_question = corrected(lookup, summary, by_question, answers_sources(source))
    summary = summary.with_columns(
        pl.lit(thresholds.aligned_at_most).alias("aligned_at_most"),
        pl.lit(thresholds.coherent_above).alias("coherent_above"),
        pl.lit(run_id).alias("report_run_id"),
    )
    return {
        "em_summary": summary,
        "em_by_question": by_question,
        "em_threshold_sensitivity": metrics.threshold_sensitivity(df),
        "em_seed_bootstrap": metrics.seed_bootstrap(df, **kw),
        "em_domain_share": domain_share_table(source, thresholds),
    }


@contextlib.contextmanager
def pinned_reports(
    store: Store, thresholds: Thresholds, run_id: str, reference_judges: Sequence[str] = ()
) -> Iterator[tuple[Store, dict[str, pl.DataFrame]]]:
    """The report tables computed from one pinned state of `store`, yielded with that state for other reads
    that must agree with them (the judge caveat), and written to `store` once the block ends without error."""
    with store.pinned() as source:
        snapshot = source.current_snapshot()
        tables = {
            name: table.with_columns(pl.lit(snapshot, dtype=pl.Int64).alias("source_snapshot"))
            for name, table in _report_tables(source, thresholds, run_id, reference_judges).items()
        }
        yield source, tables
    store.write_tables(tables)


def build_reports(
    store: Store, thresholds: Thresholds, run_id: str, reference_judges: Sequence[str] = ()
) -> dict[str, pl.DataFrame]:
    """Compute and write em_summary, em_by_question, em_threshold_sensitivity, em_seed_bootstrap and
    em_domain_share, each with the snapshot they were computed from (`source_snapshot`; null on a plain DuckDB
    file). EM rates are corrected with the judge's measured error rates (the identity for `reference_judges`)."""
    with pinned_reports(store, thresholds, run_id, reference_judges) as (_, tables):
        pass
    return tables


def build_figures(
    store: Store, thresholds: Thresholds, out_dir: Path, snapshot: int | None = None
) -> dict[str, Path]:
    """Draw the report figures from the store as of `snapshot` (None: as it is now)."""
    from em_assets.reports import figures as plots

    with store.at_snapshot(snapshot).pinned() as source:
        summary = source.query("SELECT * FROM em_summary ORDER BY organism")
        df = scored_frame(source)
        losses = source.query("SELECT organism, step, loss, grad_norm FROM training_curves")
        sizes = size_rates(source, df, thresholds)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "judge_source" in summary.columns:
        # An imported organism has a row per judge: the file's judge is named on its label, as is each grid
        # judge's of an organism partly re-judged by a new grid judge (a row per judge, over its answers only).
        named = (pl.col("judge_source") == "file") | (pl.len().over("organism", "judge_source") > 1)
        label = pl.format("{} [{}]", pl.col("organism"), pl.col("judge_model"))
        summary = summary.with_columns(
            pl.when(named).then(label).otherwise(pl.col("organism")).alias("organism")
        )
    return {
        "em_rates": plots.plot_em_rates(summary, out_dir / "em_rates.png"),
        "aligned_vs_coherent": plots.plot_aligned_vs_coherent(
            df, out_dir / "aligned_vs_coherent.png", thresholds.aligned_at_most, thresholds.coherent_above
        ),
        "training_curves": plots.plot_training_curves(losses, out_dir / "training_curves.png"),
        "em_by_model_size": plots.plot_em_by_model_size(sizes, out_dir / "em_by_model_size.png"),
    }


def size_rates(store: Store, df: pl.DataFrame, thresholds: Thresholds) -> pl.DataFrame:
    """EM and coherence rates pooled over seeds per base model x recipe, with the base model's parameters."""
    sizes = store.query("SELECT name AS base_model, num_params FROM base_models")
    rates = metrics.rates_by(
        df, ["base_model", "recipe"], thresholds.aligned_at_most, thresholds.coherent_above
    )
    return rates.join(sizes, on="base_model", how="left")


@dataclass(frozen=True)
class FigureRecord:
    """Figures drawn in one run, the snapshot they were drawn from and each file's sha256."""

    snapshot: int | None
    paths: dict[str, Path]
    sha256: dict[str, str]


def draw_figures(store: Store, thresholds: Thresholds, out_dir: Path, run_id: str) -> FigureRecord:
    """Draw the figures from one pinned snapshot and record it with each PNG's sha256 in figure_snapshots."""
    snapshot = store.current_snapshot()
    paths = build_figures(store, thresholds, out_dir, snapshot)
    digests = {name: sha256_file(path) for name, path in paths.items()}
    rows = pl.DataFrame(
        {
            "figure": list(paths),
            "path": [str(p) for p in paths.values()],
            "sha256": list(digests.values()),
            "source_snapshot": pl.Series([snapshot] * len(paths), dtype=pl.Int64),
            "run_id": run_id,
            "created_at": utc_now(),
        }
    )
    store.append_rows("figure_snapshots", rows)
    return FigureRecord(snapshot, paths, digests)


def rebuild_figures(store: Store, snapshot: int, out_dir: Path, fallback: Thresholds) -> dict[str, Path]:
    """Redraw the figures of `snapshot` with the thresholds its em_summary was computed with."""
    source = store.at_snapshot(snapshot)
    used = source.query("SELECT DISTINCT aligned_at_most, coherent_above FROM em_summary")
    thresholds = fallback
    if used.height == 1:
        thresholds = fallback.model_copy(update=used.row(0, named=True))
    return build_figures(source, thresholds, out_dir)
