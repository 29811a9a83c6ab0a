"""`em-assets sql`, `figures` and `migrate`: reading the results store, its past snapshots, and moving it."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import polars as pl


def _print_frame(df: pl.DataFrame, fmt: str, max_rows: int, as_json: frozenset[str] = frozenset()) -> None:
    """Print the rows; `as_json` names columns that hold DuckDB's JSON text of values polars cannot hold."""
    if fmt == "csv":
        # CSV has no nested values: lists, arrays, structs and maps (e.g. ducklake_snapshots' changes) go as JSON
        # text. to_list, not map_elements, which hands a fixed-size array's value over as an internal object.
        nested = [name for name, dtype in df.schema.items() if dtype.is_nested()]
        _write(
            df.with_columns(
                pl.Series(n, [_json(v) for v in df[n].to_list()], pl.String) for n in nested
            ).write_csv()
        )
    elif fmt == "json":
        if not as_json:
            _write(df.write_json() + "\n")
            return
        rows = json.loads(df.write_json())
        for row in rows:
            for name in as_json:
                if row[name] is not None:
                    # DuckDB writes NaN and infinities bare, which is not JSON: null, as polars writes them.
                    row[name] = json.loads(row[name], parse_constant=lambda _: None)
        _write(json.dumps(rows, ensure_ascii=False, separators=(",", ":")) + "\n")
    else:
        shown = df.with_columns(pl.col(pl.String).str.replace_many(_CONTROLS, _CONTROLS_SHOWN))
        with pl.Config(tbl_rows=max_rows, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200):
            print(shown)


# Control characters in text a model wrote (an answer), which the terminal showing the table would act on: a
# carriage return or an escape sequence can erase or overwrite a row's other columns, or set the clipboard. The
# table shows them escaped (\r, \x1b); a newline stays, drawn inside its cell. CSV and JSON keep the text as is.
_CONTROLS = [chr(c) for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) != "\n"]
_CONTROLS_SHOWN = [c.encode("unicode_escape").decode() for c in _CONTROLS]


def _write(text: str) -> None:
    """Write in chunks: an unbuffered stdout (PYTHONUNBUFFERED, as the Docker image sets) drops what one write
    to a closed pipe left unwritten without an error, so only a later write raises BrokenPipeError (exit 141)."""
    chunk = 1 << 16
    for start in range(0, len(text), chunk):
        sys.stdout.write(text[start : start + chunk])


def _json(value) -> str | None:
    return None if value is None else json.dumps(value, default=str)


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
        if line.strip().rstrip(";").lower() in {"quit", "exit", ".quit", ".exit"}:
            break
        if _no_statement(line):
            continue
        worst = max(worst, _run(store, line, args))
    return 0 if interactive else worst


def _no_statement(line: str) -> bool:
    """A shell line with nothing to run: blank, a comment or a lone ';' (a commented SQL file piped in)."""
    import duckdb

    try:
        line.encode()
        return not duckdb.extract_statements(line)
    except (UnicodeEncodeError, duckdb.Error):
        # Not text DuckDB can parse: _run says why.
        return False


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
            try:
                frame, as_json = _frame(conn, reading_statement(conn, sql))
            except duckdb.CatalogException as exc:
                # Looked up through the statement's own read-only connection: a second, writable one could
                # wait on another reader's lock.
                why = _not_written_yet(conn, store.snapshot, exc)
                if why is None:
                    raise
                print(f"error: {why}", file=sys.stderr)
                return 1
        _print_frame(frame, args.format, args.max_rows, as_json)
    except RefusedStatement as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (duckdb.Error, pl.exceptions.PolarsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _not_written_yet(conn, snapshot: int | None, exc: Exception) -> str | None:
    """Why a report table DuckDB found missing is not in the store (or the snapshot): its step has not run yet.
    DuckDB's own message would only suggest another table (sqlite_master)."""
    from em_assets.results.schema import REPORT_TABLES
    from em_assets.results.store import holds_table

    # The table DuckDB could not find, not any word of the statement (a string literal, a comment); a qualified
    # name in another database (memory.em_summary) is missing there, not from the store.
    found = re.match(r"Catalog Error: Table with name (\w+) does not exist!", str(exc))
    name = found[1].lower() if found else None
    if name not in REPORT_TABLES:
        return None
    if holds_table(conn, name):
        return None
    if snapshot is not None:
        return f"{name}: not in the store at snapshot {snapshot}; the step that writes it had not run by then"
    return f"{name}: not in the store yet; the step that writes it has not run (`em-assets demo` runs every step)"


# Types polars cannot read from DuckDB (INTERVAL, UNION, BIGNUM), reads wrongly (TIMETZ loses its offset) or
# cannot write as JSON (BLOB, BIT): a column of one is shown as DuckDB's text, a nested value holding one (or a
# UNION) as DuckDB's JSON.
_AS_TEXT = {"interval", "blob", "bit", "bignum", "time with time zone"}
_NESTED = {"struct", "list", "array", "map"}


def _frame(conn, statement: str) -> tuple[pl.DataFrame, frozenset[str]]:
    """The statement's rows, and the columns given as DuckDB's JSON text."""
    relation = conn.sql(statement)
    if relation is None:
        return pl.DataFrame(), frozenset()
    text = [t.id in _AS_TEXT for t in relation.types]
    as_json = [not shown and _unheld(t) for shown, t in zip(text, relation.types, strict=True)]
    if any(text) or any(as_json):
        # Columns by position: a statement may give two columns one name.
        shown = [
            f"CAST(#{i} AS VARCHAR)" if is_text else f"CAST(to_json(#{i}) AS VARCHAR)" if is_json else f"#{i}"
            for i, (is_text, is_json) in enumerate(zip(text, as_json, strict=True), 1)
        ]
        names = (c.replace('"', '""') for c in relation.columns)
        relation = relation.project(", ".join(f'{e} AS "{c}"' for e, c in zip(shown, names, strict=True)))
    frame = relation.pl()
    # polars renames a repeated column name (u, u_1): the frame's own names, by position.
    return frame, frozenset(name for name, is_json in zip(frame.columns, as_json, strict=True) if is_json)


def _unheld(t) -> bool:
    """Whether a DuckDB type is, or holds somewhere inside, a UNION or one of _AS_TEXT."""
    if t.id in _AS_TEXT or t.id == "union":
        return True
    # A list's or array's children include its size; a struct's, union's or map's are all types.
    return t.id in _NESTED and any(_unheld(c) for _, c in t.children if not isinstance(c, int))


# DuckLake's answer to a read-only attach of a catalog that holds no lake yet: its first writer creates one.
_NO_LAKE_YET = "creating a new DuckLake is explicitly disabled"


def usable_store(db: str | None = None, *, may_create: bool = False):
    """The store `db` names (default EM_DB), opened once read-only to check it; StoreError where it cannot be
    used. One not there yet passes where the command creates it (`may_create`) and its paths can be made."""
    import duckdb

    from em_assets.cli.errors import StoreError
    from em_assets.results.backends import file_kind
    from em_assets.results.store import Store

    store = Store(db) if db else Store()
    if not store.exists():
        if not may_create:
            where = f"no results database at {store.path}{from_here(store.path)}"
            if db:
                raise StoreError(where)
            # EM_DB's store (the default's) is missing until a run writes it: say how to make one.
            raise StoreError(
                f"{where}: run `em-assets demo` in the repository root first, or set EM_DB to an existing store"
            )
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
            if not store.lake and file_kind(store.path) == "sqlite":
                # DuckDB would load its SQLite extension to read it, which the locked connection refuses.
                why = f"a SQLite file, as a DuckLake's catalog is: name the lake as ducklake:sqlite:{store.path}"
            raise StoreError(
                f"{store.location.describe()} cannot be opened as a results database: {why}"
            ) from None
    return store


def from_here(*paths: Path) -> str:
    """Where the relative ones of `paths` (a store's file or catalog, a lake's data folder) are read from: the
    default data/... is read from the working directory, which may not be the repository's; nothing if none is."""
    return f" under {Path.cwd()}" if any(not p.is_absolute() for p in paths) else ""


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
    kept = store.kept_snapshots()
    latest = max(kept)
    if not 0 <= args.snapshot <= latest:
        print(
            f"error: no snapshot {args.snapshot}: {store.location.describe()} has snapshots 0 to {latest}",
            file=sys.stderr,
        )
        return None
    if args.snapshot not in kept:
        # Expired (docs/operations.md): attaching it raised DuckDB's error, a traceback in `figures`.
        print(
            f"error: snapshot {args.snapshot} of {store.location.describe()} was expired: it can no longer be read",
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
    except OSError as exc:
        # A file in the way, no write permission, a read-only file system: the store is only read.
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
        f"{from_here(*store.local_paths())}"
    )
    if left_out:
        print(f"[em-assets] left out {len(left_out)} tables not of the results schema: {', '.join(left_out)}")
    return 0
