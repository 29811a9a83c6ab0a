"""Tables and named queries of the direction analyses: directions, steering, ablation, similarity."""

from __future__ import annotations

import polars as pl

from em_assets.results.store import Store


def scored_answers(store: Store, organism: str) -> pl.DataFrame:
    """The organism's answers with their aligned and coherent scores and the lineage behind them."""
    return store.query(
        "SELECT eval_set, question_id, paraphrase_idx, sample_idx, question, system, answer, aligned, coherent, "
        "sampling_hash, base_revision, adapter_sha256, judge_model, judge_revision FROM scored_completions "
        "WHERE organism = ? "
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
