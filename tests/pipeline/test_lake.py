"""The local DuckLake store: key replaces, snapshots, figure rebuilds from a snapshot, migration from DuckDB."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import duckdb
import polars as pl
import pytest
import yaml
from support.children import holding
from support.lake import check_concurrent_writers, insert_racing
from support.paths import REPO
from support.recompute import assert_reports_match_raw_rows

from em_assets.cli import main
from em_assets.grid.schema import Thresholds
from em_assets.reports.tables import build_reports, draw_figures, short_answer_organisms
from em_assets.results.keys import primary_keys
from em_assets.results.store import Store


def _lake(tmp_path: Path) -> str:
    return f"ducklake:sqlite:{tmp_path / 'results.sqlite'}"


def test_primary_keys_match_the_duckdb_schema(tmp_path):
    store = Store(tmp_path / "r.duckdb")
    store.init()
    declared = store.query(
        "SELECT table_name, constraint_column_names AS cols FROM duckdb_constraints() "
        "WHERE constraint_type = 'PRIMARY KEY'"
    )
    assert {r["table_name"]: tuple(r["cols"]) for r in declared.iter_rows(named=True)} == primary_keys()


def test_lake_append_replaces_by_key_and_snapshots_keep_the_past(tmp_path):
    store = Store(_lake(tmp_path))
    store.init()
    rows = pl.DataFrame({"organism": ["a", "a"], "step": [1, 2], "loss": [1.0, 2.0]})
    store.append_rows("training_losses", rows)
    before = store.current_snapshot()
    store.append_rows("training_losses", rows.with_columns(loss=pl.lit(9.0)))
    other = rows.head(1).with_columns(organism=pl.lit("b"))
    store.replace_rows("training_losses", other, "organism = ?", ["b"])
    store.replace_rows("training_losses", other, "organism = ?", ["b"])
    now = store.query("SELECT organism, step, loss FROM training_losses ORDER BY organism, step")
    assert now.rows() == [("a", 1, 9.0), ("a", 2, 9.0), ("b", 1, 1.0)]
    # A key twice in one batch (two identical answers' judge cache rows) is kept once, the last, as in a file.
    twice = pl.DataFrame({"organism": ["c", "c"], "step": [1, 1], "loss": [4.0, 5.0]})
    for each in (store, Store(tmp_path / "file.duckdb")):
        each.init()
        each.append_rows("training_losses", twice)
        assert each.query("SELECT loss FROM training_losses WHERE organism = 'c'").rows() == [(5.0,)]
    past = store.at_snapshot(before).query("SELECT loss FROM training_losses ORDER BY step")
    assert past["loss"].to_list() == [1.0, 2.0]
    assert store.current_snapshot() > before


@pytest.mark.parametrize("kind", ["lake", "file"])
def test_a_row_written_again_keeps_none_of_the_old_rows_values(tmp_path, kind):
    """Regression: a file's INSERT OR REPLACE kept the old row's value in a column the new row leaves out, where
    a lake writes the new row alone."""
    store = Store(_lake(tmp_path) if kind == "lake" else tmp_path / "r.duckdb")
    store.init()
    store.append_rows(
        "training_losses", pl.DataFrame({"organism": ["a"], "step": [1], "loss": [1.0], "kl": [0.5]})
    )
    store.append_rows("training_losses", pl.DataFrame({"organism": ["a"], "step": [1], "loss": [2.0]}))
    assert store.query("SELECT loss, kl FROM training_losses").rows() == [(2.0, None)]


def test_a_lake_is_read_by_any_path_to_its_catalog_and_as_a_copy(tmp_path, monkeypatch):
    """Regression: the lake records its data folder as spelt when made (data/results.files/, from the working
    directory), so the demo's store named by its absolute path, from another directory, or copied with its
    folder was refused ("does not match existing data path")."""
    import shutil

    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    (repo / "data").mkdir(parents=True)
    elsewhere.mkdir()
    monkeypatch.chdir(repo)
    store = Store("ducklake:sqlite:data/results.sqlite")
    store.init()
    store.append_rows("training_losses", pl.DataFrame({"organism": ["a"], "step": [1], "loss": [1.0]}))
    before = store.current_snapshot()
    store.append_rows("training_losses", pl.DataFrame({"organism": ["a"], "step": [2], "loss": [2.0]}))
    shutil.copytree(repo / "data", elsewhere / "copy")
    monkeypatch.chdir(elsewhere)
    for catalog in (repo / "data" / "results.sqlite", elsewhere / "copy" / "results.sqlite"):
        lake = Store(f"ducklake:sqlite:{catalog}")
        assert lake.query("SELECT count(*) FROM training_losses").item() == 2
        assert lake.at_snapshot(before).query("SELECT count(*) FROM training_losses").item() == 1
    # The copy takes writes into its own folder; the original is untouched.
    copy = Store(f"ducklake:sqlite:{elsewhere / 'copy' / 'results.sqlite'}")
    copy.append_rows("training_losses", pl.DataFrame({"organism": ["b"], "step": [1], "loss": [3.0]}))
    assert copy.query("SELECT count(*) FROM training_losses").item() == 3
    monkeypatch.chdir(repo)
    assert store.query("SELECT count(*) FROM training_losses").item() == 2


def test_a_lake_opens_from_a_venv_whose_path_holds_an_apostrophe(tmp_path, monkeypatch):
    from em_assets.results import backends

    shipped, folder = backends.extension_file, tmp_path / "o'brien" / ".venv"
    folder.mkdir(parents=True)

    def under_folder(name: str) -> str:
        link = folder / Path(shipped(name)).name
        if not link.exists():
            link.symlink_to(shipped(name))
        return str(link)

    monkeypatch.setattr(backends, "extension_file", under_folder)
    store = Store(_lake(tmp_path))
    store.init()
    with store.reader() as conn:
        assert conn.execute("SELECT count(*) FROM training_losses").fetchone() == (0,)
    assert sorted(p.name for p in folder.iterdir()) == [
        "ducklake.duckdb_extension",
        "sqlite_scanner.duckdb_extension",
    ]


def test_a_lake_whose_files_are_elsewhere_is_refused_without_them(tmp_path):
    """The folder beside the catalog stands in for the recorded one only where it holds files: a lake made with
    EM_DB_DATA_PATH, opened without it, is refused rather than split between two folders."""
    db = f"ducklake:sqlite:{tmp_path / 'results.sqlite'}"
    made = Store(db, data_path=str(tmp_path / "shared"))
    made.init()
    made.append_rows("training_losses", pl.DataFrame({"organism": ["a"], "step": [1], "loss": [1.0]}))
    for _ in range(2):  # the first, refused, leaves an empty folder beside the catalog
        with pytest.raises(duckdb.Error, match="does not match"):
            Store(db).init()
    assert made.query("SELECT count(*) FROM training_losses").item() == 1


def test_a_pinned_lake_reads_its_snapshot_through_one_attach(tmp_path, monkeypatch):
    from em_assets.results import backends

    store = Store(_lake(tmp_path))
    store.init()
    rows = pl.DataFrame({"organism": ["a"], "step": [1], "loss": [1.0]})
    store.append_rows("training_losses", rows)
    attached = []
    attach = backends.attach_lake
    monkeypatch.setattr(backends, "attach_lake", lambda *a, **kw: attached.append(a) or attach(*a, **kw))
    with store.pinned() as source:
        # A write after the pin is not seen by the reads inside the block.
        store.append_rows("training_losses", rows.with_columns(organism=pl.lit("b")))
        seen = [source.query("SELECT organism FROM training_losses").height for _ in range(5)]
        assert source.has_table("training_losses")
    assert seen == [1] * 5 and len(attached) == 1
    assert store.query("SELECT count(*) AS n FROM training_losses")["n"][0] == 2


def _scored_rows(store: Store, shift: float) -> None:
    n = 24
    common = {
        "organism": [f"m--r--s{i % 2}" for i in range(n)],
        "question_id": [f"q{i % 4}" for i in range(n)],
    }
    keys = {**common, "paraphrase_idx": [0] * n, "sample_idx": list(range(n))}
    completions = pl.DataFrame(
        {**keys, "base_model": "m", "recipe": "r", "dataset": "d", "seed": [i % 2 for i in range(n)]}
    )
    store.append_rows("completions", completions)
    for metric, base in (("aligned", 10.0), ("coherent", 60.0)):
        scores = [(base + 7 * i + shift) % 100 for i in range(n)]
        store.append_rows("judgements", pl.DataFrame({**keys, "metric": metric, "score": scores}))
    adapters = pl.DataFrame(
        {"organism": ["m--r--s0", "m--r--s1"], "base_model": "m", "recipe": "r", "seed": [0, 1]}
    )
    losses = pl.DataFrame(
        {"organism": ["m--r--s0"] * 5, "step": range(5), "loss": [3.0 - shift / 10 - i / 5 for i in range(5)]}
    )
    store.replace_many([("lora_adapters", adapters, "TRUE", []), ("training_losses", losses, "TRUE", [])])


def test_figures_rebuilt_from_their_snapshot_are_byte_identical(tmp_path):
    db = _lake(tmp_path)
    store = Store(db)
    store.init()
    _scored_rows(store, 0.0)
    build_reports(store, Thresholds(), "run1")
    first = draw_figures(store, Thresholds(), tmp_path / "figs1", "run1")
    recorded = store.query(
        "SELECT figure, sha256, source_snapshot FROM figure_snapshots WHERE run_id = 'run1'"
    )
    assert set(recorded["source_snapshot"]) == {first.snapshot}
    assert (
        store.query("SELECT DISTINCT source_snapshot FROM em_summary")["source_snapshot"][0] < first.snapshot
    )
    # A later run with other scores and other thresholds replaces every table the figures read.
    _scored_rows(store, 13.0)
    other = Thresholds(aligned_at_most=40, coherent_above=30)
    build_reports(store, other, "run2")
    second = draw_figures(store, other, tmp_path / "figs2", "run2")
    assert second.sha256 != first.sha256
    out = tmp_path / "rebuilt"
    assert main(["figures", "--db", db, "--snapshot", str(first.snapshot), "--out", str(out)]) == 0
    rebuilt = {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.png")}
    assert rebuilt == dict(recorded.select("figure", "sha256").iter_rows()) == first.sha256
    # An --out that is a file, or under one, is bad input: exit 2.
    (tmp_path / "a-file").write_text("")
    for bad in ("a-file", "a-file/figs"):
        assert (
            main(["figures", "--db", db, "--snapshot", str(first.snapshot), "--out", str(tmp_path / bad)])
            == 2
        )


def test_figures_into_a_folder_that_cannot_be_written_is_one_message(tmp_path, capsys, monkeypatch):
    import errno

    from em_assets.reports import tables

    db = _lake(tmp_path)
    store = Store(db)
    store.init()
    _scored_rows(store, 0.0)
    build_reports(store, Thresholds(), "run1")
    snapshot = str(store.current_snapshot())
    out = tmp_path / "locked"

    def refused(*args, **kwargs):
        # What writing into a folder without write permission raises (root ignores a folder's mode).
        raise PermissionError(errno.EACCES, "Permission denied", str(out / "em_rates.png"))

    monkeypatch.setattr(tables, "build_figures", refused)
    capsys.readouterr()
    assert main(["figures", "--db", db, "--snapshot", snapshot, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out} is not a folder that can be written") and err.count("\n") == 1


def test_snapshots_on_a_plain_duckdb_file_say_they_need_ducklake(tmp_path, capsys):
    Store(tmp_path / "r.duckdb").init()
    assert main(["sql", "--db", str(tmp_path / "r.duckdb"), "--snapshot", "1", "SELECT 1"]) == 2
    assert "snapshots need a DuckLake" in capsys.readouterr().err
    with pytest.raises(ValueError, match="snapshots need a DuckLake"):
        Store(tmp_path / "r.duckdb", snapshot=1)


def test_a_snapshot_the_lake_does_not_have_is_bad_input(tmp_path, capsys):
    db = _lake(tmp_path)
    store = Store(db)
    store.init()
    latest = store.current_snapshot()
    for bad in (str(latest + 1), "-1"):
        assert main(["sql", "--db", db, "--snapshot", bad, "SELECT 1"]) == 2
        assert f"no snapshot {bad}: " in capsys.readouterr().err
    # A snapshot taken before the reports ran has no em_summary to draw from.
    out = tmp_path / "figs"
    assert main(["figures", "--db", db, "--snapshot", str(latest), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has no em_summary" in err and err.count("\n") == 1 and not out.exists()


def test_an_expired_snapshot_is_one_message_not_a_traceback(tmp_path, capsys):
    db = _lake(tmp_path)
    store = Store(db)
    store.init()
    store.append_rows("training_losses", pl.DataFrame({"organism": ["a"], "step": [1], "loss": [1.0]}))
    expired = store.current_snapshot()
    store.append_rows("training_losses", pl.DataFrame({"organism": ["b"], "step": [1], "loss": [1.0]}))
    with store.session() as conn:
        conn.execute(f"CALL ducklake_expire_snapshots('lake', versions => [{expired}])")
    capsys.readouterr()
    for command in (["sql", "SELECT 1"], ["figures", "--out", str(tmp_path / "figs")]):
        assert main([*command, "--db", db, "--snapshot", str(expired)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: snapshot {expired} of ") and "was expired" in err, err
        assert err.count("\n") == 1


def test_sql_reads_the_past_of_a_lake(tmp_path, capsys):
    db = _lake(tmp_path)
    store = Store(db)
    store.init()
    store.append_rows("training_losses", pl.DataFrame({"organism": ["a"], "step": [1], "loss": [1.0]}))
    past = store.current_snapshot()
    store.append_rows("training_losses", pl.DataFrame({"organism": ["b"], "step": [1], "loss": [1.0]}))
    capsys.readouterr()
    query = "SELECT count(*) AS n FROM training_losses"
    assert main(["sql", "--db", db, "--format", "csv", "--snapshot", str(past), query]) == 0
    assert main(["sql", "--db", db, "--format", "csv", query]) == 0
    assert capsys.readouterr().out.split() == ["n", "1", "n", "2"]


def test_migrate_copies_a_duckdb_file_with_nothing_lost(tmp_path, capsys):
    old = tmp_path / "results.duckdb"
    source = Store(old)
    source.init()
    _scored_rows(source, 0.0)
    source.append_rows("judge_cache", pl.DataFrame({"cache_key": ["k"], "score": [1.0], "probs": ["{}"]}))
    build_reports(source, Thresholds(), "old-run")
    db = _lake(tmp_path)
    # Not a DuckDB file, no file, or the store itself: one message, exit 2, no store made.
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    for bad, says in (("notes.csv", "is not a DuckDB results file"), ("gone.duckdb", "no DuckDB file")):
        assert main(["migrate", "--from", str(tmp_path / bad), "--db", db]) == 2
        assert says in capsys.readouterr().err
    assert main(["migrate", "--from", str(old), "--db", str(old)]) == 2
    assert "is the store it would be copied into" in capsys.readouterr().err
    # Another lake's SQLite catalog (an easy mix-up) is named as such, without DuckDB fetching an extension.
    other = Store(f"ducklake:sqlite:{tmp_path / 'other.sqlite'}")
    other.init()
    assert main(["migrate", "--from", str(tmp_path / "other.sqlite"), "--db", db]) == 2
    assert "a DuckLake catalog is already a store" in capsys.readouterr().err
    assert not Path(db.split(":", 2)[-1]).exists()
    assert main(["migrate", "--from", str(old), "--db", db]) == 0
    assert "copied" in capsys.readouterr().out
    target = Store(db)
    with duckdb.connect(str(old), read_only=True) as conn:
        tables = [r[0] for r in conn.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall()]
        for table in tables:
            want = conn.execute(f"SELECT * FROM {table}").pl()
            got = target.query(f"SELECT {', '.join(want.columns)} FROM {table}")
            assert got.height == want.height, table
            assert got.sort(got.columns).equals(want.sort(want.columns)), table
    assert "em_summary" in tables and target.query("SELECT count(*) AS n FROM completions")["n"][0] == 24


def test_migrate_refuses_a_file_of_no_results_tables_and_leaves_out_unrelated_ones(tmp_path, capsys):
    unrelated = tmp_path / "other.duckdb"
    with duckdb.connect(str(unrelated)) as conn:
        conn.execute("CREATE TABLE notes AS SELECT 'x' AS text")
    empty = tmp_path / "empty.duckdb"
    duckdb.connect(str(empty)).close()
    db = _lake(tmp_path)
    for source, says in ((unrelated, "its tables: notes"), (empty, "it has no tables")):
        before = _files(tmp_path)
        assert main(["migrate", "--from", str(source), "--db", db]) == 2
        err = capsys.readouterr().err
        assert (
            err
            == f"error: {source} holds none of the results tables (completions, judgements, ...); {says}\n"
        )
        assert _files(tmp_path) == before
    with duckdb.connect(str(unrelated)) as conn:
        conn.execute("CREATE TABLE judge_cache AS SELECT 'k' AS cache_key, 1.0 AS score, '{}' AS probs")
        conn.execute("CREATE TABLE em_summary AS SELECT 'org' AS organism, 0.5 AS em_rate")
    assert main(["migrate", "--from", str(unrelated), "--db", db]) == 0
    out = capsys.readouterr().out
    assert "em_summary\t1\njudge_cache\t1\n" in out
    assert "left out 1 tables not of the results schema: notes" in out
    assert not Store(db).has_table("notes")


def _files(folder: Path) -> set[Path]:
    """The folder's entries and every file under it (a DuckLake leaves empty folders of rolled-back writes)."""
    return set(folder.iterdir()) | {p for p in folder.rglob("*") if p.is_file()}


def test_a_failed_migrate_leaves_the_store_as_it_was(tmp_path, capsys):
    old = tmp_path / "results.duckdb"
    with duckdb.connect(str(old)) as conn:
        # The first table copies; the second's step does not cast to the store's INTEGER.
        conn.execute("CREATE TABLE judge_cache AS SELECT 'k' AS cache_key, 1.0 AS score")
        conn.execute("CREATE TABLE training_losses AS SELECT 'a' AS organism, 'one' AS step, 1.0 AS loss")
    kept = pl.DataFrame({"organism": ["b"], "step": [1], "loss": [2.0]})
    for db in (tmp_path / "kept.duckdb", f"ducklake:sqlite:{tmp_path / 'kept.sqlite'}"):
        Store(db).init()
        Store(db).append_rows("training_losses", kept)
    for db in (
        str(tmp_path / "new.duckdb"),
        f"ducklake:sqlite:{tmp_path / 'new.sqlite'}",
        str(tmp_path / "kept.duckdb"),
        f"ducklake:sqlite:{tmp_path / 'kept.sqlite'}",
    ):
        before = _files(tmp_path)
        assert main(["migrate", "--from", str(old), "--db", db]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "table training_losses cannot be copied" in err, err
        # No new store is made; one that was there keeps its rows and gets nothing of the copy.
        assert _files(tmp_path) == before, db
    for db in (tmp_path / "kept.duckdb", f"ducklake:sqlite:{tmp_path / 'kept.sqlite'}"):
        store = Store(db)
        assert store.query("SELECT organism FROM training_losses")["organism"].to_list() == ["b"]
        assert store.query("SELECT count(*) AS n FROM judge_cache")["n"][0] == 0


def test_an_open_session_on_the_local_lake_never_blocks_a_writer(tmp_path):
    db = _lake(tmp_path)
    store = Store(db)
    store.init()
    rows = pl.DataFrame({"organism": ["a"], "step": [1], "loss": [1.0]})
    store.append_rows("training_losses", rows)
    holder = (
        "import sys, time, duckdb; from em_assets.results import backends; c = duckdb.connect(); "
        f"backends.attach_lake(c, backends.Location.parse({db!r}), None, read_only=True, lock_timeout_s=60); "
        "c.execute('SELECT count(*) FROM training_losses').fetchall(); print('held', flush=True); time.sleep(60)"
    )
    reader = holding(holder)
    try:
        start = time.monotonic()
        store.append_rows("training_losses", rows.with_columns(step=pl.lit(2)))
        store.write_table("em_summary", rows)
        assert time.monotonic() - start < 10
        assert reader.poll() is None, "the reader's session closed before the writes"
    finally:
        reader.kill()
        reader.wait()
    assert store.query("SELECT count(*) AS n FROM training_losses")["n"][0] == 2


def test_a_duckdb_catalog_is_taken_in_turns_and_read_after_a_write(tmp_path):
    """Regression: a DuckDB-file catalog stayed attached to the process that first wrote it, so a report's pinned
    read or a snapshot read in that process failed (the file attached twice), and another process's writer
    failed at once instead of waiting its turn."""
    db = f"ducklake:{tmp_path / 'results.ducklake'}"
    store = Store(db, lock_timeout_s=30)
    store.init()
    rows = pl.DataFrame({"organism": ["a"], "step": [1], "loss": [1.0]})
    store.append_rows("training_losses", rows)
    first = store.current_snapshot()
    with store.pinned() as pinned:
        assert pinned.query("SELECT count(*) FROM training_losses").item() == 1
    other = (
        "import polars as pl; from em_assets.results.store import Store; "
        f"Store({db!r}, lock_timeout_s=30).append_rows('training_losses', "
        "pl.DataFrame({'organism': ['b'], 'step': [1], 'loss': [2.0]}))"
    )
    subprocess.run([sys.executable, "-c", other], check=True, timeout=120)
    assert store.query("SELECT organism FROM training_losses ORDER BY 1")["organism"].to_list() == ["a", "b"]
    assert store.at_snapshot(first).query("SELECT count(*) FROM training_losses").item() == 1


def test_concurrent_organism_writers_on_the_local_lake(tmp_path):
    """The embedded default under `dagster dev`: step processes of 3 organisms writing at once."""
    check_concurrent_writers(_lake(tmp_path), str(tmp_path / "files"), writers=3, batches=4)


def test_report_assets_record_their_snapshot_in_dagster_metadata(tmp_path):
    import dagster as dg

    from em_assets.defs import report_assets
    from em_assets.defs.resources import ExperimentResource, ResultsDB

    db = _lake(tmp_path)
    store = Store(db)
    store.init()
    _scored_rows(store, 0.0)
    grid = REPO / "data" / "grid.yaml"
    resources = {
        "experiment": ExperimentResource(
            grid_path=str(grid), profile="demo", figures_dir=str(tmp_path / "f")
        ),
        "results": ResultsDB(database=db),
    }
    with dg.instance_for_test() as instance:
        assets = dg.load_assets_from_modules([report_assets])
        assert dg.materialize(assets, instance=instance, resources=resources).success
        summary = instance.get_latest_materialization_event(dg.AssetKey("em_summary")).asset_materialization
        figures = instance.get_latest_materialization_event(dg.AssetKey("em_figures")).asset_materialization
    tables_snapshot = summary.metadata["source_snapshot"].value
    assert (
        tables_snapshot
        == store.query("SELECT DISTINCT source_snapshot FROM em_summary")["source_snapshot"][0]
    )
    recorded = store.query("SELECT figure, sha256, source_snapshot FROM figure_snapshots")
    assert figures.metadata["source_snapshot"].value == recorded["source_snapshot"][0] > tables_snapshot
    for figure, digest, _ in recorded.iter_rows():
        assert figures.metadata[f"{figure}_sha256"].value == digest


@pytest.mark.parametrize("kind", ["lake", "file"])
def test_the_judge_caveat_reads_the_state_the_report_tables_were_read_from(tmp_path, monkeypatch, kind):
    import dagster as dg

    from em_assets.defs import report_assets
    from em_assets.defs.resources import ExperimentResource, ResultsDB
    from em_assets.grid.load import load_grid
    from em_assets.judging.agreement_stage import judge_caveat, judge_name

    db = _lake(tmp_path) if kind == "lake" else str(tmp_path / "results.duckdb")
    store = Store(db)
    store.init()
    _scored_rows(store, 0.0)
    grid_path = REPO / "data" / "grid.yaml"
    grid = load_grid(grid_path, "demo")
    measured = pl.DataFrame(
        {
            "judge": judge_name(grid.judge),
            "metric": "aligned",
            "n": [7],
            "spearman": [0.5],
            "auc": [0.75],
            "auc_lo": [0.6],
            "auc_hi": [0.9],
        }
    )
    write_tables = Store.write_tables

    def after_a_judge_agreement_run(self, tables):
        # A judge_agreement run commits after the tables were read, before they are written.
        Store(db).append_rows("judge_agreement", measured)
        write_tables(self, tables)

    monkeypatch.setattr(Store, "write_tables", after_a_judge_agreement_run)
    resources = {
        "experiment": ExperimentResource(
            grid_path=str(grid_path), profile="demo", figures_dir=str(tmp_path / "f")
        ),
        "results": ResultsDB(database=db),
    }
    with dg.instance_for_test() as instance:
        assert dg.materialize([report_assets.em_tables], instance=instance, resources=resources).success
        summary = instance.get_latest_materialization_event(dg.AssetKey("em_summary")).asset_materialization
    caveat = summary.metadata["judge_caveat"].value
    # The tables' corrections were read without the agreement, and so is the caveat beside them.
    assert "not yet measured against GPT-4o" in caveat, caveat
    assert "aligned Spearman 0.50, AUC for misaligned 0.75 [0.60, 0.90]" in judge_caveat(store, grid)


def _tiny_lake(tmp_path: Path, model_dir: Path, samples: int):
    """The tiny grid's control organism's context over an empty local DuckLake."""
    from support.tiny import tiny_grid

    from em_assets.context import StageContext
    from em_assets.grid.load import load_grid
    from em_assets.grid.schema import Organism

    doc = tiny_grid(
        model_dir, "p", {"backend": "local", "model": "tiny"}, {}, examples=2, batch_size=2, samples=samples
    )
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(doc))
    grid = load_grid(tmp_path / "grid.yaml", "p")
    store = Store(_lake(tmp_path))
    store.init()
    organism = Organism.parse("tiny--base--s0")
    return StageContext(store=store, grid=grid, organism=organism, run_id="r", artifacts_dir=tmp_path)


def test_an_answer_a_lake_holds_twice_is_dropped_and_sampled_again(tmp_path, tiny_model_dir):
    from em_assets.results.queries import drop_completions_except
    from em_assets.sampling.stage import plan_sampling

    ctx = _tiny_lake(tmp_path, tiny_model_dir, samples=2)
    grid, store, key = ctx.grid, ctx.store, ctx.key
    question = {"eval_set": grid.eval.questions, "paraphrase_idx": 0, "question": "q?", "system": None}
    store.append_rows(
        "eval_questions", pl.DataFrame([question | {"question_id": "q0", "source_sha256": "x"}])
    )
    rows = pl.DataFrame(
        [
            question | {"organism": key, "question_id": "q0", "sample_idx": i, "sampling_hash": "h"}
            for i in (0, 1)
        ]
    )
    store.append_rows("completions", rows)
    # Two writers racing on one answer, each inserting it: the lake keeps both copies.
    insert_racing(store, "completions", rows.head(1))
    plan = plan_sampling(ctx, "h")
    assert plan.keep == {("q0", 0, 1)} and plan.stale == 2
    drop_completions_except(store, key, plan.keep)
    assert store.query("SELECT sample_idx FROM completions")["sample_idx"].to_list() == [1]


def test_a_judgement_a_lake_holds_twice_is_written_once_again(tmp_path, tiny_model_dir):
    from em_assets.judging.judges import judge_identity
    from em_assets.judging.stage import JudgeIdentity, judge_completions, needed_judgements

    ctx = _tiny_lake(tmp_path, tiny_model_dir, samples=1)
    grid, store, key = ctx.grid, ctx.store, ctx.key
    prompts = [
        {"eval_set": grid.eval.questions, "question_id": "q0", "metric": m, "prompt": "{question} {answer}"}
        for m in grid.judge.metrics
    ]
    store.append_rows("judge_prompts", pl.DataFrame([p | {"prompt_hash": p["metric"]} for p in prompts]))
    completion = {"organism": key, "eval_set": grid.eval.questions, "question_id": "q0", "paraphrase_idx": 0}
    completion |= {"sample_idx": 0, "question": "q?", "answer": "a.", "sampling_hash": "h"}
    store.append_rows("completions", pl.DataFrame([completion]))
    judge = JudgeIdentity(grid.judge.backend, *judge_identity(grid, None, store))
    # Every score is in the judge cache, so no judge runs.
    cached = [{"cache_key": p.cache_key, "score": 80.0} for p in needed_judgements(ctx, judge).values()]
    store.append_rows("judge_cache", pl.DataFrame(cached))
    judge_completions(ctx)
    one = store.query("SELECT * FROM judgements WHERE metric = 'aligned'")
    # Two writers racing on one judgement, each inserting it: the lake keeps both copies.
    insert_racing(store, "judgements", one)
    assert judge_completions(ctx).cache_hits == 1
    rows = store.query("SELECT metric, count(*) AS n FROM judgements GROUP BY metric ORDER BY metric")
    assert rows.rows() == [("aligned", 1), ("coherent", 1)]


def test_reports_count_an_answer_a_lake_holds_twice_once(tmp_path):
    store = Store(_lake(tmp_path))
    store.init()
    keys = {"organism": "o", "question_id": ["q0", "q1"] * 2, "paraphrase_idx": 0, "sample_idx": [0, 1, 2, 3]}
    lineage = {"base_model": "m", "recipe": "r", "dataset": "d", "seed": 0, "eval_set": "s"}
    store.append_rows("completions", pl.DataFrame({**keys, **lineage, "answer": "Short."}))
    scores = {"aligned": [10.0, 90.0, 90.0, 90.0], "coherent": [90.0] * 4}
    judged = pl.concat(
        pl.DataFrame({**keys, "metric": m, "score": s, "judge_model": "j", "judge_revision": "1"})
        for m, s in scores.items()
    )
    store.append_rows("judgements", judged)
    # Two writers racing on one answer, each inserting it and its scores: the lake keeps both copies.
    twice = store.query("SELECT * FROM completions WHERE sample_idx = 0")
    insert_racing(store, "completions", twice)
    insert_racing(store, "judgements", judged.filter(pl.col("sample_idx") == 0))
    summary = build_reports(store, Thresholds(), "run")["em_summary"].row(0, named=True)
    assert (summary["n_answers"], summary["n_scored"], summary["n_em_turner"]) == (4, 4, 1)
    assert short_answer_organisms(store)["n_answers"].to_list() == [4]


def test_reports_equal_their_definition_on_racing_rows_threshold_scores_and_a_files_scores(tmp_path):
    """em_summary and em_by_question equal the rates recomputed from the raw rows: the newest of two racing
    judgements, scores on the thresholds, missing and NaN scores, a file judge's scores of its own import only."""
    store = Store(_lake(tmp_path))
    store.init()
    then, now = datetime(2026, 1, 1), datetime(2026, 1, 2)
    keys = {"question_id": ["q0", "q1"] * 3, "paraphrase_idx": 0, "sample_idx": range(6), "created_at": then}
    lineage = {"base_model": "m", "recipe": "r", "seed": 0, "eval_set": "s", "sampling_hash": "h"}
    for org in ("o", "imported"):
        store.append_rows("completions", pl.DataFrame({"organism": org, **keys, **lineage}))
    aligned, coherent = [30.0, 31.0, 10.0, None, 5.0, 30.0], [51.0, 90.0, 50.0, 80.0, float("nan"), 90.0]
    judged = pl.concat(
        pl.DataFrame({"organism": org, **keys, "metric": m, "score": s, "judge_model": "j"})
        for org in ("o", "imported") for m, s in (("aligned", aligned), ("coherent", coherent))
    )  # fmt: skip
    # The grid's judge has not scored the imported organism's last answer yet.
    store.append_rows("judgements", judged.filter((pl.col("organism") == "o") | (pl.col("sample_idx") < 5)))
    # A later judgement of answer 1 racing the first: the lake keeps both, and the newer one counts.
    newer = judged.filter(organism="o", sample_idx=1, metric="aligned")
    insert_racing(store, "judgements", newer.with_columns(score=pl.lit(20.0), created_at=pl.lit(now)))
    # The file's scores are other than the grid judge's: the same scores in reverse order.
    files = judged.filter(organism="imported").with_columns(
        pl.col("score").reverse().over("metric"),
        judge_model=pl.lit("gpt-4o (file)"),
        sampling_hash=pl.lit("h"),
    )
    # An earlier import's scores, of answers the organism no longer has.
    earlier = files.with_columns(judge_model=pl.lit("gpt-4o (old file)"), sampling_hash=pl.lit("old"))
    store.append_rows("imported_judgements", pl.concat([files, earlier]))
    build_reports(store, Thresholds(), "run")
    assert_reports_match_raw_rows(store, Thresholds())


def test_the_definition_check_refuses_an_empty_store(tmp_path):
    """With no answers the report tables are empty: the check says it compared nothing rather than passing."""
    store = Store(tmp_path / "results.duckdb")
    store.init()
    build_reports(store, Thresholds(), "run")
    with pytest.raises(AssertionError, match="nothing is compared"):
        assert_reports_match_raw_rows(store, Thresholds())


def test_the_results_resource_names_the_lakes_data_path_and_lock_timeout(tmp_path, monkeypatch):
    """Set on the resource (the Dagster UI's config) they are the store's; unset, the environment's."""
    from em_assets.defs.resources import ResultsDB

    # A lake names its data path as a folder (a trailing slash).
    db, files = f"ducklake:sqlite:{tmp_path / 'catalog.sqlite'}", f"{tmp_path / 'files'}/"
    store = ResultsDB(database=db, db_data_path=files, lock_timeout_s=5).store()
    assert (store.location.data_path, store.lock_timeout_s) == (files, 5)
    assert (tmp_path / "files").is_dir()
    monkeypatch.setenv("EM_DB_LOCK_TIMEOUT", "7")
    monkeypatch.setenv("EM_DB_DATA_PATH", files)
    assert ResultsDB.from_env().lock_timeout_s == 7
    store = ResultsDB(database=db).store()
    assert (store.location.data_path, store.lock_timeout_s) == (files, 7)


def test_the_judge_caveat_names_organisms_another_judge_scored(tmp_path):
    from em_assets.grid.load import load_grid
    from em_assets.judging.agreement_stage import judge_caveat, judge_name

    store = Store(str(tmp_path / "results.duckdb"))
    store.init()
    grid = load_grid(REPO / "data" / "grid.yaml", "demo")
    measured = {"judge_model": "probe:m", "judge_revision": "head-b"}
    store.append_rows(
        "judge_agreement",
        pl.DataFrame(
            {"judge": judge_name(grid.judge), "metric": "aligned", "n": [7], "spearman": [0.5]} | measured
        ),
    )
    summary = pl.DataFrame(
        {
            "organism": ["old", "new", "imported", "unjudged"],
            "judge_source": ["grid", "grid", "file", "grid"],
            "judge_model": ["probe:m", "probe:m", "gpt-4o (file)", None],
            "judge_revision": ["head-a", "head-b", "file", None],
        }
    )
    caveat = judge_caveat(store, grid, summary)
    assert "Not so for old:" in caveat, caveat
    assert "aligned Spearman 0.50" in judge_caveat(store, grid, summary.filter(pl.col("organism") != "old"))
    assert "Not so" not in judge_caveat(store, grid, summary.filter(pl.col("organism") != "old"))
    # An agreement row written before judges were recorded names none to compare with: no organism is named.
    unnamed = {"judge_model": None, "judge_revision": None}
    store.append_rows(
        "judge_agreement",
        pl.DataFrame(
            {"judge": judge_name(grid.judge), "metric": "aligned", "n": [7], "spearman": [0.5]} | unnamed,
            schema_overrides={"judge_model": pl.String, "judge_revision": pl.String},
        ),
    )
    with warnings.catch_warnings():
        # Not by comparing with a null, which polars answers with null and a warning.
        warnings.simplefilter("error")
        assert "Not so" not in judge_caveat(store, grid, summary)
