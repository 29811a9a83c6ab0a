"""Where results live: one DuckDB file, or a DuckLake (a catalog database plus Parquet data files)."""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import random
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb

from em_assets.settings import LOCK_TIMEOUT_ENV, SettingsError

LAKE = "lake"
LAKE_PREFIX = "ducklake:"


def file_kind(path: Path) -> str | None:
    """What a file's header says it holds: "duckdb" (a results file), "sqlite" (as a DuckLake's catalog is), or
    None (neither, or unreadable). DuckDB would fetch an extension to open a SQLite file, so it is told first."""
    try:
        with Path(path).open("rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head[8:12] == b"DUCK":
        return "duckdb"
    return "sqlite" if head == b"SQLite format 3\x00" else None


# Errors DuckDB raises when another process holds the file's write lock.
_LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "database is locked")

# DuckDB names the holder only in the error text: "Conflicting lock is held in /usr/bin/duckdb (PID 1234)".
_HOLDER = re.compile(r"Conflicting lock is held in (.+?) \(PID (\d+)\)")

# A busy catalog (SQLite's lock, PostgreSQL's serialization failures): it clears on a retry, and DuckLake may
# report it from any statement (a catalog read's error comes wrapped in a Binder error).
_BUSY_MARKERS = ("database is locked", "could not serialize", "deadlock detected")
# Errors in the statement itself fail alike on every retry: the word "conflict" there is SQL's ("specify ON
# CONFLICT columns"), not another writer's.
_STATEMENT_ERRORS = (
    duckdb.ParserException,
    duckdb.SyntaxException,
    duckdb.BinderException,
    duckdb.NotSupportedError,
)

# PostgreSQL ended a wait for a lock on a catalog table (after the lock_timeout attach_lake sets).
_PG_LOCK_TIMEOUT = "canceling statement due to lock timeout"
# DuckDB's error for a statement whose transaction another of its threads' errors aborted first.
_ABORTED = "Current transaction is aborted"

# Writes are short, so waits on another pipeline writer end within this; longer ones are worth a warning.
WARN_AFTER_S = 1.0

log = logging.getLogger("em_assets.store")


@dataclass(frozen=True)
class Location:
    """A results store as EM_DB names it: a DuckDB file path, or `ducklake:<catalog>` plus a data path."""

    target: str
    lake: bool
    data_path: str | None = None
    # The data path is the folder beside the catalog, as no EM_DB_DATA_PATH named one.
    beside: bool = False

    @classmethod
    def parse(cls, db: str | Path, data_path: str | None = None) -> Location:
        text = str(db)
        if not text.startswith(LAKE_PREFIX):
            return cls(target=text, lake=False)
        catalog = text[len(LAKE_PREFIX) :]
        if not catalog.split(":", 1)[-1].strip() and not catalog.startswith("postgres:"):
            raise SettingsError(
                f"{text!r} names no catalog: give ducklake:sqlite:<file> (e.g. ducklake:sqlite:data/results.sqlite), "
                "ducklake:<DuckDB file> or ducklake:postgres:<connection>"
            )
        if not data_path:
            if catalog.startswith("postgres:"):
                raise SettingsError(
                    "a DuckLake with a PostgreSQL catalog needs EM_DB_DATA_PATH: a folder (or s3:// prefix) "
                    "that every machine writing results reaches"
                )
            path = str(Path(catalog.split(":", 1)[-1]).with_suffix("")) + ".files"
            return cls(target=catalog, lake=True, data_path=path + "/", beside=True)
        return cls(target=catalog, lake=True, data_path=data_path.rstrip("/") + "/")

    @property
    def catalog_kind(self) -> str:
        return self.target.split(":", 1)[0] if ":" in self.target else "duckdb"

    @property
    def local_file(self) -> Path | None:
        """The file holding the database or the catalog, where it is one on this machine."""
        if not self.lake:
            return Path(self.target)
        return None if self.catalog_kind == "postgres" else Path(self.target.split(":", 1)[-1])

    @property
    def conninfo(self) -> str | None:
        """A PostgreSQL catalog's libpq connection string; None for any other store."""
        return self.target.split(":", 1)[1] if self.lake and self.catalog_kind == "postgres" else None

    def describe(self) -> str:
        """The store as messages show it: a PostgreSQL catalog's password masked."""
        if not self.lake:
            return self.target
        target = self.target if self.conninfo is None else "postgres:" + _masked(self.conninfo)
        return f"DuckLake {target} (data {self.data_path})"


def _pg_fields(conninfo: str) -> dict[str, str]:
    """libpq's reading of a connection string; SettingsError, without the string (it may hold a password),
    where libpq cannot read it."""
    from psycopg2 import ProgrammingError
    from psycopg2.extensions import parse_dsn

    try:
        return parse_dsn(conninfo)
    except ProgrammingError as exc:
        # libpq quotes what it stumbled on: a word of a password with a space, a bad escape in one, a whole URI.
        reason = _QUOTED.sub(lambda m: m[0] if m[1] in ("=", "]") else '"***"', str(exc).strip())
        raise SettingsError(
            f"EM_DB's PostgreSQL connection string is not one libpq reads: {reason}"
        ) from None


# A quoted part of libpq's error text: of the connection string, or the "=" or "]" it looked for.
_QUOTED = re.compile(r'"([^"]*)"')


def _masked(conninfo: str) -> str:
    """A libpq connection string with its password, if any, shown as ***."""
    from psycopg2.extensions import make_dsn

    try:
        fields = _pg_fields(conninfo)
    except SettingsError:
        return "<a connection string libpq cannot read>"
    return make_dsn(**{**fields, "password": "***"}) if "password" in fields else conninfo


@contextlib.contextmanager
def catalog_errors(loc: Location, lock_timeout_s: float) -> Iterator[None]:
    """DuckDB errors raised inside as a user may see them: a lock wait PostgreSQL ended after `lock_timeout_s`
    (pg_lock_timeout) named with what set it and who holds the lock."""
    try:
        yield
    except duckdb.Error as exc:
        text = str(exc)
        # Said once where an attach's catalog_errors sits inside a unit of work's.
        if LOCK_TIMEOUT_ENV not in text and loc.conninfo is not None:
            # Where the statement's other thread saw the aborted transaction first, DuckDB reports that
            # and the lock timeout is lost; the locks held on the catalog tell the two apart.
            timed_out = _PG_LOCK_TIMEOUT in text
            holders = _catalog_lock_holders(loc.conninfo) if timed_out or _ABORTED in text else []
            if timed_out or holders:
                text = (
                    f"gave up after {lock_timeout_s:g} s ({LOCK_TIMEOUT_ENV}, PostgreSQL's lock_timeout unless "
                    "the connection string sets its own) waiting for a lock on the lake's PostgreSQL catalog: "
                    f"{'; '.join(holders) or 'another session holds a catalog table'} (e.g. a psql transaction "
                    f"left open): {text}"
                )
        if text == str(exc):
            raise
        raise type(exc)(text) from None


def _catalog_lock_holders(conninfo: str) -> list[str]:
    """Other sessions' locks on the lake's catalog tables, as "pid N holds MODE on TABLE"; none where the
    catalog cannot be asked."""
    import psycopg2

    try:
        with contextlib.closing(psycopg2.connect(conninfo, connect_timeout=5)) as pg:
            cur = pg.cursor()
            # Every reader holds AccessShareLock, which blocks nothing the lake does. pg_locks covers every
            # database of the server and pg_class only this one, so a lock elsewhere could match by its OID.
            cur.execute(
                "SELECT l.pid, l.mode, c.relname FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "WHERE l.granted AND l.pid <> pg_backend_pid() AND l.mode <> 'AccessShareLock' "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND c.relname LIKE 'ducklake%' ORDER BY l.pid, c.relname"
            )
            return [f"pid {pid} holds {mode} on {table}" for pid, mode, table in cur.fetchall()]
    except psycopg2.Error:
        return []


def is_conflict(exc: BaseException) -> bool:
    """A commit conflict between writers, or a busy catalog: an error that clears on a retry."""
    if not isinstance(exc, duckdb.Error):
        return False
    text = str(exc).lower()
    return any(m in text for m in _BUSY_MARKERS) or (
        "conflict" in text and not isinstance(exc, _STATEMENT_ERRORS)
    )


def lock_holder(exc: duckdb.Error) -> str:
    """The process holding the database, as DuckDB's lock error names it."""
    match = _HOLDER.search(str(exc))
    return f"{match[1]} (PID {match[2]})" if match else "another process"


def backoff(delay: float, cap: float = 2.0) -> float:
    """Sleep a jittered `delay`; return the next one (doubling, at most `cap`)."""
    time.sleep(delay * (1 + random.random()))
    return min(delay * 2, cap)


def open_file(path: Path, read_only: bool, config: dict, timeout_s: float, timeout_env: str):
    """Connect to a DuckDB file, waiting with backoff while another process holds its write lock."""
    return _waiting(
        lambda: duckdb.connect(str(path), read_only=read_only, config=config), path, timeout_s, timeout_env
    )


def open_lake(
    loc: Location, snapshot: int | None, read_only: bool, timeout_s: float, timeout_env: str
) -> duckdb.DuckDBPyConnection:
    """A connection of its own with the lake attached (attach_lake); a DuckDB-file catalog, which one process
    holds at a time as a DuckDB file is held, is waited for as open_file waits."""

    def attached() -> duckdb.DuckDBPyConnection:
        conn = duckdb.connect()
        try:
            attach_lake(conn, loc, snapshot, read_only, lock_timeout_s=timeout_s)
        except BaseException:
            conn.close()
            raise
        return conn

    return _waiting(attached, loc.local_file or Path(loc.target), timeout_s, timeout_env)


def _waiting(
    connect: Callable[[], duckdb.DuckDBPyConnection], path: Path, timeout_s: float, timeout_env: str
):
    """`connect()`, retried with backoff while another process holds `path`'s lock, up to `timeout_s`."""
    start, delay, warned = time.monotonic(), 0.05, False
    while True:
        try:
            return connect()
        except duckdb.IOException as exc:
            if not any(m in str(exc) for m in _LOCK_MARKERS):
                raise
            waited = time.monotonic() - start
            if waited > timeout_s:
                raise duckdb.IOException(
                    f"gave up after {waited:.1f} s ({timeout_env}={timeout_s:g}) waiting for "
                    f"{lock_holder(exc)} to release {path}: {exc}"
                ) from exc
            if not warned and waited > WARN_AFTER_S:
                warned = True
                log.warning(
                    "%s is locked by %s; waiting up to %g s in all (%s) for it. DuckDB allows one writing "
                    "process or many reading ones, never both: if it is a raw duckdb shell or notebook "
                    "connection, close it (`em-assets sql` never holds the file).",
                    path,
                    lock_holder(exc),
                    timeout_s,
                    timeout_env,
                )
            delay = backoff(delay)


def extension_file(name: str) -> str:
    """The signed extension shipped by the `duckdb-extension-<name>` package for this duckdb release."""
    package = f"duckdb_extension_{name}"
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as exc:
        raise RuntimeError(f"the {name} DuckDB extension is missing: pip install {package}") from exc
    path = Path(str(root)) / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    if not path.exists():
        raise RuntimeError(
            f"{package} ships no build for duckdb {duckdb.__version__}: install the matching one"
        )
    return str(path)


def attach_lake(
    conn: duckdb.DuckDBPyConnection,
    loc: Location,
    snapshot: int | None,
    read_only: bool,
    *,
    lock_timeout_s: float,
) -> None:
    """Load the extensions offline and attach the lake as `lake` (at `snapshot`, if given); a PostgreSQL
    catalog's lock waits end after `lock_timeout_s` (pg_lock_timeout)."""
    # A lake keeps the data path it was made with as spelt then ("data/results.files/", read from the working
    # directory), so the same lake named by another path to its catalog, or from another directory, or copied
    # with its folder, would be refused. The folder beside the catalog is its own: it overrides the recorded
    # one for this session (nothing is rewritten) where it holds files, never where EM_DB_DATA_PATH names a
    # folder, and never where it is empty (a lake whose files are elsewhere is refused rather than split).
    folder = Path(loc.data_path or "")
    beside = loc.beside and folder.is_dir() and any(folder.iterdir())
    if not read_only:
        _make_dirs(loc)
    # Quoted: the venv's path may hold an apostrophe (a home folder named O'Brien).
    conn.execute(f"LOAD '{sql_string(extension_file('ducklake'))}'")
    if loc.catalog_kind in ("postgres", "sqlite"):
        conn.execute(f"LOAD '{sql_string(extension_file(loc.catalog_kind + '_scanner'))}'")
    opts = [f"DATA_PATH '{sql_string(loc.data_path or '')}'"] + (
        ["OVERRIDE_DATA_PATH true"] if beside else []
    )
    if snapshot is not None:
        opts.append(f"SNAPSHOT_VERSION {int(snapshot)}")
    if read_only:
        opts.append("READ_ONLY")
    target = loc.target
    with catalog_errors(loc, lock_timeout_s):
        if loc.conninfo is not None:
            conninfo, secret = _password_in_secret(conn, pg_lock_timeout(loc.conninfo, lock_timeout_s))
            target = "postgres:" + conninfo
            opts += [f"META_SECRET '{secret}'"] if secret else []
        conn.execute(f"ATTACH '{sql_string(LAKE_PREFIX + target)}' AS {LAKE} ({', '.join(opts)})")
    conn.execute(f"USE {LAKE}")


# Named for this process: DuckDB refuses a META_SECRET whose name a persistent secret (~/.duckdb/stored_secrets)
# has too, as ambiguous.
_PG_SECRET = f"em_lake_catalog_{uuid.uuid4().hex[:12]}"


def _password_in_secret(conn: duckdb.DuckDBPyConnection, conninfo: str) -> tuple[str, str | None]:
    """`conninfo` without its password, and the temporary DuckDB secret holding it instead (None if none)."""
    # DuckDB keeps an attached database's connection string as its path, which any query reads
    # (duckdb_databases()); a secret's password is redacted wherever DuckDB shows it.
    from psycopg2.extensions import make_dsn

    fields = _pg_fields(conninfo)
    password = fields.pop("password", None)
    if password is None:
        return conninfo, None
    conn.execute(
        f"CREATE OR REPLACE TEMPORARY SECRET {_PG_SECRET} (TYPE postgres, PASSWORD '{sql_string(password)}')"
    )
    return make_dsn(**fields), _PG_SECRET


def pg_lock_timeout(conninfo: str, timeout_s: float) -> str:
    """`conninfo` with PostgreSQL's lock_timeout set to `timeout_s`, unless its options already set one."""
    # PostgreSQL waits for a lock for ever by default, so one session holding a catalog table (a psql
    # transaction left open) would stall every writer. Every connection DuckDB's pool opens uses this string.
    from psycopg2.extensions import make_dsn

    fields = _pg_fields(conninfo)
    # Options in the string replace PGOPTIONS, so those are kept.
    options = fields.get("options", os.environ.get("PGOPTIONS", ""))
    if "lock_timeout" in options:
        return conninfo
    # 0 would mean no limit to PostgreSQL.
    ms = max(1, round(timeout_s * 1000))
    return make_dsn(conninfo, options=f"-c lock_timeout={ms}ms {options}".strip())


def _make_dirs(loc: Location) -> None:
    if loc.local_file is not None:
        loc.local_file.parent.mkdir(parents=True, exist_ok=True)
    if loc.catalog_kind == "sqlite":
        _sqlite_wal(loc.local_file)
    if "://" not in (loc.data_path or ""):
        Path(loc.data_path or ".").mkdir(parents=True, exist_ok=True)


def _sqlite_wal(path: Path) -> None:
    """Put a SQLite catalog in WAL mode (it stays so): readers then never block a committing writer."""
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
        if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.execute("PRAGMA journal_mode=WAL")


def sql_string(text: str) -> str:
    """`text` for inside a single-quoted SQL string (paths and connection strings may hold an apostrophe)."""
    return text.replace("'", "''")


# One attached lake per process and location: loading the signed extensions costs ~0.1 s each, so writers
# reuse it through cursors (DuckLake holds no lock between transactions, unlike a DuckDB file).
# Keyed by the lock timeout too, which the attachment carries to a PostgreSQL catalog.
_ENGINES: dict[tuple[int, Location, float], duckdb.DuckDBPyConnection] = {}
_ENGINES_LOCK = threading.Lock()


def lake_engine(loc: Location, lock_timeout_s: float) -> duckdb.DuckDBPyConnection:
    key = (os.getpid(), loc, lock_timeout_s)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            conn = duckdb.connect()
            attach_lake(conn, loc, None, read_only=False, lock_timeout_s=lock_timeout_s)
            _ENGINES[key] = conn
        return _ENGINES[key]


@contextlib.contextmanager
def lake_cursor(loc: Location, lock_timeout_s: float) -> Iterator[duckdb.DuckDBPyConnection]:
    cur = lake_engine(loc, lock_timeout_s).cursor()
    try:
        cur.execute(f"USE {LAKE}")
        yield cur
    finally:
        cur.close()


def retry_conflicts(work: Callable[[], object], timeout_s: float, what: str) -> int:
    """Run `work` until it commits, retrying commit conflicts with backoff; return how many retries it took."""
    start, delay, retries = time.monotonic(), 0.02, 0
    while True:
        try:
            work()
        except duckdb.Error as exc:
            if not is_conflict(exc):
                raise
            waited = time.monotonic() - start
            if waited > timeout_s:
                raise type(exc)(
                    f"{what}: gave up after {waited:.1f} s and {retries} retries ({LOCK_TIMEOUT_ENV}={timeout_s:g}) "
                    f"on a write conflict or a busy lake catalog: {exc}"
                ) from exc
            retries += 1
            if retries == 1:
                log.info("%s: write conflict with another writer; retrying with backoff: %s", what, exc)
            # Another writer's commit is short: retry soon rather than back off for seconds.
            delay = backoff(delay, cap=0.5)
            continue
        waited = time.monotonic() - start
        if retries and waited > WARN_AFTER_S:
            log.warning("%s: committed after %d conflict retries in %.1f s", what, retries, waited)
        return retries


def current_snapshot(conn: duckdb.DuckDBPyConnection) -> int:
    return int(conn.execute(f"SELECT max(snapshot_id) FROM ducklake_snapshots('{LAKE}')").fetchone()[0])


def kept_snapshots(conn: duckdb.DuckDBPyConnection) -> set[int]:
    """The lake's snapshots that can still be read (expired ones are gone from the catalog)."""
    return {n for (n,) in conn.execute(f"SELECT snapshot_id FROM ducklake_snapshots('{LAKE}')").fetchall()}
