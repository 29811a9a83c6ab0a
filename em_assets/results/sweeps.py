"""SQL behind model-variant sweeps: their completions, judgements and points, one organism at a time.

Rows are keyed by (organism, sweep, setting, question_id, paraphrase_idx, sample_idx[, metric]); a row belongs to
its point's current settings only while its setting_hash matches the point's.
"""

from __future__ import annotations

import polars as pl

from em_assets.results.queries import REFUSED_SQL
from em_assets.results.store import Store

_PAIRS = {"sweep": pl.String, "setting": pl.String}


_KEYS = {**_PAIRS, "question_id": pl.String, "paraphrase_idx": pl.Int32, "sample_idx": pl.Int32}


_MATCH_PAIR = "p.sweep = t.sweep AND p.setting = t.setting"


_MATCH_KEY = (
    "k.sweep = t.sweep AND k.setting = t.setting AND k.question_id = t.question_id "
    "AND k.paraphrase_idx = t.paraphrase_idx AND k.sample_idx = t.sample_idx"
)


def _frame(rows: list[tuple], schema: dict) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=schema, orient="row")


class SweepTables:
    """Named reads and writes of one organism's sweep rows."""

    def __init__(self, store: Store, organism: str):
        self.store, self.organism = store, organism

    def _select(self, table: str, columns: str, pairs: list[tuple[str, str]]) -> pl.DataFrame:
        with self.store.connect() as conn:
            conn.register("_pairs", _frame(pairs, _PAIRS).to_arrow())
            return conn.execute(
                f"SELECT {columns} FROM {table} t WHERE organism = ? AND EXISTS "
                f"(SELECT 1 FROM _pairs p WHERE {_MATCH_PAIR}) ORDER BY ALL",
                [self.organism],
            ).pl()

    def completion_keys(self, pairs: list[tuple[str, str]]) -> pl.DataFrame:
        cols = "sweep, setting, question_id, paraphrase_idx, sample_idx, setting_hash, question, system"
        return self._select("sweep_completions", cols, pairs)

    def completions(self, pairs: list[tuple[str, str]]) -> pl.DataFrame:
        return self._select("sweep_completions", "*", pairs)

    def completions_with_hash(self, setting_hash: str) -> pl.DataFrame:
        """Answers of any sweep point of the organism drawn under this setting hash: one row per sample key and
        prompt (question, system), as points of other sweeps may hold answers to a question's older text."""
        return self.store.query(
            "SELECT * FROM sweep_completions WHERE organism = ? AND setting_hash = ? QUALIFY row_number() OVER "
            "(PARTITION BY question_id, paraphrase_idx, sample_idx, question, system ORDER BY created_at) = 1",
            [self.organism, setting_hash],
        )

    def judgement_keys(self, pairs: list[tuple[str, str]]) -> pl.DataFrame:
        """Each judgement's key, cache key and setting hash, and whether the judge's server refused it."""
        cols = "sweep, setting, question_id, paraphrase_idx, sample_idx, metric, cache_key, setting_hash"
        return self._select("sweep_judgements", f"{cols}, {REFUSED_SQL} AS refused", pairs)

    def scored(self, pairs: list[tuple[str, str]]) -> pl.DataFrame:
        """One row per current completion with its aligned and coherent scores (null until judged)."""
        return self._select("sweep_scored", "*", pairs)

    def keep_only(self, pairs: list[tuple[str, str]], keep: list[tuple]) -> None:
        """Delete the points' completions (and their judgements) outside `keep` (sweep, setting, q, p, s)."""

        def work(conn) -> None:
            conn.register("_pairs", _frame(pairs, _PAIRS).to_arrow())
            conn.register("_keep", _frame(keep, _KEYS).to_arrow())
            for table in ("sweep_completions", "sweep_judgements"):
                conn.execute(
                    f"DELETE FROM {table} t WHERE organism = ? "
                    f"AND EXISTS (SELECT 1 FROM _pairs p WHERE {_MATCH_PAIR}) "
                    f"AND NOT EXISTS (SELECT 1 FROM _keep k WHERE {_MATCH_KEY})",
                    [self.organism],
                )

        # One transaction (retried on a DuckLake conflict): no judgement may outlive the answer it scores.
        self.store.write(work, "drop stale sweep answers")

    def drop_other_settings(self, sweeps: list[str], pairs: list[tuple[str, str]]) -> None:
        """Delete the sweeps' points, answers and judgements whose (sweep, setting) is not in `pairs`: settings
        a sweep no longer plans (a retrained organism's checkpoints, changed scales) leave no rows behind."""

        def work(conn) -> None:
            conn.register("_sweeps", pl.DataFrame({"sweep": sweeps}, schema={"sweep": pl.String}).to_arrow())
            conn.register("_pairs", _frame(pairs, _PAIRS).to_arrow())
            for table in ("sweep_judgements", "sweep_completions", "sweep_points"):
                conn.execute(
                    f"DELETE FROM {table} t WHERE organism = ? AND sweep IN (SELECT sweep FROM _sweeps) "
                    f"AND NOT EXISTS (SELECT 1 FROM _pairs p WHERE {_MATCH_PAIR})",
                    [self.organism],
                )

        self.store.write(work, "drop sweep settings no longer planned")

    def drop_judgements(self, stale: list[tuple]) -> None:
        """Delete judgements by (sweep, setting, q, p, s, metric)."""
        if not stale:
            return

        def work(conn) -> None:
            conn.register("_stale", _frame(stale, {**_KEYS, "metric": pl.String}).to_arrow())
            conn.execute(
                f"DELETE FROM sweep_judgements t WHERE organism = ? AND EXISTS (SELECT 1 FROM _stale k "
                f"WHERE {_MATCH_KEY} AND k.metric = t.metric)",
                [self.organism],
            )

        self.store.write(work, "drop stale sweep judgements")

    def write_points(self, points: pl.DataFrame) -> None:
        """Record the points as last run (a point run again replaces its row; others stay)."""
        self.store.append_rows("sweep_points", points)

    def append_completions(self, rows: list[dict]) -> None:
        self.store.append_rows("sweep_completions", pl.DataFrame(rows, infer_schema_length=None))

    def append_judgements(self, rows: list[dict]) -> None:
        if rows:
            self.store.append_rows("sweep_judgements", pl.DataFrame(rows, infer_schema_length=None))


def checkpoints(store: Store, organism: str) -> pl.DataFrame:
    """The organism's kept checkpoints and final adapter, in step order."""
    return store.query("SELECT * FROM lora_checkpoints WHERE organism = ? ORDER BY step", [organism])


def replace_result(store: Store, table: str, organism: str, rows: pl.DataFrame) -> None:
    """An analysis table's rows for one organism, replaced in one transaction (none: the old rows go)."""
    store.replace_rows(table, rows, "organism = ?", [organism])
