"""The results store: a DuckDB file or a DuckLake (EM_DB), short-lived connections, partition writes."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import polars as pl

from em_assets.results import backends
from em_assets.results.keys import lake_tables_sql, primary_keys, tables_sql, views_sql
from em_assets.settings import LOCK_TIMEOUT_ENV, settings

# Whether the database a connection reads (a lake at the snapshot it is attached at) has a table.
_HOLDS_TABLE = (
    "SELECT count(*) > 0 FROM duckdb_tables() WHERE database_name = current_database() AND table_name = ?"
)


class Store:
    """Opens the results store briefly for each unit of work; retries while another writer holds it."""

    def __init__(
        self,
        path: Path | str | None = None,
        lock_timeout_s: float | None = None,
        data_path: str | None = None,
        snapshot: int | None = None,
    ):
        current = settings()
        self._db = str(path if path is not None else current.database)
        self.location = backends.Location.parse(self._db, data_path or current.db_data_path)
        # The local file (DuckDB database or DuckLake catalog); None for a PostgreSQL catalog.
        self.path = self.location.local_file
        # A reader holding a DuckDB file (e.g. a `duckdb` shell) pauses writers; they wait this long.
        self.lock_timeout_s = lock_timeout_s if lock_timeout_s is not None else current.lock_timeout_s
        # A DuckLake store can be read as of one snapshot (read-only); a DuckDB file has none.
        if snapshot is not None and not self.location.lake:
            raise ValueError(f"snapshots need a DuckLake store (EM_DB=ducklake:...); {self.path} is DuckDB")
        self.snapshot = snapshot
        self.conflict_retries = 0
        # The one read-only connection every query goes through while pinned() holds it (a DuckDB file).
        self._held: duckdb.DuckDBPyConnection | None = None

    @property
    def lake(self) -> bool:
        return self.location.lake

    def exists(self) -> bool:
        return self.path is None or self.path.exists()

    def local_paths(self) -> list[Path]:
        """The store's files on this machine: its DuckDB file or lake catalog, and a lake's local data folder."""
        paths = [self.path] if self.path is not None else []
        data = self.location.data_path
        if self.lake and data and "://" not in data:
            paths.append(Path(data))
        return paths

    @contextlib.contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        with backends.catalog_errors(self.location, self.lock_timeout_s), self._connect(read_only) as conn:
            yield conn

    @contextlib.contextmanager
    def _connect(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        if not self.lake:
            if not read_only:
                self.location.local_file.parent.mkdir(parents=True, exist_ok=True)
            conn = backends.open_file(self.path, read_only, {}, self.lock_timeout_s, LOCK_TIMEOUT_ENV)
        elif read_only or self.snapshot is not None or self.location.catalog_kind == "duckdb":
            # A DuckDB-file catalog admits one attachment at a time, even within a process, so it is not kept
            # attached between units of work: as with a DuckDB file, other processes take turns with this one.
            conn = self._private_lake(read_only or self.snapshot is not None)
        else:
            with backends.lake_cursor(self.location, self.lock_timeout_s) as cur:
                yield cur
            return
        try:
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection for users' SQL: its configuration locked, no file or network access beyond a
        local lake's data folder, its errors passed through backends.catalog_errors as every unit of work's."""
        # The data folder stays writable to DuckDB, since allowed_directories cannot grant reading alone: the SQL
        # runs through results.readonly.reading_statement.
        with backends.catalog_errors(self.location, self.lock_timeout_s):
            if self.lake:
                conn = self._private_lake(True)
                # allowed_directories takes local folders only: a lake on object storage keeps external access.
                if "://" not in (self.location.data_path or "://"):
                    conn.execute("SET allowed_directories = [?]", [self.location.data_path])
                    conn.execute("SET enable_external_access = false")
                conn.execute("SET lock_configuration = true")
            else:
                locked = {"enable_external_access": False, "lock_configuration": True}
                conn = backends.open_file(self.path, True, locked, self.lock_timeout_s, LOCK_TIMEOUT_ENV)
            try:
                yield conn
            finally:
                conn.close()

    @contextlib.contextmanager
    def session(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A writable connection of its own (not the process's shared lake), e.g. to ATTACH other files; its
        errors pass through backends.catalog_errors."""
        with backends.catalog_errors(self.location, self.lock_timeout_s):
            if self.lake:
                conn = self._private_lake(False)
            else:
                self.location.local_file.parent.mkdir(parents=True, exist_ok=True)
                conn = backends.open_file(self.path, False, {}, self.lock_timeout_s, LOCK_TIMEOUT_ENV)
            try:
                yield conn
            finally:
                conn.close()

    def _private_lake(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """A connection of its own: read-only, pinned to a snapshot, or writable outside the shared lake."""
        return backends.open_lake(
            self.location, self.snapshot, read_only, self.lock_timeout_s, LOCK_TIMEOUT_ENV
        )

    def init(self) -> None:
        # Every asset opens the store: re-creating the views would add a snapshot (and a conflict) each time.
        if self.lake and self._schema_digest() == self._schema_sql()[1]:
            return
        self.write(self.create_schema, "init")

    def create_schema(self, conn: duckdb.DuckDBPyConnection) -> None:
        """Create the tables and views through `conn`, inside the caller's transaction."""
        sql, digest = self._schema_sql()
        conn.execute(sql)
        if self.lake:
            conn.execute("CREATE OR REPLACE TABLE schema_digest AS SELECT ? AS sha256", [digest])

    def _schema_sql(self) -> tuple[str, str]:
        """The statements creating the tables and views, and their sha256."""
        sql = (lake_tables_sql() if self.lake else tables_sql()) + views_sql()
        return sql, hashlib.sha256(sql.encode()).hexdigest()

    def _schema_digest(self) -> str | None:
        # One query rather than a table lookup first: every asset opens the store.
        try:
            return self.query("SELECT sha256 FROM schema_digest")["sha256"][0]
        except duckdb.CatalogException:
            return None

    def has_table(self, name: str) -> bool:
        """Whether the store (or the snapshot it reads) has this table; report tables appear when first written."""
        return bool(self.query(_HOLDS_TABLE, [name]).item())

    def query(self, sql: str, params: list | None = None) -> pl.DataFrame:
        if self._held is not None:
            return self._held.execute(sql, params or []).pl()
        with self.connect() as conn:
            return conn.execute(sql, params or []).pl()

    @contextlib.contextmanager
    def pinned(self) -> Iterator[Store]:
        """This store read as one state of the data, for a run of reads through one read-only connection: a
        DuckLake at its current snapshot (attached once, not per query); a DuckDB file, whose connection holds
        other processes' writers off until it closes (write after the block)."""
        source = self.at_snapshot(self.current_snapshot()) if self.lake else self
        with source.connect(read_only=True) as conn:
            held = copy.copy(source)
            held._held = conn
            yield held

    def current_snapshot(self) -> int | None:
        """The DuckLake snapshot a query would read now (the pinned one, if any); None on a DuckDB file."""
        if not self.lake:
            return None
        if self.snapshot is not None:
            return self.snapshot
        with self.connect() as conn:
            return backends.current_snapshot(conn)

    def kept_snapshots(self) -> set[int]:
        """The DuckLake snapshots that can still be read, listed through the read-only connection (reader), which
        attaches nothing writable."""
        with self.reader() as conn:
            return backends.kept_snapshots(conn)

    def at_snapshot(self, snapshot: int | None) -> Store:
        """This store read as of `snapshot` (None: this store itself)."""
        if snapshot is None:
            return self
        data_path = None if self.location.beside else self.location.data_path
        return Store(self._db, self.lock_timeout_s, data_path, snapshot)

    def replace_rows(
        self, table: str, df: pl.DataFrame, where: str = "TRUE", params: list | None = None
    ) -> None:
        """Atomically delete the rows matching `where` and insert `df` (one partition's rows)."""
        self.replace_many([(table, df, where, params or [])])

    def replace_many(self, writes: list[tuple[str, pl.DataFrame, str, list]]) -> None:
        """Several (table, rows, where, params) replacements in one transaction: all land or none do."""

        def work(conn: duckdb.DuckDBPyConnection) -> None:
            for table, df, where, params in writes:
                conn.execute(f"DELETE FROM {table} WHERE {where}", params)
                if df.height:
                    _insert(conn, table, df)

        self.write(work, "replace " + ", ".join(w[0] for w in writes))

    def append_rows(self, table: str, df: pl.DataFrame) -> None:
        """Insert rows, replacing any with the same primary key (idempotent resume writes)."""
        if not df.height:
            return
        # A key repeated within the rows (two identical answers' judge cache rows) is written once, the last.
        keys = list(primary_keys()[table])
        rows = df.unique(subset=keys, keep="last", maintain_order=True) if keys else df

        def work(conn: duckdb.DuckDBPyConnection) -> None:
            # A delete and an insert in one transaction, on both backends: DuckLake has no key constraints, and a
            # file's INSERT OR REPLACE would keep the old row's values in the columns `df` leaves out.
            if not keys:
                _insert(conn, table, rows)
                return
            match = " AND ".join(f"t.{k} = r.{k}" for k in keys)
            conn.register("_rows", rows.to_arrow())
            # Deleting nothing still conflicts with concurrent writers of the table, so only delete rows
            # that are there (a resumed or re-run step); fresh rows are a plain insert.
            found = f"FROM {table} t WHERE EXISTS (SELECT 1 FROM _rows r WHERE {match})"
            if conn.execute(f"SELECT count(*) {found}").fetchone()[0]:
                conn.execute(f"DELETE {found}")
            conn.unregister("_rows")
            _insert(conn, table, rows)

        self.write(work, f"append {table}")

    def write_table(self, table: str, df: pl.DataFrame) -> None:
        """Replace a whole report table with `df`, keeping its schema from the DataFrame."""
        self.write_tables({table: df})

    def write_tables(self, tables: dict[str, pl.DataFrame]) -> None:
        """Replace whole report tables in one transaction: a reader never sees some new and some old."""

        def work(conn: duckdb.DuckDBPyConnection) -> None:
            for table, df in tables.items():
                conn.register("_rows", df.to_arrow())
                conn.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM _rows")
                conn.unregister("_rows")

        self.write(work, "write " + ", ".join(tables))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection inside one transaction: everything done with it lands, or nothing does."""
        with self.connect() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT has already rolled back; nothing is left to undo then.
                with contextlib.suppress(duckdb.Error):
                    conn.execute("ROLLBACK")
                raise

    def write(self, work: Callable[[duckdb.DuckDBPyConnection], None], what: str) -> None:
        """Run `work` in one transaction; on a DuckLake, commit conflicts are retried with backoff."""

        def attempt() -> None:
            with self.transaction() as conn:
                work(conn)

        if not self.lake:
            attempt()
            return
        self.conflict_retries += backends.retry_conflicts(attempt, self.lock_timeout_s, what)


def holds_table(conn: duckdb.DuckDBPyConnection, name: str) -> bool:
    """Whether the database `conn` reads (a lake at the snapshot it is attached at) has this table."""
    return bool(conn.execute(_HOLDS_TABLE, [name]).fetchone()[0])


def _insert(conn: duckdb.DuckDBPyConnection, table: str, df: pl.DataFrame) -> None:
    conn.register("_rows", df.to_arrow())
    cols = ", ".join(df.columns)
    conn.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _rows")
    conn.unregister("_rows")


def utc_now() -> datetime:
    """A naive UTC timestamp, as the results tables store them."""
    return datetime.now(UTC).replace(tzinfo=None)


def to_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
