"""Carry an existing DuckDB results file over into the configured store (a DuckLake or another file)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

import duckdb

from em_assets.results.backends import file_kind, sql_string
from em_assets.results.keys import results_tables
from em_assets.results.store import Store

_SOURCE = "em_source"


class Migrated(NamedTuple):
    """Rows copied per table, and the source's tables left out as no part of the results schema."""

    counts: dict[str, int]
    left_out: list[str]


def _tables(conn: duckdb.DuckDBPyConnection) -> list[str]:
    """The tables of the connection's own database."""
    return [
        r[0]
        for r in conn.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = 'main' ORDER BY table_name"
        ).fetchall()
    ]


def migrate(source: Path, store: Store) -> Migrated:
    """Copy every results table of `source` into `store` in one transaction, replacing what the store had in
    those tables; returns rows per table, checked equal on both sides. On failure the store is as it was."""
    if not source.is_file():
        raise FileNotFoundError(f"no DuckDB file at {source}")
    if store.path is not None and store.path.resolve() == source.resolve():
        raise ValueError(f"{source} is the store it would be copied into")
    kind = file_kind(source)
    if kind != "duckdb":
        lake = " (a SQLite file: a DuckLake catalog is already a store, with nothing to migrate)"
        raise ValueError(f"{source} is not a DuckDB results file{lake if kind == 'sqlite' else ''}")
    tables, left_out = _results_tables(source)
    # Paths the copy creates are removed if it fails: the store is left as it was, or not there at all.
    made = [p for p in store.local_paths() if not p.exists()]
    try:
        return Migrated(_copy(source, store, tables), left_out)
    except BaseException:
        for path in made:
            _remove(path)
        raise


def _results_tables(source: Path) -> tuple[list[str], list[str]]:
    """The source's tables of the results schema and its others; ValueError where it holds none of the first
    (any DuckDB file would otherwise be copied into the store)."""
    try:
        with duckdb.connect(str(source), read_only=True) as conn:
            tables = _tables(conn)
    except duckdb.Error as exc:
        raise ValueError(f"{source} is not a DuckDB results file ({exc})") from None
    known = results_tables()
    ours = [t for t in tables if t in known]
    if not ours:
        held = f"its tables: {', '.join(tables)}" if tables else "it has no tables"
        raise ValueError(f"{source} holds none of the results tables (completions, judgements, ...); {held}")
    return ours, [t for t in tables if t not in known]


def _copy(source: Path, store: Store, tables: list[str]) -> dict[str, int]:
    """The schema and `tables` of `source`, in one transaction of the store: all land or none do."""
    counts: dict[str, int] = {}
    with store.session() as conn:
        conn.execute(f"ATTACH '{sql_string(str(source))}' AS {_SOURCE} (READ_ONLY)")
        conn.execute("BEGIN")
        store.create_schema(conn)
        existing = set(_tables(conn))
        for table in tables:
            try:
                if table in existing:
                    conn.execute(f"DELETE FROM {table}")
                    # BY NAME: columns added to the schema since the file was written stay null.
                    conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {_SOURCE}.{table}")
                else:
                    conn.execute(f"CREATE TABLE {table} AS SELECT * FROM {_SOURCE}.{table}")
            except duckdb.Error as exc:
                if not _bad_source(exc):
                    raise
                raise ValueError(f"{source}: table {table} cannot be copied into the store: {exc}") from None
            n = conn.execute(f"SELECT count(*) FROM {_SOURCE}.{table}").fetchone()[0]
            # Checked before the commit, so a mismatch leaves the store as it was.
            got = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            if got != n:
                raise RuntimeError(f"migrate: {table} has {got} rows in the store, {n} in {source}")
            counts[table] = n
        conn.execute("COMMIT")
    return counts


def _bad_source(exc: duckdb.Error) -> bool:
    """Whether the source's data is at fault: a value or column the store's schema does not take, a repeated
    key, a corrupt block (DuckDB raises that as an I/O error, as it does a full disk)."""
    kinds = (duckdb.ConversionException, duckdb.BinderException, duckdb.ConstraintException)
    return isinstance(exc, kinds) or "Corrupt database file" in str(exc)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
        return
    # A DuckDB write-ahead log, or a SQLite catalog's journal files.
    for each in (path, *(path.with_name(path.name + s) for s in (".wal", "-wal", "-shm", "-journal"))):
        each.unlink(missing_ok=True)
