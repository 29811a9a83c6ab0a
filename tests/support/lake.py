"""Organism writer processes and a reader holding a session, against one DuckLake store."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import time

import duckdb
import polars as pl

from em_assets.results import backends
from em_assets.results.bench import ANSWERS, organism_writes
from em_assets.results.store import Store

ROUNDS = 2


def _writer(db: str, data_path: str, org: str, batches: int, out) -> None:
    store = Store(db, data_path=data_path, lock_timeout_s=60)
    # Twice: the second round replaces every row by key (a resumed or re-run step), so nothing doubles.
    for _ in range(ROUNDS):
        organism_writes(store, org, answers=ANSWERS, batches=batches)
    out.put((org, store.conflict_retries))


def _reader(db: str, data_path: str, stop, out) -> None:
    """A user's session: one connection held open for the whole run, polling counts."""
    conn = duckdb.connect()
    backends.attach_lake(
        conn, backends.Location.parse(db, data_path), None, read_only=True, lock_timeout_s=60
    )
    counts = []
    while not stop.is_set():
        counts.append(conn.execute("SELECT count(*) FROM completions").fetchone()[0])
        time.sleep(0.02)
    counts.append(conn.execute("SELECT count(*) FROM completions").fetchone()[0])
    out.put(counts)


def check_concurrent_writers(db: str, data_path: str, writers: int, batches: int = 8) -> dict[str, int]:
    """Run `writers` organism processes and one reader at once; assert nothing lost, doubled or failed, and
    the reader's counts never dropped; return each writer's conflict retries."""
    spawn = mp.get_context("spawn")
    store = Store(db, data_path=data_path)
    store.init()
    results, stop, seen = spawn.Queue(), spawn.Event(), spawn.Queue()
    reader = spawn.Process(target=_reader, args=(db, data_path, stop, seen))
    reader.start()
    orgs = [f"org{k}" for k in range(writers)]
    procs = [spawn.Process(target=_writer, args=(db, data_path, o, batches, results)) for o in orgs]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    stop.set()
    counts = seen.get(timeout=60)
    reader.join(timeout=30)
    assert [p.exitcode for p in procs] == [0] * writers, "a writer step failed"
    retries = dict(results.get(timeout=5) for _ in orgs)
    print(f"{writers} writers in {time.monotonic() - start:.1f} s; conflict retries {retries}")
    per_org = store.query(
        "SELECT organism, count(*) AS n, count(DISTINCT (question_id, paraphrase_idx, sample_idx)) AS k "
        "FROM completions GROUP BY organism ORDER BY organism"
    )
    assert per_org["organism"].to_list() == orgs
    assert per_org["n"].to_list() == [ANSWERS] * writers and per_org["k"].to_list() == [ANSWERS] * writers
    judged = store.query(
        "SELECT count(*) AS n, count(DISTINCT (organism, sample_idx, metric)) AS k FROM judgements"
    )
    assert judged.row(0) == (2 * ANSWERS * writers, 2 * ANSWERS * writers)
    assert store.query("SELECT count(*) AS n FROM training_losses")["n"][0] == 12 * writers
    assert len(counts) > 5 and counts[-1] == ANSWERS * writers
    assert all(b >= a for a, b in itertools.pairwise(counts)), f"reader saw a count drop: {counts}"
    return retries


def insert_racing(store: Store, table: str, rows: pl.DataFrame) -> None:
    """Insert rows as a second writer racing on their keys would: a DuckLake keeps both copies."""

    def work(conn) -> None:
        conn.register("_race", rows.to_arrow())
        conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _race")
        conn.unregister("_race")

    store.write(work, "race")
