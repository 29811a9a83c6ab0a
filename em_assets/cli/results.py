"""`em-assets sql`, `figures` and `migrate`: reading the results store, its past snapshots, and moving it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import polars as pl


def _print_frame(df: pl.DataFrame, fmt: str, max_rows: int) -> None:
    if fmt == "csv":
        # CSV has no nested values: lists, structs and maps (e.g. ducklake_snapshots' changes) go as JSON text.
        nested = [name for name, dtype in df.schema.items() if dtype.is_nested()]
        sys.stdout.write(df.with_columns(pl.col(nested).map_elements(_json, pl.String)).write_csv())
    elif fmt == "json":
        sys.stdout.write(df.write_json() + "\n")
    else:
        with pl.Config(tbl_rows=max_rows, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200):
            print(df)


def _json(value) -> str:
    # A list value reaches map_elements as a Series.
    return json.dumps(value.to_list() if isinstance(value, pl.Series) else value, default=str)


def cmd_sql(args: argparse.Namespace) -> int:
    """Read-only queries. Each statement opens and closes its own connection, so an open shell never holds the
    database lock that running materialisations need."""
    store = _store(args)
    if store is None:
        return 2
    if args.query is not None and not args.query.strip():
        print("error: an empty query; give a statement, or none for the shell", file=sys.stderr)
        return 2
    if args.query:
        return _run(store, args.query, args)
    interactive = sys.stdin.isatty()
    # Statements piped in from a script end with the worst status of any (2 refused, 1 rejected), so the script
    # can tell; a person at the prompt has seen each error.
    worst = 0
    while True:
        try:
            line = input("em-sql> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            continue
        if line.strip().rstrip(";").lower() in {"quit", "exit", ".quit", ".exit"}:
            break
        worst = max(worst, _run(store, line, args))
    return 0 if interactive else worst


def _run(store, sql: str, args: argparse.Namespace) -> int:
    """Run one reading statement and print its rows: 0; 2 when refused; 1 when DuckDB rejects it."""
    import duckdb

    from em_assets.results.readonly import RefusedStatement, reading_statement

    try:
        sql.encode()
    except UnicodeEncodeError:
        print("error: the statement is not UTF-8 text", file=sys.stderr)
        return 2
    try:
        with store.reader() as conn:
            frame = _frame(conn, reading_statement(conn, sql))
        _print_frame(frame, args.format, args.max_rows)
    except RefusedStatement as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (duckdb.Error, pl.exceptions.PolarsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# Types polars cannot read from DuckDB (INTERVAL) or write as JSON (BLOB, BIT): shown as DuckDB's text.
_AS_TEXT = {"INTERVAL", "BLOB", "BIT"}


def _frame(conn, statement: str) -> pl.DataFrame:
    relation = conn.sql(statement)
    if relation is None:
        return pl.DataFrame()
    if any(str(t) in _AS_TEXT for t in relation.types):
        shown = [
            f'CAST("{c}" AS VARCHAR) AS "{c}"' if str(t) in _AS_TEXT else f'"{c}"'
            for c, t in zip((c.replace('"', '""') for c in relation.columns), relation.types, strict=True)
        ]
        relation = relation.project(", ".join(shown))
    return relation.pl()


# DuckLake's answer to a read-only attach of a catalog that holds no lake yet: its first writer creates one.
_NO_LAKE_YET = "creating a new DuckLake is explicitly disabled"


def usable_store(db: str | None = None, *, may_create: bool = False):
    """The store `db` names (default EM_DB), opened once read-only to check it; StoreError where it cannot be
    used. One not there yet passes where the command creates it (`may_create`) and its paths can be made."""
    import duckdb

    from em_assets.cli.errors import StoreError
    from em_assets.results.store import Store

    store = Store(db) if db else Store()
    if not store.exists():
        if not may_create:
            raise StoreError(f"no results database at {store.path}")
        why = _cannot_make(store)
        if why:
            raise StoreError(f"{store.location.describe()} cannot be created: {why}")
        return store
    try:
        with store.reader():
            pass
    except duckdb.Error as exc:
        if not (may_create and _NO_LAKE_YET in str(exc)):
            why = str(exc).strip().splitlines()[0]
            raise StoreError(
                f"{store.location.describe()} cannot be opened as a results database: {why}"
            ) from None
    return store


def _cannot_make(store) -> str | None:
    """Why the store's file or catalog, or a lake's local data folder, cannot be created; None if they can."""
    for path in store.local_paths():
        there = path
        while not there.exists():
            there = there.parent
        if not there.is_dir():
            return f"{there} is not a folder"
        if not os.access(there, os.W_OK | os.X_OK):
            return f"{there} is not writable"
    return None


def _store(args: argparse.Namespace):
    """The store the command names (--db, else EM_DB), as of --snapshot; StoreError where it cannot be used,
    None after printing why the snapshot cannot be read."""
    store = usable_store(args.db)
    if args.snapshot is None:
        return store
    if not store.lake:
        print(
            f"error: {store.path} is a plain DuckDB file, which keeps no snapshots: snapshots need a DuckLake "
            "store (EM_DB=ducklake:sqlite:data/results.sqlite, or ducklake:postgres:...)",
            file=sys.stderr,
        )
        return None
    latest = store.current_snapshot()
    if not 0 <= args.snapshot <= latest:
        print(
            f"error: no snapshot {args.snapshot}: {store.location.describe()} has snapshots 0 to {latest}",
            file=sys.stderr,
        )
        return None
    return store.at_snapshot(args.snapshot)


def cmd_figures(args: argparse.Namespace) -> int:
    """Redraw the report figures from one snapshot, e.g. the `source_snapshot` a past em_figures recorded."""
    import duckdb

    from em_assets.grid.load import GridError, load_grid
    from em_assets.grid.schema import Thresholds
    from em_assets.reports.tables import rebuild_figures

    store = _store(args)
    if store is None:
        return 2
    if not store.has_table("em_summary"):
        print(
            f"error: snapshot {args.snapshot} has no em_summary: the reports had not run by then; em_figures "
            "records the snapshot it drew from (source_snapshot)",
            file=sys.stderr,
        )
        return 2
    try:
        # Only for a snapshot whose em_summary is empty; otherwise its own thresholds are used.
        fallback = load_grid().thresholds
    except GridError:
        fallback = Thresholds()
    try:
        paths = rebuild_figures(store, args.snapshot, Path(args.out), fallback)
    except (NotADirectoryError, FileExistsError) as exc:
        print(f"error: --out {args.out} is not a folder that can be written: {exc}", file=sys.stderr)
        return 2
    except duckdb.Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Copy the results tables of a DuckDB results file (the layout before DuckLake) into the configured store."""
    import duckdb

    from em_assets.results.migrate import migrate

    store = usable_store(args.db, may_create=True)
    try:
        counts, left_out = migrate(Path(args.source), store)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, duckdb.Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for table, n in counts.items():
        print(f"{table}\t{n}")
    print(
        f"[em-assets] copied {len(counts)} tables, {sum(counts.values())} rows into {store.location.describe()}"
    )
    if left_out:
        print(f"[em-assets] left out {len(left_out)} tables not of the results schema: {', '.join(left_out)}")
    return 0
