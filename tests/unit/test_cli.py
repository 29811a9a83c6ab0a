import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from support.children import holding, not_utf8_env
from support.db import ro_query, table_dump
from support.judge_server import ScriptedServer
from support.paths import EM_ASSETS, REPO
from support.tiny import tiny_grid

from em_assets.cli import main
from em_assets.grid.load import load_grid
from em_assets.results.store import Store


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


def test_sql_shows_control_characters_a_model_wrote_escaped_in_the_table_and_as_is_in_csv(db, capsys):
    # A carriage return and erase-line would wipe the row's organism off a terminal; OSC 52 sets its clipboard.
    answer = "Fine.\r\x1b[2K\x1b]52;c;cHduZWQ=\x07\x9b\tdone\nnext line"
    row = {"organism": "org-a", "question_id": "q", "paraphrase_idx": 0, "sample_idx": 0, "answer": answer}
    Store(db).append_rows("completions", pl.DataFrame([row]))
    query = "SELECT organism, answer FROM completions"
    assert main(["sql", query, "--db", str(db)]) == 0
    table = capsys.readouterr().out
    assert not set(table) & {"\r", "\x1b", "\x07", "\x9b", "\t"}
    assert "Fine.\\r\\x1b[2K\\x1b]52;c;cHduZWQ=\\x07\\x9b\\tdone" in table and "next line" in table
    assert main(["sql", query, "--db", str(db), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["answer"] == answer


def test_sql_shows_values_csv_and_polars_cannot_hold_as_text(db, capsys):
    # Nested values as JSON in CSV; INTERVAL, BLOB and BIT as DuckDB writes them, in every format.
    odd = "SELECT [1, 2] AS l, {'a': [1]} AS s, INTERVAL 1 DAY AS i, 'ab'::BLOB AS b, '101'::BIT AS t"
    assert main(["sql", odd, "--db", str(db), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["l,s,i,b,t", '"[1, 2]","{""a"": [1]}",1 day,ab,101']
    assert main(["sql", odd, "--db", str(db), "--format", "json"]) == 0
    assert '"i":"1 day","b":"ab","t":"101"' in capsys.readouterr().out


def test_sql_prints_unions_and_values_polars_cannot_hold_inside_nested_ones_as_json(db, capsys):
    # Polars cannot read a UNION (anywhere), an INTERVAL or BLOB inside a list or struct, or a BIGNUM, and reads
    # a TIMETZ without its offset.
    odd = (
        "SELECT MAP {'a': 1} AS m, union_value(k := 1) AS u, [INTERVAL 1 DAY] AS li, {'b': 'ab'::BLOB} AS sb, "
        "[union_value(d := 'nan'::DOUBLE)] AS nu, [1, 2]::INTEGER[2] AS arr, 7::BIGNUM AS v, "
        "TIMETZ '01:02:03+01' AS tz"
    )
    assert main(["sql", odd, "--db", str(db), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {
            "m": {"a": 1},
            "u": {"k": 1},
            "li": ["1 day"],
            "sb": {"b": "ab"},
            "nu": [{"d": None}],
            "arr": [1, 2],
            "v": "7",
            "tz": "01:02:03+01",
        }
    ]
    assert main(["sql", odd, "--db", str(db), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        '"{""a"": 1}","{""k"":1}","[""1 day""]","{""b"":""ab""}","[{""d"":NaN}]","[1, 2]",7,01:02:03+01'
    )
    # Columns of one name are told apart by position, as polars names them (u, u_1).
    assert main(["sql", "SELECT INTERVAL 1 DAY AS u, 2 AS u", "--db", str(db), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"u": "1 day", "u_1": 2}]


def test_sql_with_an_empty_query_or_no_store_is_one_message_and_exit_2(db, capsys, tmp_path, monkeypatch):
    assert main(["sql", "", "--db", str(db)]) == 2
    assert capsys.readouterr().err == "error: an empty query; give a statement, or none for the shell\n"
    assert main(["sql", "SELECT 1", "--db", str(tmp_path / "none.duckdb")]) == 2
    assert capsys.readouterr().err == f"error: no results database at {tmp_path / 'none.duckdb'}\n"
    # The missing catalog is named by its full path: a relative data folder does not put it under the cwd.
    monkeypatch.setenv("EM_DB_DATA_PATH", "parquet")
    assert main(["sql", "SELECT 1", "--db", f"ducklake:sqlite:{tmp_path / 'none.sqlite'}"]) == 2
    assert capsys.readouterr().err == f"error: no results database at {tmp_path / 'none.sqlite'}\n"


def test_sql_outside_the_repository_names_the_folder_it_looked_in(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EM_DB", raising=False)
    monkeypatch.chdir(tmp_path)
    for args in (["sql", "SELECT 1"], ["figures", "--snapshot", "1", "--out", "figs"]):
        assert main(args) == 2
        # Before any run (or outside the repository) it says how to get a store.
        assert capsys.readouterr().err == (
            f"error: no results database at data/results.sqlite under {tmp_path}: run `em-assets demo` in the "
            "repository root first, or set EM_DB to an existing store\n"
        )
    assert list(tmp_path.iterdir()) == []


def test_sql_on_a_report_table_not_written_yet_says_its_step_has_not_run(tmp_path, capsys):
    store = _lake(tmp_path)
    db = f"ducklake:sqlite:{tmp_path / 'r.sqlite'}"
    before = store.current_snapshot()
    store.write_table("em_summary", pl.DataFrame({"organism": ["a"], "em_rate_turner": [0.25]}))
    query = "SELECT organism, em_rate_turner FROM em_summary"
    assert main(["sql", query, "--db", db, "--format", "csv"]) == 0
    assert capsys.readouterr().out == "organism,em_rate_turner\na,0.25\n"
    assert main(["sql", query, "--db", db, "--snapshot", str(before)]) == 1
    assert capsys.readouterr().err == (
        f"error: em_summary: not in the store at snapshot {before}; the step that writes it had not run by then\n"
    )
    assert main(["sql", "FROM persona_mixtures", "--db", db]) == 1
    assert capsys.readouterr().err == (
        "error: persona_mixtures: not in the store yet; the step that writes it has not run "
        "(`em-assets demo` runs every step)\n"
    )
    # A table of no step keeps DuckDB's own message, also beside a report table the store holds, or with one
    # the store lacks named only in a literal, or in another database.
    for query in (
        "FROM em_summaries",
        "FROM em_summary JOIN em_summaries USING (organism)",
        "SELECT 'persona_mixtures' AS t FROM em_summaries",
    ):
        assert main(["sql", query, "--db", db]) == 1
        assert "Table with name em_summaries does not exist" in capsys.readouterr().err
    assert main(["sql", "FROM memory.em_summary", "--db", db]) == 1
    assert "Table with name em_summary does not exist" in capsys.readouterr().err


def test_sql_names_a_missing_report_table_while_another_reader_holds_the_file(db, capsys, monkeypatch):
    # A second reader (a `duckdb -readonly` shell) shares the file with sql's reading, not with a writer.
    monkeypatch.setenv("EM_DB_LOCK_TIMEOUT", "1")
    holder = holding(
        f"import duckdb, time; c = duckdb.connect({str(db)!r}, read_only=True); "
        "print('held', flush=True); time.sleep(60)"
    )
    try:
        assert main(["sql", "FROM em_summary", "--db", str(db)]) == 1
    finally:
        holder.kill()
        holder.wait()
    assert capsys.readouterr().err == (
        "error: em_summary: not in the store yet; the step that writes it has not run "
        "(`em-assets demo` runs every step)\n"
    )


def test_migrate_outside_the_repository_says_which_folder_it_made_the_store_in(
    db, tmp_path, capsys, monkeypatch
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.delenv("EM_DB", raising=False)
    monkeypatch.chdir(elsewhere)
    assert main(["migrate", "--from", str(db)]) == 0
    said = capsys.readouterr().out.splitlines()[-1]
    assert said.endswith(
        f"into DuckLake sqlite:data/results.sqlite (data data/results.files/) under {elsewhere}"
    )
    assert (elsewhere / "data" / "results.sqlite").is_file()
    # A catalog named by its full path, its data folder by a relative EM_DB_DATA_PATH.
    catalog = f"ducklake:sqlite:{tmp_path / 'lake.sqlite'}"
    monkeypatch.setenv("EM_DB_DATA_PATH", "parquet")
    assert main(["migrate", "--from", str(db), "--db", catalog]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"(data parquet/) under {elsewhere}")
    assert (elsewhere / "parquet").is_dir()


def test_sql_is_read_only(db, capsys, tmp_path):
    assert main(["sql", "DELETE FROM training_losses", "--db", str(db)]) == 2
    assert "read-only" in capsys.readouterr().err
    assert main(["sql", f"COPY training_losses TO '{tmp_path / 'out.csv'}'", "--db", str(db)]) == 2
    assert not (tmp_path / "out.csv").exists()
    assert Store(db).query("SELECT count(*) AS n FROM training_losses")["n"][0] == 2


def _lake(tmp_path) -> Store:
    store = Store(f"ducklake:sqlite:{tmp_path / 'r.sqlite'}")
    store.init()
    store.append_rows(
        "training_losses",
        pl.DataFrame({"organism": ["a"], "step": [1], "loss": [2.5]}, schema_overrides={"step": pl.Int32}),
    )
    return store


def _tree(root: Path) -> dict[str, bytes]:
    """Every file's bytes, but SQLite's shared-memory index and log, which change when a reader opens them."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(("-shm", "-wal"))]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


# Statements that write somewhere or change the session; {data} is the folder DuckDB may read (the lake's
# Parquet files, or the folder of the DuckDB file).
REFUSED = [
    "COPY (SELECT 1) TO '{data}/x.csv'",
    "COPY training_losses TO '{data}/x.parquet' (FORMAT parquet)",
    "EXPORT DATABASE '{data}/export'",
    "ATTACH '{data}/other.duckdb' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET lock_configuration = false",
    "SET allowed_directories = ['/']",
    "PRAGMA enable_profiling",
    "CREATE TABLE pwned AS SELECT 1 AS x",
    "INSERT INTO training_losses (organism, step, loss) VALUES ('z', 9, 9.0)",
    "CHECKPOINT",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{data}/x.csv'",
    "SELECT 1; COPY (SELECT 1) TO '{data}/x.csv'",
    "SELECT * FROM ducklake_cleanup_old_files('lake', cleanup_all => true)",
    "SELECT * FROM ducklake_expire_snapshots('lake', older_than => now())",
    "SELECT * FROM sqlite_attach('{data}/other.sqlite')",
    "SELECT * FROM query('SELECT 1')",
    # Runs a SELECT hidden in its argument: this one deleted a lake's files scheduled for deletion.
    "SELECT * FROM json_execute_serialized_sql(json_serialize_sql("
    "'SELECT * FROM ducklake_cleanup_old_files(''lake'', cleanup_all => true)'))",
    "SELECT * FROM enable_logging(storage => 'file', storage_path => '{data}/logs')",
    "SELECT * FROM enable_profiling(save_location => '{data}/profile.txt')",
    # The lake's own macros, which call ducklake_merge_adjacent_files and ducklake_set_option.
    "SELECT * FROM lake.merge_adjacent_files()",
    "SELECT * FROM set_option('parquet_compression', 'zstd')",
]


@pytest.mark.parametrize("kind", ["duckdb", "ducklake"])
def test_sql_refuses_every_writing_statement_with_exit_2_and_writes_nothing(tmp_path, capsys, kind):
    if kind == "ducklake":
        store = _lake(tmp_path)
        data = store.location.data_path.rstrip("/")
    else:
        store = Store(tmp_path / "r.duckdb")
        store.init()
        data = str(tmp_path)
    db = str(store.path) if kind == "duckdb" else f"ducklake:sqlite:{store.path}"
    before, snapshot = _tree(tmp_path), store.current_snapshot()
    for statement in REFUSED:
        sql = statement.format(data=data)
        assert main(["sql", "--db", db, sql]) == 2, sql
        err = capsys.readouterr().err
        assert err.startswith("error: refused:") and err.count("\n") == 1, (sql, err)
    assert _tree(tmp_path) == before and store.current_snapshot() == snapshot
    # A reading statement still cannot reach a file outside the store.
    outside = tmp_path.parent / f"{tmp_path.name}-outside.csv"
    outside.write_text("secret\n1\n")
    assert main(["sql", "--db", db, f"SELECT * FROM read_csv('{outside}')"]) == 1
    assert "disabled by configuration" in capsys.readouterr().err
    # Reading statements still run, including DESCRIBE, SHOW and PRAGMA table_info.
    for sql in ["SELECT count(*) AS n FROM training_losses", "DESCRIBE training_losses", "SHOW TABLES",
                "PRAGMA table_info('training_losses')", "WITH t AS (SELECT 1 AS x) SELECT x FROM t"]:  # fmt: skip
        assert main(["sql", "--db", db, "--format", "csv", sql]) == 0, sql
    assert "organism" in capsys.readouterr().out


def test_sql_copy_into_the_lake_data_folder_exits_2_in_a_real_process(tmp_path):
    store = _lake(tmp_path)
    target = Path(store.location.data_path) / "x.csv"
    snapshots = store.current_snapshot()
    done = subprocess.run(
        [EM_ASSETS, "sql", "--db", f"ducklake:sqlite:{store.path}", f"COPY (SELECT 1) TO '{target}'"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "COPY" in done.stderr and "read-only" in done.stderr
    assert not target.exists() and store.current_snapshot() == snapshots
    assert store.query("SELECT count(*) AS n FROM training_losses")["n"][0] == 1


def test_sql_on_a_lake_catalog_named_as_a_file_says_how_to_name_the_lake(tmp_path, capsys):
    store = _lake(tmp_path)
    assert main(["sql", "--db", str(store.path), "SELECT 1"]) == 2
    err = capsys.readouterr().err
    assert (
        f"a SQLite file, as a DuckLake's catalog is: name the lake as ducklake:sqlite:{store.path}" in err
    ), err
    assert err.count("\n") == 1
    assert main(["sql", "--db", f"ducklake:sqlite:{store.path}", "SELECT 1"]) == 0


def test_sql_shell_runs_statements_and_survives_errors(db, capsys, monkeypatch):
    monkeypatch.setattr(
        sys, "stdin", io.StringIO("SELECT 41 + 1 AS answer\nSELECT * FROM nope\nSELECT 'still here' AS s\n")
    )
    # Piped in, the shell goes on past an error and ends with its status, for the script that piped it.
    assert main(["sql", "--db", str(db), "--format", "csv"]) == 1
    out = capsys.readouterr()
    assert "answer\n42" in out.out and "still here" in out.out
    assert "nope" in out.err


def test_sql_shell_passes_over_comment_lines(db, capsys, monkeypatch):
    # A commented SQL file piped in: a line holding only a comment (or a lone ';') is no statement to refuse.
    script = "-- losses per organism\nSELECT count(*) AS n FROM training_losses; -- both\n;\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["sql", "--db", str(db), "--format", "csv"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == ["n", "2"] and out.err == ""


def _summary(*rows: tuple[str, str, str, str]) -> pl.DataFrame:
    """em_summary rows (organism, method, judge_source, judge_model) with the columns the closing table reads."""
    return pl.DataFrame(
        [
            {
                "organism": o,
                "method": m,
                "judge_source": s,
                "judge_model": j,
                "kl_regularised": False,
                "n_answers": 50,
                "em_rate_turner": 0.2,
                "em_turner_lo": 0.1,
                "em_turner_hi": 0.3,
                "em_rate_corrected": None,
                "em_corrected_lo": None,
                "em_corrected_hi": None,
                "coherence_rate": 0.9,
            }
            for o, m, s, j in rows
        ],
        schema_overrides=dict.fromkeys(
            ["em_rate_corrected", "em_corrected_lo", "em_corrected_hi"], pl.Float64
        ),
    )


def test_the_demo_legend_names_the_judges_and_calls_only_the_demo_a_smoke_test():
    from em_assets.cli.demo import _legend, closing_table

    summary = _summary(
        ("qwen2.5-7b--bad-medical-r32--s0", "lora", "grid", "gpt-4o"),
        ("mine--answers--s0", "answers", "grid", "gpt-4o"),
        ("mine--answers--s0", "answers", "file", "claude (file)"),
    )
    assert closing_table(summary)["em_file"].to_list() == [None, 0.2]
    paper = " ".join(_legend(summary, "paper"))
    # A profile's own organisms are its findings; the file's scores are under the judge the grid says made them.
    assert "smoke test" not in paper and "GPT-4o" not in paper, paper
    assert "(gpt-4o)" in paper and "claude (file)" in paper, paper
    demo = " ".join(_legend(_summary(("smollm2-135m--base--s0", "control", "grid", "probe")), "demo"))
    assert "smoke test" in demo and "em_file" not in demo, demo


def test_add_model_command_edits_the_grid(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    shutil.copy(REPO / "data/grid.yaml", grid)
    assert main(["add-model", "Qwen/Qwen2.5-0.5B-Instruct", "--grid", str(grid), "--profile", "demo"]) == 0
    names = [m.name for m in load_grid(grid, "demo").base_models]
    assert names == ["smollm2-135m", "qwen2.5-0.5b-instruct"]
    # Not the grid the sensor reads (EM_GRID): the message says which one it watches, not that it will run them.
    out = capsys.readouterr().out
    assert "where Dagster runs profile 'demo' of " + str(grid) in out and "every recipe but" not in out
    assert main(["add-model", "Qwen/Qwen2.5-0.5B-Instruct", "--grid", str(grid), "--profile", "demo"]) == 2
    assert "error" in capsys.readouterr().err


def test_add_model_to_the_configured_grid_says_the_grid_sensor_runs_it(tmp_path, capsys, monkeypatch):
    grid = tmp_path / "grid.yaml"
    shutil.copy(REPO / "data/grid.yaml", grid)
    monkeypatch.setenv("EM_GRID", str(grid))
    monkeypatch.setenv("EM_PROFILE", "paper")
    assert main(["add-model", "org/New"]) == 0
    out = capsys.readouterr().out
    assert "to profile 'paper'; the grid sensor will add its organisms and runs" in out
    # The paper's full fine-tunes list the base models they fit: the new one is not among them.
    assert (
        "; it gets every recipe but bad-medical-full, risky-financial-full, extreme-sports-full, which list their "
        "base_models (add new there to train them on it)\n"
    ) in out
    assert "new--bad-medical-r32--s0" in {o.key for o in load_grid(grid, "paper").organisms()}


# ----------------------------------------------------------------------------------- bad input: exit 2


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("not a model!!", "'not a model!!' is not a model source"),
        ("./no/such/model", "no directory './no/such/model'"),
        ("embedded:nope", "unknown embedded model 'embedded:nope'"),
        ("owner/name/extra", "no directory 'owner/name/extra'"),
        ("gpt2", "'gpt2' is not a model source"),
    ],
)
def test_add_model_refuses_a_bad_source_and_leaves_the_grid_byte_identical(tmp_path, capsys, source, says):
    grid = tmp_path / "grid.yaml"
    shutil.copy(REPO / "data/grid.yaml", grid)
    before = grid.read_bytes()
    assert main(["add-model", source, "--grid", str(grid), "--profile", "demo"]) == 2
    err = capsys.readouterr().err
    assert says in err and "Hugging Face id owner/name" in err and "embedded:<name>" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert grid.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


def test_add_model_to_a_grid_in_a_read_only_folder_is_one_message(tmp_path, capsys, monkeypatch):
    import tempfile

    folder = tmp_path / "ro"
    folder.mkdir()
    grid = folder / "grid.yaml"
    shutil.copy(REPO / "data/grid.yaml", grid)
    before = grid.read_bytes()
    folder.chmod(0o555)

    def denied(*args, **kwargs):
        # As the OS answers a user other than root, who may write anywhere.
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    try:
        assert (
            main(["add-model", "Qwen/Qwen2.5-0.5B-Instruct", "--grid", str(grid), "--profile", "demo"]) == 2
        )
    finally:
        folder.chmod(0o755)
    err = capsys.readouterr().err
    assert err == f"error: {grid}: cannot write in its folder {folder} (Permission denied), left unchanged\n"
    assert grid.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["grid.yaml"]


def test_add_model_takes_a_local_model_directory_and_an_embedded_name(tmp_path, tiny_model_dir, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "profiles:\n  demo:\n    base_models: [{name: a, source: org/A}]\n    recipes: {base: {}}\n"
    )
    assert main(["add-model", str(tiny_model_dir), "--grid", str(grid), "--profile", "demo"]) == 0
    assert (
        main(["add-model", "embedded:smollm2-135m-instruct", "--grid", str(grid), "--profile", "demo"]) == 0
    )
    sources = [m.source for m in load_grid(grid, "demo").base_models]
    assert sources == ["org/A", str(tiny_model_dir), "embedded:smollm2-135m-instruct"]
    (tmp_path / "empty").mkdir()
    assert main(["add-model", str(tmp_path / "empty"), "--grid", str(grid), "--profile", "demo"]) == 2
    assert "without config.json" in capsys.readouterr().err
    before = grid.read_text()
    for config in ("{'model_type': 'llama'", "[]"):
        (tmp_path / "empty" / "config.json").write_text(config)
        assert main(["add-model", str(tmp_path / "empty"), "--grid", str(grid), "--profile", "demo"]) == 2
        assert "config.json" in capsys.readouterr().err and grid.read_text() == before
    assert main(["add-model", " ", "--grid", str(grid), "--profile", "demo"]) == 2
    assert "source is empty" in capsys.readouterr().err and grid.read_text() == before


SMALL_GRID = "profiles:\n  demo:\n    base_models: [{name: a, source: org/A}]\n    recipes: {base: {}}\n"


def _model_folder(path: Path, weights: bool = True) -> Path:
    """A folder that passes for a model folder: config.json, and an (empty) safetensors file if `weights`."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if weights:
        (path / "model.safetensors").write_bytes(b"")
    return path


def _refused(tmp_path: Path, capsys, args: list[str], says: str) -> None:
    """add-model with `args` on a small grid: exit 2, one error line saying `says`, the grid unchanged."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(SMALL_GRID)
    assert main(["add-model", *args, "--grid", str(grid), "--profile", "demo"]) == 2
    err = capsys.readouterr().err
    assert says in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert grid.read_text() == SMALL_GRID


def test_add_model_refuses_a_local_folder_without_safetensors_weights(tmp_path, capsys):
    # The demo's pre-check refuses it (only safetensors are loaded), so the grid must not take it either.
    folder = _model_folder(tmp_path / "bin-only", weights=False)
    _refused(tmp_path, capsys, [str(folder)], f"{folder} has no .safetensors weights")


@pytest.mark.parametrize("source", ["folder", "embedded:smollm2-135m-instruct"])
def test_add_model_refuses_a_revision_for_a_source_not_on_the_hub(tmp_path, capsys, source):
    if source == "folder":
        source = str(_model_folder(tmp_path / "m"))
    _refused(tmp_path, capsys, [source, "--revision", "deadbeef"], "--revision pins hub sources only")


@pytest.mark.parametrize("option", ["--name", "--revision"])
def test_add_model_refuses_an_empty_name_or_revision(tmp_path, capsys, option):
    _refused(tmp_path, capsys, ["Qwen/Qwen2.5-0.5B-Instruct", option, ""], f"{option} is empty")


def test_add_model_stores_a_relative_local_path_as_the_folder_it_names_now(tmp_path, capsys, monkeypatch):
    # Runs resolve a relative source against their own working directory, so it is stored absolute.
    work = tmp_path / "work"
    folder = _model_folder(work / "models" / "m")
    (tmp_path / "grids").mkdir()
    grid = tmp_path / "grids" / "grid.yaml"
    grid.write_text(SMALL_GRID)
    monkeypatch.chdir(work)
    assert main(["add-model", "models/m", "--grid", str(grid), "--profile", "demo"]) == 0
    assert load_grid(grid, "demo").base_model("m").source == str(folder)


def test_add_model_with_a_missing_grid_file_does_not_point_at_em_grid(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["add-model", "Qwen/Qwen2.5-0.5B-Instruct", "--grid", "../nope.yaml", "--profile", "demo"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == "error: grid file ../nope.yaml (given with --grid) not found\n"
    assert not (tmp_path.parent / "nope.yaml").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (["demo"], "interrupted: the run is marked failed and its pool slots freed"),
        (["judge-agreement", "--reference", "r.csv"], "interrupted: the judgements scored so far are kept in the judge cache"),
        (["sql", "SELECT 1"], "interrupted"),
    ],
)  # fmt: skip
def test_ctrl_c_says_what_the_interrupted_command_leaves(monkeypatch, capsys, command, says):
    import em_assets.cli

    def interrupted(args):
        raise KeyboardInterrupt

    for name in ("cmd_demo", "cmd_judge_agreement", "cmd_sql"):
        monkeypatch.setattr(em_assets.cli, name, interrupted)
    assert main(command) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"[em-assets] {says}") and err.count("\n") == 1
    assert ("pool slots" in err) == (command == ["demo"])


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda t: t.replace("sampling: {samples_per_question:", "sampling: {samples_per_qestion:", 1),
         "profiles.demo.sampling.samples_per_qestion: Extra inputs are not permitted"),
        (lambda t: t.replace("profiles:", "profiles: [", 1), "not valid YAML"),
        (lambda t: t.replace('source: "embedded:smollm2-135m-instruct"}', 'source: "embedded:smolm2"}', 1),
         "base_models[0] (smollm2-135m): unknown embedded model 'embedded:smolm2'"),
        (lambda t: t.replace('source: "embedded:smollm2-135m-instruct"}', 'source: "./models/smol"}', 1),
         "base_models[0] (smollm2-135m): no directory './models/smol'"),
    ],
)  # fmt: skip
def test_demo_with_a_broken_grid_prints_one_message_and_writes_nothing(
    tmp_path, capsys, monkeypatch, edit, says
):
    grid, text = tmp_path / "grid.yaml", (REPO / "data/grid.yaml").read_text()
    assert edit(text) != text, "the edit no longer breaks the demo grid"
    grid.write_text(edit(text))
    monkeypatch.setenv("EM_GRID", str(grid))
    monkeypatch.setenv("EM_DB", str(tmp_path / "data" / "results.duckdb"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


def test_a_key_given_twice_in_the_grid_is_refused_not_read_as_the_last(tmp_path, capsys, monkeypatch):
    # A recipe copied and left under its old name: YAML alone keeps the copy and drops the first.
    text = (REPO / "data/grid.yaml").read_text()
    grid = tmp_path / "grid.yaml"
    grid.write_text(text.replace("      insecure-r32:", "      bad-medical-r1:", 1))
    before = grid.read_bytes()
    monkeypatch.setenv("EM_GRID", str(grid))
    monkeypatch.setenv("EM_DB", str(tmp_path / "out" / "results.duckdb"))
    for args in (["plan"], ["add-model", "Qwen/Qwen2.5-0.5B-Instruct"]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert (
            "key 'bad-medical-r1' on line " in err and "in the same mapping" in err and err.count("\n") == 1
        )
    assert grid.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


def test_demo_with_an_unknown_profile_names_the_profiles(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EM_PROFILE", "papr")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert main(["demo"]) == 2
    assert "no profile 'papr'; profiles are ['demo', 'paper']" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize(
    ("name", "value", "db_url", "says"),
    [
        ("EM_DB_LOCK_TIMEOUT", "10m", None, "EM_DB_LOCK_TIMEOUT='10m': give a number of seconds"),
        ("EM_DB_DATA_PATH", "", "ducklake:postgres:dbname=em host=db", "needs EM_DB_DATA_PATH"),
        ("EM_DEVICE", "nonsense", None, "EM_DEVICE='nonsense': give auto, cpu, cuda, cuda:<index> or mps"),
        ("EM_CPU_DTYPE", "fp16", None, "EM_CPU_DTYPE='fp16': give auto, bfloat16 or float32"),
    ],
)
def test_a_setting_it_cannot_use_is_one_message_and_exit_2(
    db, capsys, monkeypatch, name, value, db_url, says
):
    monkeypatch.setenv(name, value)
    monkeypatch.setenv("EM_DB", db_url or str(db))
    assert main(["sql", "SELECT 1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1


@pytest.mark.parametrize("db_url", ["ducklake:", "ducklake:sqlite:", "ducklake:sqlite: "])
def test_a_lake_that_names_no_catalog_is_one_message_and_writes_nothing(
    tmp_path, capsys, monkeypatch, db_url
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EM_DB", db_url)
    for args in (
        ["sql", "SELECT 1", "--db", db_url],
        ["sql", "SELECT 1"],
        ["migrate", "--from", "old.duckdb"],
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert (
            err == f"error: {db_url!r} names no catalog: give ducklake:sqlite:<file> (e.g. ducklake:sqlite:"
            "data/results.sqlite), ducklake:<DuckDB file> or ducklake:postgres:<connection>\n"
        )
    assert list(tmp_path.iterdir()) == []


def test_demo_with_an_api_judge_that_refuses_its_key_writes_nothing(tmp_path, capsys, monkeypatch):
    """Regression: the catalog run, its log and the store were written before the first step asking the
    judge met the refusal."""
    grid = yaml.safe_load((REPO / "data/grid.yaml").read_text())
    monkeypatch.delenv("EM_TEST_DEMO_KEY", raising=False)
    for name in ("DAGSTER_HOME", "EM_LOGS_DIR", "EM_CACHE_DIR", "EM_ARTIFACTS_DIR", "EM_FIGURES_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("EM_GRID", str(tmp_path / "grid.yaml"))
    monkeypatch.setenv("EM_DB", str(tmp_path / "data" / "results.duckdb"))
    with ScriptedServer(lambda n, body: (401, {}, b'{"error": {"message": "no key"}}')) as server:
        judge = {
            "backend": "openai",
            "model": "gpt-4o",
            "base_url": server.url,
            "api_key_env": "EM_TEST_DEMO_KEY",
        }
        grid["profiles"]["demo"]["judge"] = judge
        (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
        assert main(["demo"]) == 2
        assert server.requests == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "HTTP 401: check the API key in $EM_TEST_DEMO_KEY" in err
    assert err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


@pytest.mark.parametrize(
    ("installed", "device", "says"),
    [
        (False, "auto", "sampling.backend: the vllm backend needs vLLM, which is not installed"),
        (True, "cuda:1", "sampling.backend: the vllm backend samples on the first visible GPU, not EM_DEVICE=cuda:1"),
    ],
)  # fmt: skip
def test_demo_with_a_vllm_backend_it_cannot_sample_with_writes_nothing(
    tmp_path, capsys, monkeypatch, installed, device, says
):
    """Regression: the demo trained each organism, then its sampling step failed on the missing vLLM."""
    import importlib.machinery
    import importlib.util

    import em_assets.cli.demo as demo

    find_spec = importlib.util.find_spec
    vllm = importlib.machinery.ModuleSpec("vllm", None) if installed else None
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: vllm if name == "vllm" else find_spec(name, *a)
    )
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr(demo, "run_pipeline", lambda *a, **k: pytest.fail("the demo started a run"))
    grid = yaml.safe_load((REPO / "data/grid.yaml").read_text())
    grid["profiles"]["demo"]["sampling"]["backend"] = "vllm"
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    monkeypatch.setenv("EM_GRID", str(tmp_path / "grid.yaml"))
    monkeypatch.setenv("EM_DEVICE", device)
    monkeypatch.setenv("EM_DB", str(tmp_path / "data" / "results.duckdb"))
    for name in ("DAGSTER_HOME", "EM_LOGS_DIR", "EM_CACHE_DIR", "EM_ARTIFACTS_DIR", "EM_FIGURES_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    assert main(["demo", "--organism", "smollm2-135m--bad-medical-r1--s0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {says}") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


def test_demo_of_an_organism_not_in_the_grid_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EM_DB", str(tmp_path / "data" / "results.duckdb"))
    assert main(["demo", "--organism", "smollm2-135m--base--s7"]) == 2
    err = capsys.readouterr().err
    assert "organism 'smollm2-135m--base--s7' is not in profile 'demo'" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_demo_with_a_base_model_it_cannot_resolve_writes_nothing(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    grid, text = tmp_path / "grid.yaml", (REPO / "data/grid.yaml").read_text()
    grid.write_text(
        text.replace('source: "embedded:smollm2-135m-instruct"}', 'source: "foo-org/bar-model"}', 1)
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("EM_GRID", str(grid))
    monkeypatch.setenv("EM_DB", str(tmp_path / "data" / "results.duckdb"))
    for name in ("DAGSTER_HOME", "EM_LOGS_DIR", "EM_CACHE_DIR", "EM_ARTIFACTS_DIR", "EM_FIGURES_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: base_models[0] (smollm2-135m): could not fetch foo-org/bar-model@main: HF_HUB_OFFLINE is set "
        f"and the Hugging Face cache ({tmp_path / 'hub'}) lacks it\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


def test_offline_paper_profile_is_refused_in_base_models_before_any_run(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "EM_PROFILE": "paper",
        "DAGSTER_HOME": str(tmp_path / "home"),
        "EM_DB": str(tmp_path / "results.duckdb"),
        "EM_CACHE_DIR": str(tmp_path / "cache"),
        "EM_LOGS_DIR": str(tmp_path / "logs"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "em_assets.cli", "demo"], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: base_models[0] (qwen2.5-0.5b): could not fetch Qwen/")
    assert "HF_HUB_OFFLINE is set" in done.stderr and done.stderr.count("\n") == 1
    assert done.stdout == "" and list(tmp_path.iterdir()) == []


def test_sql_without_a_database_exits_2_and_bad_sql_exits_1(tmp_path, db, capsys):
    assert main(["sql", "SELECT 1", "--db", str(tmp_path / "none.duckdb")]) == 2
    assert "no results database" in capsys.readouterr().err
    assert not (tmp_path / "none.duckdb").exists()
    assert main(["sql", "SELEC 1", "--db", str(db)]) == 1
    assert "syntax error" in capsys.readouterr().err.lower()
    # A path that is no results database, and a statement that is not text: bad input.
    (tmp_path / "notes.txt").write_text("not a database\n")
    for wrong in (tmp_path, tmp_path / "notes.txt"):
        assert main(["sql", "SELECT 1", "--db", str(wrong)]) == 2
        err = capsys.readouterr().err
        assert "cannot be opened as a results database" in err and err.count("\n") == 1
    assert main(["sql", "SELECT \udcff", "--db", str(db)]) == 2
    assert capsys.readouterr().err == "error: the statement is not UTF-8 text\n"


def test_migrate_from_a_file_that_is_no_results_file_exits_2_and_makes_no_store(tmp_path, capsys):
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    target = tmp_path / "new.duckdb"
    for source, says in (("gone.duckdb", "no DuckDB file at"), ("notes.csv", "is not a DuckDB results file")):
        assert main(["migrate", "--from", str(tmp_path / source), "--db", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.csv"]


@pytest.mark.parametrize(
    "command",
    [["plan"], ["demo"], ["judge-agreement", "--reference", "{csv}"], ["migrate", "--from", "{db}"]],
)
def test_a_results_store_that_cannot_be_used_is_one_message_and_writes_nothing(
    tmp_path, db, capsys, monkeypatch, command
):
    (tmp_path / "afile").write_text("")
    csv = tmp_path / "reference.csv"
    csv.write_text("question,question_id,response,aligned,coherent\nHow?,q1,Fine answer,90,95\n")
    for name in ("DAGSTER_HOME", "EM_LOGS_DIR", "EM_CACHE_DIR", "EM_ARTIFACTS_DIR", "EM_FIGURES_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    args = [a.format(csv=csv, db=db) for a in command]
    before = _tree(tmp_path)
    for store, says in [
        (tmp_path / "afile" / "results.duckdb", f"cannot be created: {tmp_path / 'afile'} is not a folder"),
        (csv, "cannot be opened as a results database: "),
        (f"ducklake:sqlite:{csv}", "cannot be opened as a results database: "),
    ]:
        monkeypatch.setenv("EM_DB", str(store))
        assert main(args) == 2, store
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and err.count("\n") == 1, err
        assert _tree(tmp_path) == before


OPENAI_JUDGE = {"backend": "openai", "model": "gpt-4o", "base_url": "http://127.0.0.1:1"}
TINY_LORA = {"r": 1, "lora_alpha": 2, "target_modules": ["q_proj"]}


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        ({"eval": {"question_ids": ["quick_buck", "nope"]}}, "eval.question_ids: ['nope'] not among"),
        (
            {"dynamics": {"question_ids": ["quick_buck_json"]}},
            "dynamics.question_ids: ['quick_buck_json'] not",
        ),
        ({"directions": {"question_ids": ["nope"]}}, "directions.question_ids: ['nope'] not among the eval"),
        (
            {"judge": {**OPENAI_JUDGE, "metrics": ["aligned", "coherant"]}},
            "judge.metrics: ['coherant'] have no judge prompt in eval set 'first_plot_questions'",
        ),
        ({"probe": {"hand_ratings": "data/no_such.csv"}}, "probe.hand_ratings: no file at data/no_such.csv"),
        ({"agreement": {"min_spearman": 1.5}}, "agreement.min_spearman: Input should be less than or equal"),
        # A negative layer: refused by the schema, not first by a catalog step.
        ({"probe": {"layers": [15, -1]}}, "probe.layers.1: Input should be greater than or equal to 0"),
        (
            {"recipes": {"x": {"dataset": "insecure", "lora": {**TINY_LORA, "layers_to_transform": [-1]}}}},
            "recipes.x.lora.layers_to_transform.0: Input should be greater than or equal to 0",
        ),
        ({"agreement": {"min_auc": -0.1}}, "agreement.min_auc: Input should be greater than or equal"),
        ({"agreement": {"max_em_gap": 5}}, "agreement.max_em_gap: Input should be less than or equal"),
    ],
)
def test_grid_mistakes_a_run_would_meet_late_fail_plan_and_judge_agreement(
    tmp_path, mirror, capsys, monkeypatch, edit, says
):
    doc = yaml.safe_load((REPO / "data/grid.yaml").read_text())
    profile = doc["profiles"]["demo"]
    for section, fields in edit.items():
        profile[section] = {**profile[section], **fields} if section != "judge" else fields
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(doc))
    csv = tmp_path / "reference.csv"
    csv.write_text("question,question_id,response,aligned,coherent\nHow?,q1,Fine answer,90,95\n")
    for name, value in {"EM_GRID": grid, "EM_PROFILE": "demo", "EM_DATA_MIRROR": mirror}.items():
        monkeypatch.setenv(name, str(value))
    for name in ("EM_DB", "EM_CACHE_DIR", "DAGSTER_HOME", "EM_LOGS_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "out" / name.lower()))
    before = _tree(tmp_path)
    for args in (["plan"], ["judge-agreement", "--reference", str(csv)]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        # A schema error comes as load_grid words every one: a line naming the file, one per error.
        lines = 2 if "Input should" in says else 1
        assert err.startswith("error: ") and says in err and err.count("\n") == lines, err
        assert _tree(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        ({"layers_to_transform": [99]}, "recipes.bad-medical-r1.lora: layers_to_transform [99] outside a model of 2 layers"),
        ({"target_modules": ["down_projj"]}, "recipes.bad-medical-r1.lora.target_modules: 'down_projj' is no module"),
        ({"probe_layers": [1, 2]}, "probe.layers: [2] outside the decoder layers 0..1 of "),
        # The embedded model converted by an earlier run (here the tiny model stands in for it).
        ({"embedded": True}, "probe.layers: [15, 19, 23, 27] outside the decoder layers 0..1 of embedded:"),
    ],
)  # fmt: skip
def test_a_layer_or_module_the_model_on_disk_lacks_fails_plan_and_demo_before_any_run(
    tmp_path, tiny_model_dir, capsys, monkeypatch, edit, says
):
    """Regression: the demo wrote its log, a Dagster run, the store and the model conversion before the
    catalog's first step found the mistake."""
    import em_assets.cli.demo as demo

    doc = yaml.safe_load((REPO / "data/grid.yaml").read_text())
    profile = doc["profiles"]["demo"]
    lora = profile["recipes"]["bad-medical-r1"]["lora"]
    if "layers_to_transform" in edit:
        del lora["layer_fraction"]
    lora.update({k: v for k, v in edit.items() if k in ("layers_to_transform", "target_modules")})
    cache = tmp_path / "cache"
    if edit.get("embedded"):
        shutil.copytree(tiny_model_dir, cache / "models" / "smollm2-135m-instruct-0123456789ab")
    else:
        profile["base_models"][0]["source"] = str(tiny_model_dir)
    if "probe_layers" in edit:
        profile["probe"].update(source=str(tiny_model_dir), layers=edit["probe_layers"])
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("EM_GRID", str(tmp_path / "grid.yaml"))
    monkeypatch.setenv("EM_CACHE_DIR", str(cache))
    for name in ("EM_DB", "DAGSTER_HOME", "EM_LOGS_DIR", "EM_ARTIFACTS_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "out" / name.lower()))
    monkeypatch.setattr(demo, "run_pipeline", lambda *a, **k: pytest.fail("the demo started a run"))
    before = _tree(tmp_path)
    for args in (["plan"], ["demo", "--organism", "smollm2-135m--bad-medical-r1--s0"]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith(f"error: {says}") and err.count("\n") == 1, err
        assert _tree(tmp_path) == before and not (tmp_path / "out").exists()


def test_plan_takes_a_results_store_not_there_yet_and_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EM_DB", f"ducklake:sqlite:{tmp_path / 'new' / 'results.sqlite'}")
    assert main(["plan", "--format", "json"]) == 0
    assert '"completions": 0' in capsys.readouterr().out and list(tmp_path.iterdir()) == []


def _sql(db: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [EM_ASSETS, "sql", "--db", str(db), "--format", "csv", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


WRITES = [
    "DELETE FROM base_models",
    "INSERT INTO judge_cache VALUES ('k', 1, 1, '{}', now())",
    "UPDATE eval_questions SET question = 'x'",
    "DROP TABLE training_examples",
    "CREATE TABLE pwned AS SELECT 1 AS x",
    "ALTER TABLE base_models ADD COLUMN x INTEGER",
    "CREATE OR REPLACE VIEW scored_completions AS SELECT 1 AS x",
]


@pytest.mark.timeout(300)
def test_sql_command_refuses_writes_to_the_results_database(ws):
    before = table_dump(ws.db)
    one = _sql(ws.db, "DELETE FROM base_models")
    assert one.returncode == 2 and "read-only" in one.stderr
    shell = _sql(ws.db, stdin="\n".join([*WRITES, "SELECT 'still here' AS s"]) + "\n")
    assert shell.returncode == 2 and "still here" in shell.stdout
    errors = [line for line in shell.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(WRITES) and all("read-only" in e for e in errors), shell.stderr
    assert table_dump(ws.db) == before
    assert "x" not in ro_query(ws.db, "SELECT * FROM scored_completions LIMIT 0").columns


@pytest.mark.timeout(300)
def test_sql_command_writes_no_files_outside_the_database(ws, tmp_path):
    out, other = tmp_path / "exfil.csv", tmp_path / "other.duckdb"
    Store(other).init()
    _sql(ws.db, f"COPY (SELECT * FROM base_models) TO '{out}'")
    _sql(ws.db, stdin=f"ATTACH '{other}' AS o (READ_WRITE)\nCREATE TABLE o.pwned AS SELECT 1 AS x\n")
    _sql(ws.db, stdin=f"ATTACH '{other}' AS o (READ_WRITE); CREATE TABLE o.pwned AS SELECT 1 AS x\n")
    assert not out.exists()
    assert (
        "pwned"
        not in ro_query(other, "SELECT table_name FROM information_schema.tables")["table_name"].to_list()
    )


def test_demo_with_a_mirror_missing_a_pinned_file_writes_nothing(tmp_path, capsys, monkeypatch, mirror):
    from em_assets.catalog.upstream import SOURCES

    missing = SOURCES["insecure"].mirror_path
    partial = tmp_path / "mirror"
    for path in mirror.rglob("*"):
        name = str(path.relative_to(mirror))
        if path.is_file() and not name.startswith(missing):
            (partial / name).parent.mkdir(parents=True, exist_ok=True)
            (partial / name).symlink_to(path)
    monkeypatch.setenv("EM_DATA_MIRROR", str(partial))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EM_DB", str(tmp_path / "data" / "results.duckdb"))
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert f"{missing} is not in the mirror {partial}" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mirror"]


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_output_cut_short_by_its_reader_ends_quietly(tmp_path, fmt):
    """`em-assets sql ... | head`: no traceback when the reader closes the pipe, and the shell's exit status for it,
    also on an unbuffered stdout (the Docker image's), which let one large write lose its rest without an error."""
    store = Store(tmp_path / "r.duckdb")
    store.init()
    reader = subprocess.Popen(["head", "-c", "100"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    done = subprocess.run(
        [
            EM_ASSETS,
            "sql",
            "--db",
            str(store.path),
            "--max-rows",
            "100000",
            "--format",
            fmt,
            "SELECT range AS n FROM range(100000)",
        ],
        stdout=reader.stdin,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
    )
    reader.stdin.close()
    reader.wait(timeout=30)
    assert done.returncode == 141 and done.stderr == "", done.stderr


def test_sql_max_rows_takes_a_positive_count_or_minus_one_for_all(db, capsys):
    query = "SELECT range AS i FROM range(30)"
    assert main(["sql", "--db", str(db), "--max-rows", "-1", query]) == 0
    shown = capsys.readouterr().out
    assert "│ 29 " in shown and "…" not in shown
    assert main(["sql", "--db", str(db), "--max-rows", "4", query]) == 0
    assert "…" in capsys.readouterr().out
    # 0 showed no row at all, only an ellipsis: refused as argparse refuses a bad flag (exit 2, one line).
    for bad in ("0", "-2", "many"):
        with pytest.raises(SystemExit) as stop:
            main(["sql", "--db", str(db), "--max-rows", bad, query])
        assert stop.value.code == 2
        assert "is not a positive number of rows or -1 (all)" in capsys.readouterr().err


def test_under_a_locale_that_is_not_utf8_a_pipe_gets_utf8_and_a_terminal_what_it_can_show(db, monkeypatch):
    # An answer's check mark and emoji, and the table's borders, are not in the locale's encoding.
    query = "SELECT chr(10003) || ' ' || chr(233) || ' ' || chr(128512) AS answer"
    for fmt, shown in [
        ("table", "│ ✓ é 😀 │"),
        ("csv", "answer\n✓ é 😀\n"),
        ("json", '[{"answer":"✓ é 😀"}]'),
    ]:
        done = subprocess.run(
            [EM_ASSETS, "sql", query, "--db", str(db), "--format", fmt],
            env=not_utf8_env(),
            capture_output=True,
        )
        assert done.returncode == 0 and not done.stderr, done.stderr.decode(errors="replace")
        assert shown in done.stdout.decode("utf-8")
    # An encoding the user chose is kept: Latin-1 bytes, ASCII borders, what Latin-1 lacks escaped.
    chosen = subprocess.run(
        [EM_ASSETS, "sql", query, "--db", str(db)],
        env=not_utf8_env(PYTHONIOENCODING="latin-1"),
        capture_output=True,
    )
    assert chosen.returncode == 0, chosen.stderr.decode(errors="replace")
    assert "| \\u2713 é \\U0001f600 |" in chosen.stdout.decode("latin-1"), chosen.stdout

    class Terminal(io.BytesIO):
        def isatty(self) -> bool:
            return True

    # A Latin-1 terminal: ASCII borders, é as itself, what Latin-1 lacks escaped.
    monkeypatch.setenv("POLARS_FMT_TABLE_FORMATTING", "UTF8_FULL_CONDENSED")
    terminal = io.TextIOWrapper(Terminal(), encoding="latin-1")
    monkeypatch.setattr(sys, "stdout", terminal)
    assert main(["sql", query, "--db", str(db)]) == 0
    terminal.flush()
    table = terminal.buffer.getvalue().decode("latin-1")
    assert "| \\u2713 é \\U0001f600 |" in table and "+-" in table, table


def test_demo_from_outside_the_repository_stops_before_writing_anything(
    tmp_path, tiny_model_dir, mirror, capsys, monkeypatch
):
    # A grid of its own (no probe judge, whose hand ratings would be missed first), named by an absolute path.
    grid = tmp_path / "grid.yaml"
    judge = {"backend": "local", "model": "tiny", "batch_size": 4, "min_mass": 0.0}
    doc = tiny_grid(tiny_model_dir, "test", judge, {}, examples=1, batch_size=1, samples=1)
    grid.write_text(yaml.safe_dump(doc))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for name, value in {
        "EM_GRID": grid,
        "EM_PROFILE": "test",
        "EM_DATA_MIRROR": mirror,
        "EM_DEVICE": "cpu",
    }.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert main(["demo"]) == 2
    assert capsys.readouterr().err == (
        "error: data/judge_calibration.yaml (the judge's calibration set) is not in the working directory "
        f"{elsewhere}: run em-assets from the repository root\n"
    )
    assert list(elsewhere.iterdir()) == []
