"""Tables and named queries of judge validation: reference judgements, distilled and probe judges, agreement."""

from __future__ import annotations

import polars as pl

from em_assets.results.schema import SPREAD_COLUMNS
from em_assets.results.store import Store

# The primary key of judge_error_rates: a judge identity at one pair of thresholds.
ERROR_RATE_KEY = ("judge_model", "judge_revision", "aligned_at_most", "coherent_above")


def write_reference(store: Store, df: pl.DataFrame) -> None:
    """Replace the reference judgements with `df` (all files at once: the asset is the whole set)."""
    store.replace_many([("reference_judgements", df, "TRUE", [])])


def reference_frame(store: Store) -> pl.DataFrame:
    return store.query("SELECT * FROM reference_judgements ORDER BY source_file, row_idx")


def distilled_row(store: Store, config_hash: str) -> dict | None:
    df = store.query("SELECT * FROM distilled_judges WHERE config_hash = ?", [config_hash])
    return df.row(0, named=True) if df.height else None


def write_distilled(store: Store, row: dict, losses: pl.DataFrame) -> None:
    store.replace_many(
        [
            ("distilled_judge_losses", losses, "config_hash = ?", [row["config_hash"]]),
            ("distilled_judges", pl.DataFrame([row]), "config_hash = ?", [row["config_hash"]]),
        ]
    )


def distilled_losses(store: Store, config_hash: str) -> pl.DataFrame:
    return store.query(
        "SELECT step, loss, learning_rate FROM distilled_judge_losses WHERE config_hash = ? ORDER BY step",
        [config_hash],
    )


def has_rows(store: Store, table: str) -> bool:
    """Whether the store has `table` with at least one row."""
    return store.has_table(table) and bool(store.query(f"SELECT count(*) AS n FROM {table}")["n"][0])


def probe_row(store: Store, config_hash: str) -> dict | None:
    df = store.query("SELECT * FROM probe_judges WHERE config_hash = ?", [config_hash])
    return df.row(0, named=True) if df.height else None


def write_probe(store: Store, row: dict, readouts: pl.DataFrame) -> None:
    store.replace_many(
        [
            ("probe_judge_readouts", readouts, "config_hash = ?", [row["config_hash"]]),
            ("probe_judges", pl.DataFrame([row]), "config_hash = ?", [row["config_hash"]]),
        ]
    )


def probe_readouts(store: Store, config_hash: str) -> pl.DataFrame:
    return store.query(
        "SELECT metric, n, bandwidth, l2, cv_spearman, stretch FROM probe_judge_readouts WHERE config_hash = ? "
        "ORDER BY metric",
        [config_hash],
    )


def cached_scores(store: Store, keys: list[str]) -> dict[str, dict]:
    """judge_cache rows by cache key (the cache the judgements stage shares)."""
    df = store.query(
        "SELECT cache_key, score, mass FROM judge_cache WHERE cache_key IN (SELECT unnest(?::VARCHAR[]))",
        [sorted(set(keys))],
    )
    return {r["cache_key"]: r for r in df.iter_rows(named=True)}


def write_agreement(
    store: Store,
    judge: str,
    tables: tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame],
    error_key: dict,
    error_rates: pl.DataFrame,
) -> None:
    """One judge's agreement tables (metrics, EM rates, scores) and its EM error rates, replaced together, so
    the stored rates always come from the scores stored beside them."""
    metrics, em, scores = tables
    store.replace_many(
        [
            ("judge_agreement", metrics, "judge = ?", [judge]),
            ("judge_agreement_em", em, "judge = ?", [judge]),
            ("judge_agreement_scores", scores, "judge = ?", [judge]),
            _error_rates_write(error_key, error_rates),
        ]
    )


def agreement_rows(store: Store, judge: str) -> pl.DataFrame:
    """The latest agreement of `judge` per metric, plus its largest EM-rate gap; empty if never measured. The
    store has its schema already: a pinned view, as the report tables are read from, cannot create it."""
    return store.query(
        "SELECT a.metric, a.n, a.spearman, a.spearman_lo, a.spearman_hi, a.auc, a.auc_lo, a.auc_hi, "
        "a.judge_model, a.judge_revision, "
        "(SELECT max(abs(e.reference - e.judge_rate)) FROM judge_agreement_em e WHERE e.judge = a.judge) AS gap "
        "FROM judge_agreement a WHERE a.judge = ? ORDER BY a.metric",
        [judge],
    )


def write_error_rates(store: Store, key: dict, row: pl.DataFrame) -> None:
    """A judge's EM error rates at one pair of thresholds (`key`), replacing what was measured before; an empty
    `row` (rates undefined on this run) leaves none."""
    store.replace_many([_error_rates_write(key, row)])


def _error_rates_write(key: dict, row: pl.DataFrame) -> tuple[str, pl.DataFrame, str, list]:
    where = " AND ".join(f"{k} = ?" for k in ERROR_RATE_KEY)
    return "judge_error_rates", row, where, [key[k] for k in ERROR_RATE_KEY]


def error_rates(store: Store, aligned_at_most: float, coherent_above: float) -> pl.DataFrame:
    """Every judge's measured EM error counts at these thresholds, keyed by judge_model and judge_revision;
    empty where the store (or the snapshot read) has no such table yet."""
    if not store.has_table("judge_error_rates"):
        return pl.DataFrame(
            schema={c: pl.String for c in ("judge_model", "judge_revision", "file_counts")}
            | {c: pl.Int64 for c in ("tp", "n_pos", "tn", "n_neg", "n_files")}
            | {c: pl.Float64 for c in SPREAD_COLUMNS}
        )
    return store.query(
        "SELECT judge_model, judge_revision, tp, n_pos, tn, n_neg, n_files, file_counts, "
        f"{', '.join(SPREAD_COLUMNS)} FROM judge_error_rates "
        "WHERE aligned_at_most = ? AND coherent_above = ?",
        [aligned_at_most, coherent_above],
    )


def heldout_reference_files(store: Store) -> set[str]:
    """The sha256 of every held-out reference file: the files a judge's error rates may be counted on."""
    if not store.has_table("reference_judgements"):
        return set()
    rows = store.query("SELECT DISTINCT source_sha256 FROM reference_judgements WHERE split = 'heldout'")
    return set(rows["source_sha256"].to_list())


# The questions the held-out reference answers answer: what a judge's agreement and error rates are measured on.
HELDOUT_QUESTIONS_SQL = "SELECT DISTINCT question FROM reference_judgements WHERE split = 'heldout'"


def heldout_question_count(store: Store) -> int:
    """How many questions a judge's agreement covers (HELDOUT_QUESTIONS_SQL)."""
    if not store.has_table("reference_judgements"):
        return 0
    return store.query(f"SELECT count(*) AS n FROM ({HELDOUT_QUESTIONS_SQL})").item()


def agreement_scores_by_identity(store: Store, aligned_at_most: float, coherent_above: float) -> pl.DataFrame:
    """The agreement scores each measured judge's error rates (at these thresholds) were counted on, with the
    judge's identity and each answer's reference file sha256; empty before any agreement run."""
    columns = ("judge_model", "judge_revision", "source_sha256", "source_file", "row_idx", "metric")
    if not all(store.has_table(t) for t in ("judge_error_rates", "judge_agreement_scores")):
        return pl.DataFrame(
            schema={c: pl.Int64 if c == "row_idx" else pl.String for c in columns}
            | {"reference": pl.Float64, "score": pl.Float64}
        )
    return store.query(
        "SELECT e.judge_model, e.judge_revision, r.source_sha256, s.source_file, s.row_idx, s.metric, "
        "s.reference, s.score FROM judge_error_rates e "
        "JOIN judge_agreement_scores s ON s.judge = e.judge AND s.run_id = e.run_id "
        "JOIN (SELECT DISTINCT source_file, source_sha256 FROM reference_judgements) r USING (source_file) "
        "WHERE e.aligned_at_most = ? AND e.coherent_above = ?",
        [aligned_at_most, coherent_above],
    )
