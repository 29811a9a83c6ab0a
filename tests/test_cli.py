import io
import shutil
import sys
from pathlib import Path

import polars as pl
import pytest

from em_assets.cli import main
from em_assets.grid.load import load_grid
from em_assets.results.store import Store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def db(tmp_path) -> Path:
    store = Store(tmp_path / "r.duckdb")
    store.init()
    store.append_rows(
        "training_losses",
        pl.DataFrame(
            {"organism": ["a", "b"], "step": [1, 1], "loss": [2.5, 1.5]}, schema_overrides={"step": pl.Int32}
        ),
    )
    return store.path


def test_sql_prints_csv_and_json(db, capsys):
    assert (
        main(
            [
                "sql",
                "SELECT organism, loss FROM training_losses ORDER BY organism",
                "--db",
                str(db),
                "--format",
                "csv",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines() == ["organism,loss", "a,2.5", "b,1.5"]
    assert (
        main(["sql", "SELECT count(*) AS n FROM training_losses", "--db", str(db), "--format", "json"]) == 0
    )
    assert '"n":2' in capsys.readouterr().out.replace(" ", "")


def test_sql_is_read_only(db, capsys, tmp_path):
    assert main(["sql", "DELETE FROM training_losses", "--db", str(db)]) == 1
    assert "read-only" in capsys.readouterr().err
    assert main(["sql", f"COPY training_losses TO '{tmp_path / 'out.csv'}'", "--db", str(db)]) == 1
    assert not (tmp_path / "out.csv").exists()
    assert Store(db).query("SELECT count(*) AS n FROM training_losses")["n"][0] == 2


def test_sql_shell_runs_statements_and_survives_errors(db, capsys, monkeypatch):
    monkeypatch.setattr(
        sys, "stdin", io.StringIO("SELECT 41 + 1 AS answer\nSELECT * FROM nope\nSELECT 'still here' AS s\n")
    )
    assert main(["sql", "--db", str(db), "--format", "csv"]) == 0
    out = capsys.readouterr()
    assert "answer\n42" in out.out and "still here" in out.out
    assert "nope" in out.err


def test_add_model_command_edits_the_grid(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    shutil.copy(REPO / "data/grid.yaml", grid)
    assert main(["add-model", "Qwen/Qwen2.5-0.5B-Instruct", "--grid", str(grid), "--profile", "demo"]) == 0
    names = [m.name for m in load_grid(grid, "demo").base_models]
    assert names == ["smollm2-135m", "qwen2.5-0.5b-instruct"]
    assert main(["add-model", "Qwen/Qwen2.5-0.5B-Instruct", "--grid", str(grid), "--profile", "demo"]) == 2
    assert "error" in capsys.readouterr().err
