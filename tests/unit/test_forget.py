"""Forgetting organisms in the results store: every row naming them goes, in one transaction; others stay, and a
DuckLake's earlier snapshot still holds them."""

import polars as pl
import pytest
from support.paths import REPO

from em_assets.results.bench import organism_writes
from em_assets.results.forget import forget, rows_held
from em_assets.results.store import Store


def _counts(store: Store, table: str) -> dict[str, int]:
    return dict(store.query(f"SELECT organism, count(*) FROM {table} GROUP BY ALL").rows())


@pytest.mark.parametrize("db", ["ducklake:sqlite:{}/lake.sqlite", "{}/results.duckdb"])
def test_forgetting_deletes_every_row_naming_the_organism_and_nothing_else(tmp_path, db):
    store = Store(db.format(tmp_path))
    store.init()
    for org in ("keep--base--s0", "gone--base--s0"):
        organism_writes(store, org, answers=8, batches=2)
    store.write_table(
        "em_summary", pl.DataFrame({"organism": ["keep--base--s0", "gone--base--s0"], "n": [8, 8]})
    )
    keep, gone = "keep--base--s0", "gone--base--s0"
    pairs = {"organism_a": [keep, gone, keep], "organism_b": [gone, keep, keep]}
    store.write_table("direction_similarity", pl.DataFrame(pairs))
    held = rows_held(store, ["gone--base--s0", "never--base--s0"])
    before = store.current_snapshot()

    deleted = forget(store, ["gone--base--s0"])

    # 1 adapter, 12 losses, 8 completions, 16 judgements, a summary row, the two pairs it is in.
    assert deleted == {
        "completions": 8,
        "direction_similarity": 2,
        "em_summary": 1,
        "judgements": 16,
        "lora_adapters": 1,
        "training_losses": 12,
    }
    assert held == {"gone--base--s0": sum(deleted.values()), "never--base--s0": 0}
    for table, n in (("completions", 8), ("judgements", 16), ("training_losses", 12), ("em_summary", 1)):
        assert _counts(store, table) == {"keep--base--s0": n}
    if store.lake:
        assert store.current_snapshot() == before + 1, "one transaction, one snapshot"
        assert _counts(store.at_snapshot(before), "judgements")["gone--base--s0"] == 16
    assert store.query("SELECT * FROM direction_similarity").rows() == [(keep, keep)]
    assert rows_held(store, ["gone--base--s0"]) == {"gone--base--s0": 0}
    assert forget(store, ["gone--base--s0"]) == {}
    assert store.current_snapshot() == (before + 1 if store.lake else None), "nothing to delete, no snapshot"


def test_forget_on_a_duckdb_file_asks_for_yes_and_deletes_nothing_without_it(tmp_path, monkeypatch, capsys):
    from em_assets.cli import main

    db = tmp_path / "results.duckdb"
    store = Store(db)
    store.init()
    organism_writes(store, "gone--base--s0", answers=4, batches=1)
    monkeypatch.setenv("EM_DB", str(db))
    monkeypatch.setenv("EM_GRID", str(REPO / "data" / "grid.yaml"))
    monkeypatch.setenv("EM_PROFILE", "demo")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert main(["forget", "gone--base--s0"]) == 2
    assert "keeps no snapshots" in capsys.readouterr().err
    assert main(["forget", "smollm2-135m--base--s0"]) == 2
    assert "is in profile 'demo'" in capsys.readouterr().err
    assert main(["forget", "gone--base--s0", " "]) == 2
    assert "an empty organism key (1 of 2)" in capsys.readouterr().err
    # A key nothing holds (a typo) deletes nothing and rebuilds no reports, --yes or not.
    assert main(["forget", "--yes", "never--base--s0"]) == 2
    assert "holds no rows and Dagster no partition for never--base--s0" in capsys.readouterr().err
    assert _counts(store, "completions") == {"gone--base--s0": 4}
    assert not (tmp_path / "home").exists()


def test_forget_with_a_log_folder_it_cannot_write_deletes_nothing(tmp_path, monkeypatch, capsys):
    from em_assets.cli import main

    db = f"ducklake:sqlite:{tmp_path}/lake.sqlite"
    store = Store(db)
    store.init()
    organism_writes(store, "gone--base--s0", answers=4, batches=1)
    (tmp_path / "a-file").write_text("")
    for name, value in {
        "EM_DB": db,
        "EM_GRID": str(REPO / "data" / "grid.yaml"),
        "EM_PROFILE": "demo",
        "DAGSTER_HOME": str(tmp_path / "home"),
        "EM_LOGS_DIR": str(tmp_path / "a-file" / "logs"),
    }.items():
        monkeypatch.setenv(name, value)
    before = store.current_snapshot()
    # The reports rebuilt after the deletion log there: found out before anything is deleted, not after.
    assert main(["forget", "gone--base--s0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "EM_LOGS_DIR" in err, err
    assert _counts(store, "completions") == {"gone--base--s0": 4}
    assert store.current_snapshot() == before
