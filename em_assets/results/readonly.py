"""Users' SQL on the results store: one reading statement, checked with DuckDB's own parser before it runs."""

from __future__ import annotations

import json
from collections.abc import Iterator

import duckdb

# DESCRIBE, SHOW, SUMMARIZE, FROM-first queries and PRAGMAs that only read (table_info, show_tables) all parse
# as SELECT; every other type (COPY, EXPORT, ATTACH, INSTALL/LOAD, SET, CREATE, CALL, EXPLAIN ANALYZE, other
# PRAGMAs) can change a file, a database or the session.
READING = "SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, PRAGMA table_info"

# A lake attached read-only still runs some maintenance functions (e.g. cleaning up old files), and the
# scanner extensions the stores load reach databases outside the lake's own tables: a SELECT may call only
# the functions that read the lake's history.
_LAKE_READERS = frozenset(
    {
        "ducklake_snapshots",
        "ducklake_table_info",
        "ducklake_list_files",
        "ducklake_table_changes",
        "ducklake_table_insertions",
        "ducklake_table_deletions",
        "ducklake_current_snapshot",
        "ducklake_last_committed_snapshot",
        "ducklake_options",
        "ducklake_settings",
    }
)
_ACTING_PREFIXES = ("ducklake_", "postgres_", "sqlite_", "mysql_")
# Checkpoints write; query(), query_table() and json_execute_serialized_sql() run SQL this check cannot see;
# logging and profiling write files where told (a local lake's data folder is writable); the lake's own
# macros (lake.merge_adjacent_files(), or unqualified under USE lake) call the ducklake_ functions that act.
_ACTING = frozenset(
    {
        "checkpoint",
        "force_checkpoint",
        "query",
        "query_table",
        "json_execute_serialized_sql",
        "enable_logging",
        "enable_profiling",
        "merge_adjacent_files",
        "set_option",
        "set_commit_message",
    }
)


class RefusedStatement(ValueError):
    """SQL that `em-assets sql` does not run: not exactly one reading statement."""


def reading_statement(conn: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The one reading statement in `sql`, as DuckDB parsed it; RefusedStatement for anything else."""
    statements = conn.extract_statements(sql)
    if len(statements) != 1:
        raise RefusedStatement(
            f"refused: {len(statements)} statements; give one reading statement ({READING}) at a time"
        )
    statement = statements[0]
    if statement.type != duckdb.StatementType.SELECT:
        raise RefusedStatement(
            f"refused: {statement.type.name} is not a reading statement; the store is read-only here ({READING})"
        )
    tree = json.loads(conn.execute("SELECT json_serialize_sql(?)", [statement.query]).fetchone()[0])
    if tree.get("error"):
        raise RefusedStatement(f"refused: DuckDB cannot check this statement: {tree.get('error_message')}")
    acting = sorted({name for name in _function_names(tree) if _acts(name)})
    if acting:
        raise RefusedStatement(f"refused: {', '.join(acting)} can change a database or run other SQL")
    return statement.query


def _acts(name: str) -> bool:
    name = name.lower()
    return name in _ACTING or (name.startswith(_ACTING_PREFIXES) and name not in _LAKE_READERS)


def _function_names(node: object) -> Iterator[str]:
    """Every function the parsed statement calls: scalar, aggregate and table functions alike."""
    if isinstance(node, dict):
        if isinstance(node.get("function_name"), str):
            yield node["function_name"]
        for value in node.values():
            yield from _function_names(value)
    elif isinstance(node, list):
        for value in node:
            yield from _function_names(value)
