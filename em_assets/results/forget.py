"""Forgetting organisms: their rows leave every table that names them, in one transaction. A DuckLake keeps them
in its earlier snapshots; a DuckDB file does not."""

from __future__ import annotations

from collections.abc import Sequence

import duckdb

from em_assets.results.store import Store

# The columns that name an organism: one per row, or the two of a pair (direction_similarity).
ORGANISM_COLUMNS = ("organism", "organism_a", "organism_b")


def organism_tables(conn: duckdb.DuckDBPyConnection) -> dict[str, list[str]]:
    """Each table (not view) of the store with a column naming an organism, and those columns."""
    rows = conn.execute(
        "SELECT table_name, column_name FROM duckdb_columns() JOIN duckdb_tables() "
        "USING (database_name, schema_name, table_name) "
        "WHERE database_name = current_database() AND column_name IN ? ORDER BY table_name, column_name",
        [list(ORGANISM_COLUMNS)],
    ).fetchall()
    tables: dict[str, list[str]] = {}
    for table, column in rows:
        tables.setdefault(table, []).append(column)
    return tables


def _naming(columns: Sequence[str], keys: Sequence[str]) -> tuple[str, list[str]]:
    """A WHERE clause matching rows that name any of the keys in any of the columns, and its parameters."""
    marks = ", ".join("?" for _ in keys)
    return " OR ".join(f"{c} IN ({marks})" for c in columns), [k for _ in columns for k in keys]


def rows_held(store: Store, keys: Sequence[str]) -> dict[str, int]:
    """Per organism key, how many rows of the store's tables name it (0 for none)."""
    held = dict.fromkeys(keys, 0)
    with store.connect(read_only=True) as conn:
        for table, columns in organism_tables(conn).items():
            for column in columns:
                where, params = _naming([column], keys)
                for key, n in conn.execute(
                    f"SELECT {column}, count(*) FROM {table} WHERE {where} GROUP BY ALL", params
                ).fetchall():
                    held[key] += n
    return held


def forget(store: Store, keys: Sequence[str]) -> dict[str, int]:
    """Delete every row naming any of the keys, all tables in one transaction; rows deleted per table."""
    deleted: dict[str, int] = {}

    def work(conn: duckdb.DuckDBPyConnection) -> None:
        deleted.clear()  # a retried transaction counts afresh
        for table, columns in organism_tables(conn).items():
            where, params = _naming(columns, keys)
            # Only tables that hold such rows are touched: a delete of nothing still conflicts on a DuckLake.
            n = conn.execute(f"SELECT count(*) FROM {table} WHERE {where}", params).fetchone()[0]
            if n:
                conn.execute(f"DELETE FROM {table} WHERE {where}", params)
                deleted[table] = n

    store.write(work, "forget " + ", ".join(keys))
    return deleted
