"""Tables and named queries of the direction analyses: directions, steering, ablation, similarity."""

from __future__ import annotations

import polars as pl

from em_assets.results.store import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS misalignment_directions (
    organism VARCHAR PRIMARY KEY, base_model VARCHAR, recipe VARCHAR, seed INTEGER, status VARCHAR,
    contrast VARCHAR, message VARCHAR, n_misaligned_found INTEGER, n_aligned_found INTEGER, n_per_class INTEGER,
    min_per_class INTEGER, num_layers INTEGER, hidden_size INTEGER, direction_path VARCHAR,
    direction_sha256 VARCHAR, random_path VARCHAR, random_sha256 VARCHAR, input_hash VARCHAR,
    adapter_sha256 VARCHAR, sampling_hash VARCHAR, judge_model VARCHAR, aligned_at_most DOUBLE,
    aligned_above DOUBLE, coherent_above DOUBLE, run_id VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS direction_layers (
    organism VARCHAR, layer INTEGER, norm DOUBLE, random_norm DOUBLE, misaligned_mean_norm DOUBLE,
    aligned_mean_norm DOUBLE, direction_sha256 VARCHAR, PRIMARY KEY (organism, layer));
CREATE TABLE IF NOT EXISTS steering_results (
    organism VARCHAR, setting VARCHAR, vector VARCHAR, layer INTEGER, scale DOUBLE, n INTEGER,
    em_rate DOUBLE, em_lo DOUBLE, em_hi DOUBLE, coherence_rate DOUBLE, mean_aligned DOUBLE,
    direction_sha256 VARCHAR, contrast VARCHAR, setting_hash VARCHAR, run_id VARCHAR, created_at TIMESTAMP,
    PRIMARY KEY (organism, setting));
CREATE TABLE IF NOT EXISTS direction_ablation (
    organism VARCHAR, setting VARCHAR, source_layer INTEGER, n INTEGER, em_rate DOUBLE, em_lo DOUBLE,
    em_hi DOUBLE, coherence_rate DOUBLE, mean_aligned DOUBLE, direction_sha256 VARCHAR, contrast VARCHAR,
    setting_hash VARCHAR, run_id VARCHAR, created_at TIMESTAMP, PRIMARY KEY (organism, setting));
"""


def ensure_tables(store: Store) -> None:
    with store.connect() as conn:
        conn.execute(SCHEMA)


def scored_answers(store: Store, organism: str) -> pl.DataFrame:
    """The organism's answers with their aligned and coherent scores and the lineage behind them."""
    return store.query(
        "SELECT question_id, paraphrase_idx, sample_idx, question, system, answer, aligned, coherent, "
        "sampling_hash, adapter_sha256, judge_model FROM scored_completions WHERE organism = ? "
        "ORDER BY question_id, paraphrase_idx, sample_idx",
        [organism],
    )


def direction_row(store: Store, organism: str) -> dict | None:
    df = store.query("SELECT * FROM misalignment_directions WHERE organism = ?", [organism])
    return df.row(0, named=True) if df.height else None


def write_direction(store: Store, organism: str, row: pl.DataFrame, layers: pl.DataFrame) -> None:
    """The organism's direction row and its per-layer norms, replaced together."""
    where = "organism = ?"
    store.replace_many(
        [("misalignment_directions", row, where, [organism]), ("direction_layers", layers, where, [organism])]
    )


def computed_directions(store: Store) -> pl.DataFrame:
    """Every organism with a direction file, for the similarity report."""
    return store.query(
        "SELECT organism, base_model, recipe, seed, contrast, direction_path, direction_sha256 "
        "FROM misalignment_directions WHERE direction_path IS NOT NULL ORDER BY base_model, organism"
    )


def write_results(store: Store, table: str, organism: str, rows: pl.DataFrame) -> None:
    store.replace_rows(table, rows, "organism = ?", [organism])


def read_table(store: Store, table: str, organism: str | None = None) -> pl.DataFrame:
    if organism is None:
        return store.query(f"SELECT * FROM {table} ORDER BY ALL")
    return store.query(f"SELECT * FROM {table} WHERE organism = ? ORDER BY ALL", [organism])
