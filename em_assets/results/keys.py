"""The schema's primary keys, and the schema as DuckLake takes it (it has no key constraints)."""

from __future__ import annotations

import functools
import re

from em_assets.results.schema import (
    ADDED_COLUMNS,
    DIRECTION_SCHEMA,
    JUDGE_SCHEMA,
    LINEAGE_SCHEMA,
    ORGANISM_SCHEMA,
    REPORT_TABLES,
    SCHEMA,
    VIEWS,
)

_TABLE = re.compile(r"CREATE TABLE IF NOT EXISTS (\w+) \((.*?)\);", re.S)
_COLUMN_KEY = re.compile(r"(\w+) \w+ PRIMARY KEY")
_TABLE_KEY = re.compile(r"PRIMARY KEY \(([^)]*)\)")
_DANGLING = re.compile(r",\s*\);")


def tables_sql() -> str:
    return SCHEMA + LINEAGE_SCHEMA + JUDGE_SCHEMA + DIRECTION_SCHEMA + ORGANISM_SCHEMA + added_columns_sql()


def added_columns_sql() -> str:
    """ALTER statements that give a store created before ADDED_COLUMNS those columns (no-ops on a new one)."""
    return "".join(
        f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {kind};\n"
        for table, columns in ADDED_COLUMNS.items()
        for name, kind in columns
    )


@functools.cache
def primary_keys() -> dict[str, tuple[str, ...]]:
    """Table name -> key columns, read from the CREATE TABLE statements (the one place keys are written)."""
    keys = {}
    for name, body in _TABLE.findall(tables_sql()):
        column = _COLUMN_KEY.search(body)
        table = _TABLE_KEY.search(body)
        cols = (column[1],) if column else tuple(c.strip() for c in table[1].split(",")) if table else ()
        keys[name] = cols
    return keys


def lake_tables_sql() -> str:
    """The CREATE TABLE statements without key constraints, which DuckLake does not support."""
    return _DANGLING.sub(");", _TABLE_KEY.sub("", tables_sql()).replace(" PRIMARY KEY", ""))


def results_tables() -> frozenset[str]:
    """Every table of the results schema: those created by the schema and the report tables written whole."""
    return frozenset(primary_keys()) | frozenset(REPORT_TABLES)


# A DuckLake keeps no keys, so two writers racing on one row can both insert it; the stages drop such doubles on
# their next run. Until then the report views read these tables one row per key, the last written, as a DuckDB
# file holds them.
LATEST_TABLES = ("completions", "judgements", "imported_judgements", "sweep_completions", "sweep_judgements")


def views_sql() -> str:
    """The report views, over a `<table>_latest` view of each of LATEST_TABLES."""
    keys = primary_keys()
    latest = "".join(
        f"CREATE OR REPLACE VIEW {table}_latest AS SELECT * FROM {table} QUALIFY row_number() "
        f"OVER (PARTITION BY {', '.join(keys[table])} ORDER BY created_at DESC) = 1;\n"
        for table in LATEST_TABLES
    )
    return latest + VIEWS
