"""The distributed store: DuckLake with a real PostgreSQL catalog, organism writers in separate processes."""

from __future__ import annotations

import contextlib
import os
import time

import pytest
from support.lake import check_concurrent_writers
from support.paths import REPO
from support.postgres import pg_bin, postgres_server

# CI installs the server first (make test runs scripts/install-postgres.sh): there a missing one fails.
pytestmark = pytest.mark.skipif(
    pg_bin() is None and not os.environ.get("CI"), reason="no PostgreSQL: run scripts/install-postgres.sh"
)


@pytest.fixture(scope="module")
def conninfo():
    with postgres_server() as info:
        yield info


def test_dagster_instance_storage_on_postgres(conninfo, tmp_path, monkeypatch):
    """deploy/dagster-k8s.yaml's storage section on a real server: runs and events survive the process."""
    import dagster as dg
    import yaml

    fields = dict(part.split("=", 1) for part in conninfo.split())
    env = {
        "DAGSTER_PG_HOST": fields["host"],
        "DAGSTER_PG_DB": fields["dbname"],
        "DAGSTER_PG_USERNAME": fields["user"],
    }
    for name, value in {**env, "DAGSTER_PG_PASSWORD": ""}.items():
        monkeypatch.setenv(name, value)
    deployed = yaml.safe_load((REPO / "deploy" / "dagster-k8s.yaml").read_text())
    storage = deployed["storage"]
    storage["postgres"]["postgres_db"]["port"] = int(fields["port"])
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({"storage": storage}))

    @dg.asset
    def one() -> int:
        return 1

    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert dg.materialize([one], instance=instance).success
    with dg.DagsterInstance.from_config(str(tmp_path)) as again:
        assert type(again.run_storage).__name__ == "PostgresRunStorage"
        assert len(again.get_runs()) == 1 and again.get_latest_materialization_event(dg.AssetKey("one"))


def test_concurrent_organism_writers_and_a_reader_on_postgres(conninfo, tmp_path):
    check_concurrent_writers(f"ducklake:postgres:{conninfo}", str(tmp_path / "lake"), writers=3, batches=4)


@pytest.mark.timeout(60)
def test_a_session_locking_a_catalog_table_fails_a_write_after_the_lock_timeout(conninfo, tmp_path):
    """Regression: PostgreSQL waits for a lock for ever by default, so an open psql transaction holding a
    catalog table stalled every writer. A lake first attached with a longer timeout is not reused."""
    import duckdb
    import polars as pl
    import psycopg2
    from psycopg2.extensions import make_dsn

    from em_assets.results.store import Store

    # A database of its own: the server's default one holds the other test's lake, with its data path.
    with contextlib.closing(psycopg2.connect(conninfo)) as admin:
        admin.autocommit = True
        admin.cursor().execute("CREATE DATABASE locked")
    conninfo = make_dsn(conninfo, dbname="locked")
    db, data = f"ducklake:postgres:{conninfo}", str(tmp_path / "lake")
    rows = pl.DataFrame({"organism": ["a"], "step": [1], "loss": [1.0]})
    Store(db, lock_timeout_s=600, data_path=data).init()
    store = Store(db, lock_timeout_s=2, data_path=data)
    session = psycopg2.connect(conninfo)
    try:
        session.cursor().execute("LOCK TABLE ducklake_snapshot")
        for attempt in (lambda: store.append_rows("training_losses", rows), lambda: store.query("SELECT 1")):
            start = time.monotonic()
            with pytest.raises(
                duckdb.Error,
                match=r"gave up after 2 s \(EM_DB_LOCK_TIMEOUT.+PostgreSQL catalog: pid \d+ holds "
                "AccessExclusiveLock on ducklake_snapshot",
            ):
                attempt()
            assert time.monotonic() - start < 10
    finally:
        session.rollback()
        session.close()
    store.append_rows("training_losses", rows)
    assert store.query("SELECT count(*) AS n FROM training_losses")["n"][0] == 1


@pytest.mark.timeout(60)
def test_an_sql_statements_catalog_error_is_shown_without_the_password(
    conninfo, tmp_path, monkeypatch, capsys
):
    """Regression: only the attach of `em-assets sql`'s connection went through backends.catalog_errors, so a
    statement that failed on the lake's PostgreSQL catalog showed its password, where DuckDB's error echoes the
    connection string, and PostgreSQL's bare lock timeout; a wait at the attach is named once, not once per
    catalog_errors around it."""
    import duckdb
    import polars as pl
    import psycopg2
    from psycopg2.extensions import make_dsn

    from em_assets.cli import main
    from em_assets.results import readonly
    from em_assets.results.store import Store

    with contextlib.closing(psycopg2.connect(conninfo)) as admin:
        admin.autocommit = True
        admin.cursor().execute("CREATE DATABASE shown")
    # The test server trusts every login: the password is carried as a real one would be, and never checked.
    secret = "s3cret-pw"
    db = f"ducklake:postgres:{make_dsn(conninfo, dbname='shown', password=secret)}"
    monkeypatch.setenv("EM_DB_DATA_PATH", str(tmp_path / "lake"))
    monkeypatch.setenv("EM_DB_LOCK_TIMEOUT", "2")
    Store(db).init()
    Store(db).append_rows("training_losses", pl.DataFrame({"organism": ["a"], "step": [1], "loss": [1.0]}))
    query = ["sql", "SELECT * FROM training_losses", "--db", db]
    # A session holding the data files' table makes the statement wait; holding the lake's metadata, the attach.
    for table, status in (("ducklake_data_file", 1), ("ducklake_metadata", 2)):
        session = psycopg2.connect(make_dsn(conninfo, dbname="shown"))
        try:
            session.cursor().execute(f"LOCK TABLE {table}")
            assert main(query) == status
        finally:
            session.rollback()
            session.close()
        err = capsys.readouterr().err
        assert "gave up after 2 s (EM_DB_LOCK_TIMEOUT" in err and err.count("gave up after") == 1, err
        assert f"holds AccessExclusiveLock on {table}" in err, err
    # `migrate`'s writable session of its own names the wait as well.
    session = psycopg2.connect(make_dsn(conninfo, dbname="shown"))
    try:
        session.cursor().execute("LOCK TABLE ducklake_data_file")
        with pytest.raises(duckdb.Error, match="gave up after 2 s"), Store(db).session() as conn:
            conn.execute("SELECT * FROM training_losses").fetchall()
    finally:
        session.rollback()
        session.close()
    checked = readonly.reading_statement

    def then_cut_off(conn, sql: str) -> str:
        # The catalog takes no new connection once the statement's is attached, as a server restarting would not.
        with contextlib.closing(psycopg2.connect(conninfo)) as admin:
            admin.autocommit = True
            admin.cursor().execute("ALTER DATABASE shown ALLOW_CONNECTIONS false")
            admin.cursor().execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'shown'"
            )
        return checked(conn, sql)

    monkeypatch.setattr(readonly, "reading_statement", then_cut_off)
    assert main(query) == 1
    err = capsys.readouterr().err
    assert "Unable to connect to Postgres" in err and "dbname=shown" in err and secret not in err, err


@pytest.mark.timeout(60)
def test_a_catalogs_password_reaches_postgresql_and_no_query_reads_it(tmp_path, monkeypatch, capsys):
    """Regression: DuckDB keeps an attached lake's connection string as its path, so `em-assets sql "SELECT
    path FROM duckdb_databases()"` printed a PostgreSQL catalog's password; it now travels in a temporary
    secret, which a server that checks passwords accepts and DuckDB shows redacted."""
    import psycopg2
    from psycopg2.extensions import make_dsn

    from em_assets.cli import main
    from em_assets.results.store import Store

    password = r"s3cret pw's \ x"
    with postgres_server(password=password) as info:
        with contextlib.closing(psycopg2.connect(make_dsn(info, password=password))) as admin:
            admin.autocommit = True
            admin.cursor().execute("CREATE DATABASE guarded")
        monkeypatch.setenv("EM_DB_DATA_PATH", str(tmp_path / "lake"))
        db = f"ducklake:postgres:{make_dsn(info, dbname='guarded', password=password)}"
        Store(db).init()
        for query in ("SELECT path FROM duckdb_databases()", "SELECT * FROM duckdb_secrets()"):
            assert main(["sql", query, "--db", db, "--format", "csv"]) == 0
            out = capsys.readouterr().out
            assert "dbname=guarded" in out or "redacted" in out, out
            assert "s3cret" not in out, out
        # The password is the one thing the server needs: without it the lake is refused.
        monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
        bare = f"ducklake:postgres:{make_dsn(info, dbname='guarded')}"
        assert main(["sql", "SELECT 1", "--db", bare, "--format", "csv"]) == 2
        assert "no password" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_a_persistent_duckdb_secret_of_any_name_leaves_the_catalogs_password_its_own(tmp_path, monkeypatch):
    """Regression: the catalog's temporary secret had a fixed name, and a user's persistent secret of that name
    made DuckDB refuse the lake's attach as ambiguous."""
    import duckdb
    import psycopg2
    from psycopg2.extensions import make_dsn

    from em_assets.results.backends import extension_file, sql_string
    from em_assets.results.store import Store

    monkeypatch.setenv("HOME", str(tmp_path))
    with contextlib.closing(duckdb.connect()) as shell:
        shell.execute(f"LOAD '{sql_string(extension_file('postgres_scanner'))}'")
        shell.execute("CREATE PERSISTENT SECRET em_lake_catalog (TYPE postgres, PASSWORD 'not it')")
    assert list((tmp_path / ".duckdb" / "stored_secrets").iterdir())
    with postgres_server(password="s3cret") as info:
        with contextlib.closing(psycopg2.connect(make_dsn(info, password="s3cret"))) as admin:
            admin.autocommit = True
            admin.cursor().execute("CREATE DATABASE guarded")
        monkeypatch.setenv("EM_DB_DATA_PATH", str(tmp_path / "lake"))
        store = Store(f"ducklake:postgres:{make_dsn(info, dbname='guarded', password='s3cret')}")
        store.init()
        assert store.query("SELECT 1 AS one")["one"].to_list() == [1]


def test_a_statement_aborted_by_its_other_threads_lock_wait_names_the_lock(conninfo):
    """Regression: where one thread of a statement hit the catalog's lock timeout and another saw the aborted
    transaction first, DuckDB reported only "Current transaction is aborted", which named no lock (in a few
    percent of runs of the tests above)."""
    import duckdb
    import psycopg2

    from em_assets.results.backends import Location, catalog_errors

    loc = Location.parse(f"ducklake:postgres:{conninfo}", "/lake")
    aborted = "Failed to get data file list from DuckLake: Current transaction is aborted (please ROLLBACK)"
    # With nothing holding a catalog table, the error is DuckDB's as it was.
    with pytest.raises(duckdb.TransactionException) as alone, catalog_errors(loc, 2):
        raise duckdb.TransactionException(aborted)
    assert str(alone.value) == aborted
    with contextlib.closing(psycopg2.connect(conninfo)) as admin:
        admin.autocommit = True
        admin.cursor().execute("CREATE TABLE IF NOT EXISTS ducklake_held (x int)")
    session = psycopg2.connect(conninfo)
    pid = session.get_backend_pid()
    try:
        session.cursor().execute("LOCK TABLE ducklake_held")
        with pytest.raises(duckdb.TransactionException) as held, catalog_errors(loc, 2):
            raise duckdb.TransactionException(aborted)
    finally:
        session.rollback()
        session.close()
    text = str(held.value)
    assert text.startswith("gave up after 2 s (EM_DB_LOCK_TIMEOUT") and text.endswith(aborted), text
    assert f"pid {pid} holds AccessExclusiveLock on ducklake_held" in text, text
