"""The results database: one DuckDB file, short-lived connections, partition writes."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import polars as pl

from em_assets.results.schema import SCHEMA, VIEWS
from em_assets.settings import LOCK_TIMEOUT_ENV, settings

# Errors DuckDB raises when another process holds the file's write lock.
_LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "database is locked")


# DuckDB names the holder only in the error text: "Conflicting lock is held in /usr/bin/duckdb (PID 1234)".
_HOLDER = re.compile(r"Conflicting lock is held in (.+?) \(PID (\d+)\)")


# Writes are short, so waits on another pipeline writer end within this; longer ones are worth a warning.
_WARN_AFTER_S = 1.0


log = logging.getLogger(__name__)


class Store:
    """Opens the results database briefly for each unit of work, retrying while another writer holds it."""

    def __init__(self, path: Path | str | None = None, lock_timeout_s: float | None = None):
        current = settings()
        self.path = Path(path) if path is not None else current.database
        # A reader holding the file (e.g. a `duckdb` shell) pauses writers; they wait this long before failing.
        self.lock_timeout_s = lock_timeout_s if lock_timeout_s is not None else current.lock_timeout_s

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

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection inside one transaction: everything done with it lands, or nothing does."""
        with self.connect() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def replace_many(self, writes: list[tuple[str, pl.DataFrame, str, list]]) -> None:
        """Several (table, rows, where, params) replacements in one transaction: all land or none do."""
        with self.transaction() as conn:
            for table, df, where, params in writes:
                conn.execute(f"DELETE FROM {table} WHERE {where}", params)
                if df.height:
                    conn.register("_rows", df.to_arrow())
                    cols = ", ".join(df.columns)
                    conn.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _rows")
                    conn.unregister("_rows")

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


def utc_now() -> datetime:
    """A naive UTC timestamp, as the results tables store them."""
    return datetime.now(UTC).replace(tzinfo=None)


def to_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
