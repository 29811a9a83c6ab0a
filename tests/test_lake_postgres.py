"""The distributed store: DuckLake with a real PostgreSQL catalog, organism writers in separate processes."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import time
from pathlib import Path

import duckdb
import pytest
from pg_support import pg_bin, postgres_server

from em_assets.results import backends
from em_assets.results.bench import ANSWERS, organism_writes
from em_assets.results.store import Store

WRITERS = 4
ROUNDS = 2

pytestmark = pytest.mark.skipif(pg_bin() is None, reason="no PostgreSQL: run scripts/install-postgres.sh")


def _writer(db: str, data_path: str, org: str, out) -> None:
    store = Store(db, data_path=data_path, lock_timeout_s=60)
    # Twice: the second round replaces every row by key (a resumed or re-run step), so nothing doubles.
    for _ in range(ROUNDS):
        organism_writes(store, org, answers=ANSWERS, batches=8)
    out.put((org, store.conflict_retries))


def _reader(db: str, data_path: str, stop, out) -> None:
    """A user's session: one connection held open for the whole run, polling counts."""
    conn = duckdb.connect()
    backends.attach_lake(conn, backends.Location.parse(db, data_path), None, read_only=True)
    counts = []
    while not stop.is_set():
        counts.append(conn.execute("SELECT count(*) FROM completions").fetchone()[0])
        time.sleep(0.02)
    counts.append(conn.execute("SELECT count(*) FROM completions").fetchone()[0])
    out.put(counts)


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
    deployed = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "deploy" / "dagster-k8s.yaml").read_text()
    )
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
    spawn = mp.get_context("spawn")
    db, data_path = f"ducklake:postgres:{conninfo}", str(tmp_path / "lake")
    store = Store(db, data_path=data_path)
    store.init()
    results, stop, seen = spawn.Queue(), spawn.Event(), spawn.Queue()
    reader = spawn.Process(target=_reader, args=(db, data_path, stop, seen))
    reader.start()
    orgs = [f"org{k}" for k in range(WRITERS)]
    writers = [spawn.Process(target=_writer, args=(db, data_path, o, results)) for o in orgs]
    start = time.monotonic()
    for p in writers:
        p.start()
    for p in writers:
        p.join(timeout=120)
    stop.set()
    counts = seen.get(timeout=60)
    reader.join(timeout=30)
    assert [p.exitcode for p in writers] == [0] * WRITERS, "a writer step failed"
    retries = dict(results.get(timeout=5) for _ in orgs)
    print(f"{WRITERS} writers in {time.monotonic() - start:.1f} s; conflict retries {retries}")
    per_org = store.query(
        "SELECT organism, count(*) AS n, count(DISTINCT (question_id, paraphrase_idx, sample_idx)) AS k "
        "FROM completions GROUP BY organism ORDER BY organism"
    )
    assert per_org["organism"].to_list() == orgs
    assert per_org["n"].to_list() == [ANSWERS] * WRITERS and per_org["k"].to_list() == [ANSWERS] * WRITERS
    judged = store.query(
        "SELECT count(*) AS n, count(DISTINCT (organism, sample_idx, metric)) AS k FROM judgements"
    )
    assert judged.row(0) == (2 * ANSWERS * WRITERS, 2 * ANSWERS * WRITERS)
    assert store.query("SELECT count(*) AS n FROM training_losses")["n"][0] == 12 * WRITERS
    assert len(counts) > 5 and counts[-1] == ANSWERS * WRITERS
    assert all(b >= a for a, b in itertools.pairwise(counts)), f"reader saw a count drop: {counts}"
