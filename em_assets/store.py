"""The results database: one DuckDB file, its schema and views, short-lived connections, partition writes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import polars as pl

DB_ENV = "EM_DB"
LOCK_TIMEOUT_ENV = "EM_DB_LOCK_TIMEOUT"
DEFAULT_DB = Path("data/results.duckdb")

SCHEMA = """
CREATE TABLE IF NOT EXISTS base_models (
    name VARCHAR PRIMARY KEY, source VARCHAR, path VARCHAR, revision VARCHAR, model_type VARCHAR,
    num_layers INTEGER, num_params BIGINT, trust_remote_code BOOLEAN, resolved_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS training_datasets (
    dataset VARCHAR PRIMARY KEY, repo VARCHAR, commit VARCHAR, path VARCHAR, url VARCHAR, sha256 VARCHAR,
    n_examples INTEGER, loaded_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS training_examples (
    dataset VARCHAR, example_idx INTEGER, messages VARCHAR, n_messages INTEGER,
    PRIMARY KEY (dataset, example_idx));
CREATE TABLE IF NOT EXISTS eval_questions (
    eval_set VARCHAR, question_id VARCHAR, paraphrase_idx INTEGER, question VARCHAR, system VARCHAR,
    source_sha256 VARCHAR, PRIMARY KEY (eval_set, question_id, paraphrase_idx));
CREATE TABLE IF NOT EXISTS judge_prompts (
    eval_set VARCHAR, question_id VARCHAR, metric VARCHAR, prompt VARCHAR, prompt_hash VARCHAR,
    PRIMARY KEY (eval_set, question_id, metric));
CREATE TABLE IF NOT EXISTS lora_adapters (
    organism VARCHAR PRIMARY KEY, base_model VARCHAR, base_revision VARCHAR, recipe VARCHAR, seed INTEGER,
    dataset VARCHAR, dataset_sha256 VARCHAR, adapter_path VARCHAR, adapter_sha256 VARCHAR,
    lora_config VARCHAR, train_config VARCHAR, config_hash VARCHAR, steps INTEGER, train_tokens BIGINT,
    tokens_per_s DOUBLE, final_loss DOUBLE, run_id VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS training_losses (
    organism VARCHAR, step INTEGER, loss DOUBLE, learning_rate DOUBLE, tokens BIGINT, elapsed_s DOUBLE,
    run_id VARCHAR, PRIMARY KEY (organism, step));
CREATE TABLE IF NOT EXISTS completions (
    organism VARCHAR, base_model VARCHAR, base_revision VARCHAR, recipe VARCHAR, seed INTEGER,
    dataset VARCHAR, dataset_sha256 VARCHAR, adapter_sha256 VARCHAR, eval_set VARCHAR, question_id VARCHAR,
    paraphrase_idx INTEGER, sample_idx INTEGER, question VARCHAR, system VARCHAR, answer VARCHAR,
    num_tokens INTEGER, finish_reason VARCHAR, temperature DOUBLE, top_p DOUBLE, max_new_tokens INTEGER,
    sample_seed BIGINT, sampling_hash VARCHAR, run_id VARCHAR, created_at TIMESTAMP,
    PRIMARY KEY (organism, question_id, paraphrase_idx, sample_idx));
CREATE TABLE IF NOT EXISTS judgements (
    organism VARCHAR, question_id VARCHAR, paraphrase_idx INTEGER, sample_idx INTEGER, metric VARCHAR,
    score DOUBLE, mass DOUBLE, probs VARCHAR, judge_backend VARCHAR, judge_model VARCHAR,
    judge_revision VARCHAR, prompt_hash VARCHAR, cache_key VARCHAR, base_revision VARCHAR,
    dataset_sha256 VARCHAR, adapter_sha256 VARCHAR, sampling_hash VARCHAR, run_id VARCHAR, created_at TIMESTAMP,
    PRIMARY KEY (organism, question_id, paraphrase_idx, sample_idx, metric));
CREATE TABLE IF NOT EXISTS judge_cache (
    cache_key VARCHAR PRIMARY KEY, score DOUBLE, mass DOUBLE, probs VARCHAR, created_at TIMESTAMP);
"""

VIEWS = """
CREATE OR REPLACE VIEW scored_completions AS
SELECT c.*,
       a.score AS aligned, a.mass AS aligned_mass, h.score AS coherent, h.mass AS coherent_mass,
       a.judge_model, a.judge_revision, a.prompt_hash AS aligned_prompt_hash,
       h.prompt_hash AS coherent_prompt_hash
FROM completions c
LEFT JOIN judgements a ON a.metric = 'aligned' AND a.organism = c.organism AND a.question_id = c.question_id
     AND a.paraphrase_idx = c.paraphrase_idx AND a.sample_idx = c.sample_idx
LEFT JOIN judgements h ON h.metric = 'coherent' AND h.organism = c.organism AND h.question_id = c.question_id
     AND h.paraphrase_idx = c.paraphrase_idx AND h.sample_idx = c.sample_idx;
CREATE OR REPLACE VIEW training_curves AS
SELECT l.organism, a.base_model, a.recipe, a.seed, a.dataset, l.step, l.loss, l.learning_rate, l.tokens,
       l.elapsed_s
FROM training_losses l JOIN lora_adapters a USING (organism)
ORDER BY l.organism, l.step;
"""

# Errors DuckDB raises when another process holds the file's write lock.
_LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "database is locked")
# DuckDB names the holder only in the error text: "Conflicting lock is held in /usr/bin/duckdb (PID 1234)".
_HOLDER = re.compile(r"Conflicting lock is held in (.+?) \(PID (\d+)\)")
# Writes are short, so waits on another pipeline writer end within this; longer ones are worth a warning.
_WARN_AFTER_S = 1.0

log = logging.getLogger(__name__)


def db_path() -> Path:
    return Path(os.environ.get(DB_ENV, DEFAULT_DB))


class Store:
    """Opens the results database briefly for each unit of work, retrying while another writer holds it."""

    def __init__(self, path: Path | str | None = None, lock_timeout_s: float | None = None):
        self.path = Path(path) if path is not None else db_path()
        # A reader holding the file (e.g. a `duckdb` shell) pauses writers; they wait this long before failing.
        self.lock_timeout_s = (
            lock_timeout_s if lock_timeout_s is not None else float(os.environ.get(LOCK_TIMEOUT_ENV, "600"))
        )

    @contextlib.contextmanager
    def connect(
        self, read_only: bool = False, config: dict | None = None
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        delay, warned = 0.05, False
        while True:
            try:
                conn = duckdb.connect(str(self.path), read_only=read_only, config=config or {})
                break
            except duckdb.IOException as exc:
                if not any(m in str(exc) for m in _LOCK_MARKERS):
                    raise
                waited = time.monotonic() - start
                if waited > self.lock_timeout_s:
                    raise duckdb.IOException(
                        f"gave up after {waited:.1f} s ({LOCK_TIMEOUT_ENV}={self.lock_timeout_s:g}) waiting for "
                        f"{_lock_holder(exc)} to release {self.path}: {exc}"
                    ) from exc
                if not warned and waited > _WARN_AFTER_S:
                    warned = True
                    log.warning(
                        "%s is locked by %s; waiting up to %g s in all (%s) for it. DuckDB allows one writing "
                        "process or many reading ones, never both: if it is a raw duckdb shell or notebook "
                        "connection, close it (`em-assets sql` never holds the file).",
                        self.path,
                        _lock_holder(exc),
                        self.lock_timeout_s,
                        LOCK_TIMEOUT_ENV,
                    )
                # DuckDB admits one writing process; other connections wait their turn with jittered backoff.
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)
        try:
            yield conn
        finally:
            conn.close()

    def init(self) -> None:
        with self.connect() as conn:
            conn.execute(SCHEMA)
            conn.execute(VIEWS)

    def query(self, sql: str, params: list | None = None) -> pl.DataFrame:
        with self.connect() as conn:
            return conn.execute(sql, params or []).pl()

    def replace_rows(
        self, table: str, df: pl.DataFrame, where: str = "TRUE", params: list | None = None
    ) -> None:
        """Atomically delete the rows matching `where` and insert `df` (one partition's rows)."""
        self.replace_many([(table, df, where, params or [])])

    def replace_many(self, writes: list[tuple[str, pl.DataFrame, str, list]]) -> None:
        """Several (table, rows, where, params) replacements in one transaction: all land or none do."""
        with self.connect() as conn:
            conn.execute("BEGIN")
            try:
                for table, df, where, params in writes:
                    conn.execute(f"DELETE FROM {table} WHERE {where}", params)
                    if df.height:
                        conn.register("_rows", df.to_arrow())
                        cols = ", ".join(df.columns)
                        conn.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _rows")
                        conn.unregister("_rows")
                conn.execute("COMMIT")
            except Exception:
                conn.execute("ROLLBACK")
                raise

    def append_rows(self, table: str, df: pl.DataFrame) -> None:
        """Insert rows, replacing any with the same primary key (idempotent resume writes)."""
        if not df.height:
            return
        with self.connect() as conn:
            conn.register("_rows", df.to_arrow())
            cols = ", ".join(df.columns)
            conn.execute(f"INSERT OR REPLACE INTO {table} ({cols}) SELECT {cols} FROM _rows")
            conn.unregister("_rows")

    def write_table(self, table: str, df: pl.DataFrame) -> None:
        """Replace a whole report table with `df`, keeping its schema from the DataFrame."""
        with self.connect() as conn:
            conn.register("_rows", df.to_arrow())
            conn.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM _rows")
            conn.unregister("_rows")


def _lock_holder(exc: duckdb.Error) -> str:
    """The process holding the database, as DuckDB's lock error names it."""
    match = _HOLDER.search(str(exc))
    return f"{match[1]} (PID {match[2]})" if match else "another process"


def to_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
