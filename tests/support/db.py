"""Read-only inspection of a results database while other processes may be writing it."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from em_assets.results.store import Store

ORGANISM_TABLES = ["lora_adapters", "training_losses", "completions", "judgements"]


def ro_query(db: Path, sql: str, params: list | None = None) -> pl.DataFrame:
    """A query on a short-lived read-only connection (waits while a writer holds the file)."""
    with Store(db, lock_timeout_s=60).connect(read_only=True) as conn:
        return conn.execute(sql, params or []).pl()


def count(db: Path, table: str, organism: str | None = None) -> int:
    where, params = ("WHERE organism = ?", [organism]) if organism else ("", [])
    return int(ro_query(db, f"SELECT count(*) AS n FROM {table} {where}", params)["n"][0])


def table_dump(db: Path, organism: str | None = None) -> dict[str, str]:
    """Every base table as sorted CSV text (only the organism's rows of organism tables, when given)."""
    tables = ro_query(
        db,
        "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' ORDER BY 1",
    )["table_name"].to_list()
    out = {}
    for table in tables:
        if organism is not None:
            if table not in ORGANISM_TABLES:
                continue
            df = ro_query(db, f"SELECT * FROM {table} WHERE organism = ? ORDER BY ALL", [organism])
        else:
            df = ro_query(db, f"SELECT * FROM {table} ORDER BY ALL")
        out[table] = df.write_csv()
    return out


def organism_rows(db: Path, table: str, organism: str) -> pl.DataFrame:
    """One organism's rows of a table, in a stable order."""
    return ro_query(db, f"SELECT * FROM {table} WHERE organism = ? ORDER BY ALL", [organism])


def files_containing(root: Path, needle: str) -> list[str]:
    """Files under root whose bytes contain needle (sqlite event logs, compute logs, run storage...)."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and needle.encode() in path.read_bytes():
            hits.append(str(path))
    return hits
