import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest
from support.children import holding

from em_assets.results.store import Store


def _rows(org: str, n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {"organism": [org] * n, "step": list(range(n)), "loss": [1.0] * n},
        schema_overrides={"step": pl.Int32},
    )


def test_replace_rows_touches_only_its_partition(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.init()
    store.replace_rows("training_losses", _rows("a", 3), "organism = ?", ["a"])
    store.replace_rows("training_losses", _rows("b", 2), "organism = ?", ["b"])
    store.replace_rows("training_losses", _rows("a", 1), "organism = ?", ["a"])
    counts = dict(store.query("SELECT organism, count(*) FROM training_losses GROUP BY 1").iter_rows())
    assert counts == {"a": 1, "b": 2}


def test_failed_replace_rolls_back(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.init()
    store.replace_rows("training_losses", _rows("a", 3), "organism = ?", ["a"])
    bad = _rows("a", 2).with_columns(pl.lit(None, dtype=pl.Int32).alias("step"))
    with pytest.raises(duckdb.Error):
        store.replace_rows("training_losses", bad, "organism = ?", ["a"])
    assert store.query("SELECT count(*) AS n FROM training_losses")["n"][0] == 3


def _hold(path: Path, read_only: bool, seconds: float) -> subprocess.Popen:
    """A child process that opens the database (as a raw duckdb shell would) and exits after `seconds`."""
    code = (
        f"import duckdb, time; c = duckdb.connect({str(path)!r}, read_only={read_only}); "
        f"print('held', flush=True); time.sleep({seconds})"
    )
    return holding(code)


def test_report_tables_are_replaced_together_or_not_at_all(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.write_tables(
        {"em_summary": pl.DataFrame({"rate": [0.0]}), "em_by_question": pl.DataFrame({"rate": [0.0]})}
    )
    with pytest.raises(duckdb.Error):
        # The second table's statement fails (a name DuckDB cannot parse) after the first was replaced.
        store.write_tables(
            {"em_summary": pl.DataFrame({"rate": [1.0]}), "em by question": pl.DataFrame({"rate": [1.0]})}
        )
    assert store.query("SELECT rate FROM em_summary")["rate"].to_list() == [0.0]


def test_writer_waits_for_a_reading_process_and_names_it(tmp_path, caplog):
    path = tmp_path / "r.duckdb"
    store = Store(path, lock_timeout_s=30)
    store.init()
    # Held long enough that the writer still meets the lock past WARN_AFTER_S of its own waiting, however long
    # a loaded machine takes to reach its first attempt.
    holder = _hold(path, read_only=True, seconds=5)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="em_assets.store"):
        store.append_rows("training_losses", _rows("a", 2))
    waited = time.monotonic() - start
    # The child's exit released the lock: the write went through then, not before.
    assert holder.wait(timeout=5) == 0 and waited > 4.5
    (warning,) = caplog.records
    message = warning.getMessage()
    assert f"(PID {holder.pid})" in message and str(path) in message, message
    assert "up to 30 s in all (EM_DB_LOCK_TIMEOUT)" in message and "`em-assets sql` never holds" in message
    assert store.query("SELECT count(*) AS n FROM training_losses")["n"][0] == 2


def test_lock_wait_is_bounded_and_names_the_holder(tmp_path, caplog):
    path = tmp_path / "r.duckdb"
    Store(path).init()
    holder = _hold(path, read_only=False, seconds=10)
    try:
        with pytest.raises(
            duckdb.IOException, match=rf"EM_DB_LOCK_TIMEOUT=0.5\) waiting for .+ \(PID {holder.pid}\)"
        ):
            Store(path, lock_timeout_s=0.5).append_rows("training_losses", _rows("a", 1))
    finally:
        holder.kill()
        holder.wait()
    # Waits under a second are routine between writers: the error names the holder, no warning came first.
    assert not caplog.records


def test_reports_read_one_state_of_a_file_another_process_writes_to(tmp_path, monkeypatch):
    from support.paths import REPO

    from em_assets.grid.schema import Thresholds
    from em_assets.reports import tables

    path = tmp_path / "r.duckdb"
    store = Store(path, lock_timeout_s=60)
    store.init()
    keys = {"organism": "o", "question_id": ["q0", "q1"], "paraphrase_idx": 0, "sample_idx": [0, 1]}
    lineage = {"base_model": "m", "recipe": "r", "dataset": "d", "seed": 0, "eval_set": "s"}
    store.append_rows("completions", pl.DataFrame({**keys, **lineage}))
    for metric in ("aligned", "coherent"):
        store.append_rows(
            "judgements", pl.DataFrame({**keys, "metric": metric, "score": 90.0, "judge_model": "j"})
        )
    # Another process makes both answers EM just after the reports have read the answers.
    code = (
        f"from em_assets.results.store import Store; Store({str(path)!r}, lock_timeout_s=60).write("
        "lambda c: c.execute(\"UPDATE judgements SET score = 10 WHERE metric = 'aligned'\"), 'w')"
    )
    writers, read = [], tables.scored_frame

    def read_then_write(source):
        frame = read(source)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        writers.append(subprocess.Popen([sys.executable, "-c", code], env=env))
        time.sleep(5)  # long enough for its write to land, were the file not held
        return frame

    monkeypatch.setattr(tables, "scored_frame", read_then_write)
    out = tables.build_reports(store, Thresholds(), "run")
    assert writers[0].wait(timeout=60) == 0
    # Every table from the state before the write.
    assert (
        out["em_summary"]["n_em_turner"].to_list() == [0] and out["em_by_question"]["n_em_turner"].sum() == 0
    )
    assert store.query("SELECT count(*) AS n FROM judgements WHERE score = 10")["n"][0] == 2


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path):
    from em_assets.results.artifacts import write_atomically

    path = tmp_path / "page.html"
    write_atomically(path, lambda tmp: tmp.write_text("old"))

    def half_written(tmp: Path) -> None:
        tmp.write_text("ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_written)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"]


def test_a_write_conflict_is_retried_until_it_commits_and_other_errors_are_not():
    from em_assets.results.backends import retry_conflicts

    db = duckdb.connect()
    db.execute("CREATE TABLE t (k INTEGER, v INTEGER); INSERT INTO t VALUES (1, 0)")
    other = db.cursor()
    other.execute("BEGIN")
    other.execute("UPDATE t SET v = 1 WHERE k = 1")
    attempts = []

    def work() -> None:
        attempts.append(1)
        if len(attempts) == 2:
            other.execute("COMMIT")  # the other writer's transaction ends before the retry
        db.cursor().execute("UPDATE t SET v = v + 10 WHERE k = 1")

    # The first attempt meets the other writer's open update (a conflict); the retry lands on its commit.
    assert retry_conflicts(work, 30, "w") == 1
    assert db.execute("SELECT v FROM t").fetchone() == (11,)
    attempts.clear()
    with pytest.raises(duckdb.CatalogException):
        retry_conflicts(lambda: attempts.append(1) or db.execute("SELECT * FROM missing"), 30, "w")
    assert len(attempts) == 1


@pytest.mark.timeout(60)
def test_a_statement_error_on_a_lake_fails_at_once_whatever_it_says(tmp_path):
    """Regression: a Binder error naming ON CONFLICT read as a commit conflict and was retried for
    EM_DB_LOCK_TIMEOUT (600 s by default)."""
    store = Store(f"ducklake:sqlite:{tmp_path}/lake.sqlite")
    store.init()
    with pytest.raises(duckdb.BinderException, match="ON CONFLICT"):
        store.write(lambda c: c.execute("INSERT OR IGNORE INTO training_losses SELECT 'a', 0, 1.0"), "w")
    assert store.conflict_retries == 0


def test_a_wedged_lake_catalog_fails_after_the_lock_timeout_naming_it(tmp_path):
    catalog = tmp_path / "lake.sqlite"
    store = Store(f"ducklake:sqlite:{catalog}", lock_timeout_s=1)
    store.init()
    # A process holding the SQLite catalog's write lock and never letting go.
    code = (
        f"import sqlite3, time; c = sqlite3.connect({str(catalog)!r}, isolation_level=None); "
        "c.execute('BEGIN EXCLUSIVE'); print('held', flush=True); time.sleep(60)"
    )
    holder = holding(code)
    try:
        start = time.monotonic()
        with pytest.raises(
            duckdb.Error, match=r"append training_losses: gave up after .+EM_DB_LOCK_TIMEOUT=1\)"
        ):
            store.append_rows("training_losses", _rows("a", 1))
        assert time.monotonic() - start < 30
    finally:
        holder.kill()
        holder.wait()
    assert store.query("SELECT count(*) AS n FROM training_losses")["n"][0] == 0


@pytest.mark.parametrize(
    ("conninfo", "options"),
    [
        ("dbname=lake host=db", "-c lock_timeout=2500ms"),
        ("dbname=lake options='-c search_path=em'", "-c lock_timeout=2500ms -c search_path=em"),
        ("postgresql://em@db/lake", "-c lock_timeout=2500ms"),
        ("dbname=lake options='-c lock_timeout=9s'", "-c lock_timeout=9s"),
    ],
)
def test_a_postgres_catalog_is_given_the_lock_timeout_unless_it_sets_one(conninfo, options):
    from psycopg2.extensions import parse_dsn

    from em_assets.results.backends import pg_lock_timeout

    fields = parse_dsn(pg_lock_timeout(conninfo, 2.5))
    assert fields["options"] == options and fields["dbname"] == "lake"


def test_a_malformed_postgres_catalog_fails_without_echoing_it():
    from em_assets.results.backends import pg_lock_timeout
    from em_assets.settings import SettingsError

    for conninfo, reason in (
        ("dbname=lake password='s3cret", "unterminated quoted string"),
        # libpq quotes the word after a space, a bad escape's token, or the whole URI.
        ("dbname=lake password=pw s3cret", 'missing "=" after "***"'),
        ("dbname=lake password=pw s3cret=x", 'invalid connection option "***"'),
        ("postgresql://em:s3cret%zz@h/lake", 'invalid percent-encoded token: "***"'),
        ("postgresql://em:s3cret@[::1/lake", 'looking for matching "]" in IPv6 host address in URI: "***"'),
    ):
        with pytest.raises(SettingsError, match="not one libpq reads") as err:
            pg_lock_timeout(conninfo, 1)
        assert "s3cret" not in str(err.value) and reason in str(err.value)


def test_a_postgres_catalog_keeps_the_pgoptions_it_would_have_used(monkeypatch):
    from psycopg2.extensions import parse_dsn

    from em_assets.results.backends import pg_lock_timeout

    monkeypatch.setenv("PGOPTIONS", "-c search_path=em")
    assert (
        parse_dsn(pg_lock_timeout("dbname=lake", 1))["options"] == "-c lock_timeout=1000ms -c search_path=em"
    )
    monkeypatch.setenv("PGOPTIONS", "-c lock_timeout=5s")
    assert pg_lock_timeout("dbname=lake", 1) == "dbname=lake"


def test_a_postgres_catalog_given_no_lock_wait_still_gets_a_limit(monkeypatch):
    """A lock_timeout of 0 would mean no limit to PostgreSQL."""
    from em_assets.results.backends import pg_lock_timeout

    monkeypatch.delenv("PGOPTIONS", raising=False)
    assert pg_lock_timeout("dbname=lake", 0) == "dbname=lake options='-c lock_timeout=1ms'"


@pytest.mark.parametrize(
    "conninfo", ["dbname=lake host=db user=u password=s3cret", "postgresql://u:s3cret@db:5432/lake"]
)
def test_a_postgres_catalogs_password_is_never_shown(conninfo):
    from em_assets.results.backends import Location

    shown = Location.parse(f"ducklake:postgres:{conninfo}", "s3://bucket/lake").describe()
    assert (
        "s3cret" not in shown and "***" in shown and "db" in shown and shown.startswith("DuckLake postgres:")
    )


@pytest.mark.parametrize(
    "conninfo",
    [
        "dbname=lake host=127.0.0.1 port=1 user=u password=s3cret-pw",
        r"dbname=lake host=127.0.0.1 port=1 user=u password='s3cret pw\'s'",
        "postgresql://u:s3cret%2Fpw@127.0.0.1:1/lake",
        # Sets its own lock_timeout, so DuckDB is given the URI as written.
        "postgresql://u:s3cret%2Fpw@127.0.0.1:1/lake?options=-c%20lock_timeout%3D5s",
    ],
)
def test_an_unreachable_postgres_catalog_is_named_without_its_password(conninfo, tmp_path, monkeypatch):
    """Regression: DuckDB's error for an ATTACH that cannot connect echoes the connection string, which the
    CLI's one-line error and a failed step's message then showed."""
    import traceback

    from em_assets.cli.errors import StoreError
    from em_assets.cli.results import usable_store

    db = f"ducklake:postgres:{conninfo}"
    monkeypatch.setenv("EM_DB_DATA_PATH", str(tmp_path / "lake"))
    store = Store(db, lock_timeout_s=1)
    for attempt in (store.init, lambda: store.query("SELECT 1")):
        with pytest.raises(duckdb.IOException, match="Unable to connect to Postgres") as err:
            attempt()
        shown = "".join(traceback.format_exception(err.value))
        assert "s3cret" not in shown and "127.0.0.1" in shown
    with pytest.raises(StoreError, match="cannot be opened as a results database") as cli:
        usable_store(db)
    assert "s3cret" not in str(cli.value) and "port 1 failed" in str(cli.value)
