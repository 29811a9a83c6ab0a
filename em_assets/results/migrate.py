"""Carry an existing DuckDB results file over into the configured store (a DuckLake or another file)."""

from __future__ import annotations

from pathlib import Path

import duckdb

from em_assets.results.store import Store

_SOURCE = "em_source"


def source_tables(conn: duckdb.DuckDBPyConnection) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'main' "
            "ORDER BY table_name",
            [_SOURCE],
        ).fetchall()
    ]


def migrate(source: Path, store: Store) -> dict[str, int]:
    """Copy every table of `source` into `store` in one transaction, replacing what the store had in those
    tables; returns rows per table, checked equal on both sides."""
    if not source.is_file():
        raise FileNotFoundError(f"no DuckDB file at {source}")
    if store.path is not None and store.path.resolve() == source.resolve():
        raise ValueError(f"{source} is the store it would be copied into")
    with source.open("rb") as f:
        head = f.read(16)
    # A DuckDB file's header carries "DUCK" at byte 8; a DuckLake's SQLite catalog would make DuckDB fetch an
    # extension to read it.
    if head[8:12] != b"DUCK":
        lake = " (a SQLite file: a DuckLake catalog is already a store, with nothing to migrate)"
        raise ValueError(f"{source} is not a DuckDB results file{lake if head.startswith(b'SQLite') else ''}")
    try:
        duckdb.connect(str(source), read_only=True).close()
    except duckdb.Error as exc:
        raise ValueError(f"{source} is not a DuckDB results file ({exc})") from None
    store.init()
    counts: dict[str, int] = {}

    with store.session() as conn:
        conn.execute(f"ATTACH '{str(source).replace(chr(39), chr(39) * 2)}' AS {_SOURCE} (READ_ONLY)")
        existing = {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()"
            ).fetchall()
        }
        conn.execute("BEGIN")
        for table in source_tables(conn):
            if table in existing:
                conn.execute(f"DELETE FROM {table}")
                # BY NAME: columns added to the schema since the file was written stay null.
                conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {_SOURCE}.{table}")
            else:
                conn.execute(f"CREATE TABLE {table} AS SELECT * FROM {_SOURCE}.{table}")
            counts[table] = conn.execute(f"SELECT count(*) FROM {_SOURCE}.{table}").fetchone()[0]
        conn.execute("COMMIT")
        for table, n in counts.items():
            got = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            if got != n:
                raise RuntimeError(f"migrate: {table} has {got} rows in the store, {n} in {source}")
    return counts
