"""Tables and named queries of judge validation: reference judgements, distilled judges, agreement."""

from __future__ import annotations

import polars as pl

from em_assets.results.store import Store

JUDGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS reference_judgements (
    source_file VARCHAR, source_sha256 VARCHAR, source_organism VARCHAR, base_model VARCHAR, dataset VARCHAR,
    seed BIGINT, row_idx BIGINT, question_id VARCHAR, question VARCHAR, answer VARCHAR, aligned DOUBLE,
    coherent DOUBLE, domain_scores VARCHAR, split VARCHAR, loaded_at TIMESTAMP,
    PRIMARY KEY (source_file, row_idx));
CREATE TABLE IF NOT EXISTS distilled_judges (
    config_hash VARCHAR PRIMARY KEY, source VARCHAR, base_revision VARCHAR, adapter_path VARCHAR,
    adapter_sha256 VARCHAR, prompt_hash VARCHAR, reference_sha256 VARCHAR, held_out_base_models VARCHAR,
    n_examples INTEGER, lora_config VARCHAR, train_config VARCHAR, steps INTEGER, train_tokens BIGINT,
    tokens_per_s DOUBLE, final_loss DOUBLE, run_id VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS distilled_judge_losses (
    config_hash VARCHAR, step INTEGER, loss DOUBLE, learning_rate DOUBLE, tokens BIGINT, elapsed_s DOUBLE,
    run_id VARCHAR, PRIMARY KEY (config_hash, step));
CREATE TABLE IF NOT EXISTS judge_agreement (
    judge VARCHAR, judge_model VARCHAR, judge_revision VARCHAR, metric VARCHAR, n BIGINT, spearman DOUBLE,
    pearson DOUBLE, mae DOUBLE, auc DOUBLE, seconds DOUBLE, run_id VARCHAR, created_at TIMESTAMP,
    PRIMARY KEY (judge, metric));
CREATE TABLE IF NOT EXISTS judge_agreement_em (
    judge VARCHAR, source_file VARCHAR, source_organism VARCHAR, n BIGINT, n_reference BIGINT,
    reference DOUBLE, reference_lo DOUBLE, reference_hi DOUBLE, n_judge BIGINT, judge_rate DOUBLE,
    judge_lo DOUBLE, judge_hi DOUBLE, run_id VARCHAR, PRIMARY KEY (judge, source_file));
CREATE TABLE IF NOT EXISTS judge_agreement_scores (
    judge VARCHAR, source_file VARCHAR, row_idx BIGINT, metric VARCHAR, reference DOUBLE, score DOUBLE,
    mass DOUBLE, run_id VARCHAR, PRIMARY KEY (judge, source_file, row_idx, metric));
"""


def ensure_tables(store: Store) -> None:
    with store.connect() as conn:
        conn.execute(JUDGE_SCHEMA)


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


def cached_scores(store: Store, keys: list[str]) -> dict[str, dict]:
    """judge_cache rows by cache key (the cache the judgements stage shares)."""
    df = store.query(
        "SELECT cache_key, score, mass FROM judge_cache WHERE cache_key IN (SELECT unnest(?::VARCHAR[]))",
        [sorted(set(keys))],
    )
    return {r["cache_key"]: r for r in df.iter_rows(named=True)}


def write_agreement(
    store: Store, judge: str, metrics: pl.DataFrame, em: pl.DataFrame, scores: pl.DataFrame
) -> None:
    """One judge's agreement tables, replaced together."""
    store.replace_many(
        [
            ("judge_agreement", metrics, "judge = ?", [judge]),
            ("judge_agreement_em", em, "judge = ?", [judge]),
            ("judge_agreement_scores", scores, "judge = ?", [judge]),
        ]
    )


def agreement_rows(store: Store, judge: str) -> pl.DataFrame:
    """The latest agreement of `judge` per metric, plus its largest EM-rate gap; empty if never measured."""
    ensure_tables(store)
    return store.query(
        "SELECT a.metric, a.n, a.spearman, a.auc, a.judge_revision, "
        "(SELECT max(abs(e.reference - e.judge_rate)) FROM judge_agreement_em e WHERE e.judge = a.judge) AS gap "
        "FROM judge_agreement a WHERE a.judge = ? ORDER BY a.metric",
        [judge],
    )
