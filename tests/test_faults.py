"""Nothing lost: kills mid-stage, partition rewrites, parallel runs with readers, bad input, and secrets.

Every fault hits a real process (children of tests/fault_support.py), a real DuckDB file and a real HTTP judge on
127.0.0.1; the model is the tiny random Llama of conftest.py and the grid is a few seconds of work.
Left to other files: train_lora's checkpoint arithmetic at the core level (tests/test_training.py), judge retry
and Retry-After rules (test_http_judge.py), grid key paths (test_config.py::test_wrong_key_is_named_with_its_path),
parser messages in isolation (test_datasets.py), lock waits and rollback (test_store.py).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import torch
from conftest import tiny_grid
from fault_support import (
    EM_ASSETS,
    KEY_ENV,
    ORGANISM_TABLES,
    PROFILE,
    SECRET,
    JudgeServer,
    SqlShell,
    children,
    count,
    files_containing,
    kill,
    location_env,
    profile,
    resources,
    result_of,
    ro_query,
    spawn,
    stage_context,
    table_dump,
    wait_for,
    write_grid,
)
from safetensors.torch import load_file

from em_assets.catalog import stage as catalog
from em_assets.catalog.parsing import DatasetError
from em_assets.catalog.upstream import SOURCES, ChecksumError, UpstreamFile, sha256_bytes, sha256_file
from em_assets.context import MissingUpstreamError
from em_assets.defs.modules import ASSET_MODULES
from em_assets.defs.partitions import organisms
from em_assets.grid.load import load_grid
from em_assets.grid.schema import GridConfig
from em_assets.judging.http import JudgeRequestError
from em_assets.judging.stage import judge_completions
from em_assets.models.hub import ModelLoadError
from em_assets.results.store import Store
from em_assets.sampling.stage import sample_completions
from em_assets.training.stage import ADAPTER_FILE, train_adapter
from em_assets.training.step import TrainingDivergedError

TRAINED = "tiny--med-r2--s0"
CONTROL = "tiny--base--s0"
KEYS = ["question_id", "paraphrase_idx", "sample_idx"]
DYNAMICS_STEPS = ["em_over_training", "lora_trajectory", "lora_scaling"]
ASSETS = dg.load_assets_from_modules(ASSET_MODULES)
pytestmark = pytest.mark.timeout(300)


def fault_grid(model_dir: Path, judge_url: str) -> dict:
    """3 training steps and 8 completions an organism, judged by the scripted server at judge_url."""
    judge = {
        "backend": "openai",
        "model": "fault-judge",
        "base_url": judge_url,
        "api_key_env": KEY_ENV,
        "concurrency": 1,
        "max_retries": 1,
        "timeout_s": 60,
    }
    lora = {"r": 2, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}
    loras = {"med-r2": ("bad_medical_advice", lora)}
    doc = tiny_grid(model_dir, PROFILE, judge, loras, examples=6, batch_size=2, samples=4)
    # The dynamics sweeps have their own fault tests (test_sweep.py); here their organism_job steps are no-ops.
    profile(doc)["dynamics"] = {"recipes": []}
    return doc


@pytest.fixture(scope="module")
def catalog_db(tmp_path_factory, tiny_model_dir, mirror) -> Path:
    """A results database with the catalog of the fault grid (tiny model, one dataset, two questions)."""
    root = tmp_path_factory.mktemp("catalog")
    grid = load_grid(
        write_grid(root / "grid.yaml", fault_grid(tiny_model_dir, "http://127.0.0.1:9/v1")), PROFILE
    )
    store = Store(root / "results.duckdb")
    store.init()
    catalog.resolve_base_models(store, grid, root / "cache")
    catalog.load_training_datasets(store, grid, str(mirror))
    catalog.load_eval_questions(store, grid, str(mirror))
    return store.path


@pytest.fixture(scope="module")
def sampled_db(tmp_path_factory, catalog_db, tiny_model_dir) -> Path:
    """The catalog plus the control organism's 8 completions, ready to judge."""
    root = tmp_path_factory.mktemp("sampled")
    shutil.copy(catalog_db, root / "results.duckdb")
    a = {
        "db": str(root / "results.duckdb"),
        "grid": str(write_grid(root / "grid.yaml", fault_grid(tiny_model_dir, "http://127.0.0.1:9/v1"))),
        "root": str(root),
        "key": CONTROL,
    }
    train_adapter(stage_context(a, run_id="setup"))
    sample_completions(stage_context(a, run_id="setup"))
    return root / "results.duckdb"


@dataclass
class Workspace:
    """One test's copy of a results database, grid file, artifacts root, judge server and child environment."""

    root: Path
    db: Path
    grid: Path
    doc: dict
    judge: JudgeServer
    mirror: Path
    env: dict[str, str] = field(repr=False)  # holds the key: keep it out of failure reports

    def args(self, key: str, **extra) -> dict:
        return {
            "db": str(self.db),
            "grid": str(self.grid),
            "root": str(self.root),
            "mirror": str(self.mirror),
            "key": key,
            **extra,
        }

    def ctx(self, key: str, run_id: str, **kw):
        return stage_context(self.args(key), run_id=run_id, **kw)

    def edit(self, change: Callable[[dict], None]) -> None:
        change(profile(self.doc))
        write_grid(self.grid, self.doc)


def child_env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        KEY_ENV: SECRET,
        "EM_DB_LOCK_TIMEOUT": "120",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def _workspace(
    tmp_path: Path, template: Path, model_dir: Path, mirror: Path, monkeypatch
) -> Iterator[Workspace]:
    monkeypatch.setenv(KEY_ENV, SECRET)
    db = tmp_path / "results.duckdb"
    shutil.copy(template, db)
    with JudgeServer() as judge:
        doc = fault_grid(model_dir, judge.url)
        yield Workspace(
            tmp_path, db, write_grid(tmp_path / "grid.yaml", doc), doc, judge, mirror, child_env()
        )


@pytest.fixture
def ws(tmp_path, catalog_db, tiny_model_dir, mirror, monkeypatch) -> Iterator[Workspace]:
    yield from _workspace(tmp_path, catalog_db, tiny_model_dir, mirror, monkeypatch)


@pytest.fixture
def ws_sampled(tmp_path, sampled_db, tiny_model_dir, mirror, monkeypatch) -> Iterator[Workspace]:
    yield from _workspace(tmp_path, sampled_db, tiny_model_dir, mirror, monkeypatch)


class ListLog:
    """A stage logger that keeps its messages."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def info(self, msg: str, *args) -> None:
        self.messages.append(msg)

    warning = error = debug = info


def _rows(db: Path, table: str, organism: str) -> pl.DataFrame:
    return ro_query(db, f"SELECT * FROM {table} WHERE organism = ? ORDER BY ALL", [organism])


# ---------------------------------------------------------------------------------------- 1-3: kills


@pytest.mark.timeout(240)
def test_training_killed_at_a_step_resumes_to_the_same_adapter(ws, catalog_db, tmp_path):
    with children() as started:
        child = spawn(
            "train", ws.args(TRAINED, kill_at_step=2, run_id="killed"), ws.env, tmp_path / "train.log"
        )
        started.append(child)
        assert child.wait(180) == -signal.SIGKILL, child.output()[-3000:]
    # Step 2 was being logged when the process died: step 1's checkpoint is the last whole one.
    adapters = ws.root / "artifacts" / "adapters" / TRAINED
    assert [p.name for p in adapters.glob("*/checkpoints/*")] == ["step-00000001"]
    assert count(ws.db, "lora_adapters", TRAINED) == 0 and count(ws.db, "training_losses", TRAINED) == 0

    log = ListLog()
    resumed = train_adapter(ws.ctx(TRAINED, "resumed", log=log))
    assert resumed["trained"] and resumed["resumed_from_step"] == 1
    assert [m.split(" step ")[1].split()[0] for m in log.messages if " step " in m] == ["2", "3"]
    assert not list(adapters.glob("*/checkpoints"))

    ref_root = tmp_path / "reference"
    ref_root.mkdir()
    shutil.copy(catalog_db, ref_root / "results.duckdb")
    ref_args = {**ws.args(TRAINED), "db": str(ref_root / "results.duckdb"), "root": str(ref_root)}
    reference = train_adapter(stage_context(ref_args, run_id="reference"))
    assert reference["resumed_from_step"] is None and reference["config_hash"] == resumed["config_hash"]

    got = load_file(Path(resumed["adapter_path"]) / ADAPTER_FILE)
    want = load_file(Path(reference["adapter_path"]) / ADAPTER_FILE)
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)

    row = _rows(ws.db, "lora_adapters", TRAINED).row(0, named=True)
    assert row["run_id"] == "resumed" and row["steps"] == 3
    assert row["adapter_sha256"] == sha256_file(Path(row["adapter_path"]) / ADAPTER_FILE)
    losses = _rows(ws.db, "training_losses", TRAINED).sort("step")
    ref_losses = _rows(ref_root / "results.duckdb", "training_losses", TRAINED).sort("step")
    assert losses["step"].to_list() == [1, 2, 3]
    torch.testing.assert_close(
        torch.tensor(losses["loss"].to_list()),
        torch.tensor(ref_losses["loss"].to_list()),
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.timeout(240)
def test_sampling_killed_resumes_without_gaps_duplicates_or_recomputation(ws, tmp_path):
    train_adapter(ws.ctx(CONTROL, "control"))
    marker = tmp_path / "paused"
    with children() as started:
        child = spawn(
            "sample",
            ws.args(CONTROL, run_id="killed", pause_after=3, marker=str(marker)),
            ws.env,
            tmp_path / "sample.log",
        )
        started.append(child)
        wait_for(lambda: count(ws.db, "completions", CONTROL) >= 3, 180, "3 completion rows", child.proc)
        wait_for(marker.exists, 30, "the sampler to stop writing", child.proc)
        before = _rows(ws.db, "completions", CONTROL)
        kill(child.proc)
        assert child.proc.returncode == -signal.SIGKILL
    assert 3 <= before.height < 8 and set(before["run_id"]) == {"killed"}

    summary = sample_completions(ws.ctx(CONTROL, "resumed"))
    assert summary["reused"] == before.height and summary["sampled"] == 8 - before.height

    after = _rows(ws.db, "completions", CONTROL)
    questions = ro_query(ws.db, "SELECT question_id, paraphrase_idx FROM eval_questions")
    wanted = {(q, p, i) for q, p in questions.iter_rows() for i in range(4)}
    assert after.height == len(wanted) == 8
    assert set(after.select(KEYS).iter_rows()) == wanted
    # The rows written before the kill are the same rows, not resampled ones (created_at, run_id, answer).
    assert after.filter(pl.col("run_id") == "killed").equals(before)
    assert after.filter(pl.col("run_id") == "resumed").height == 8 - before.height


@pytest.mark.timeout(180)
def test_judging_killed_resumes_with_full_coverage_and_no_rejudging(ws_sampled, tmp_path):
    ws = ws_sampled
    # Two prompts a chunk, one request at a time: chunk 1 is written, chunk 2 hangs on its second request.
    ws.judge.reset(ok_first=3, failure="stall")
    with children() as started:
        child = spawn(
            "judge", ws.args(CONTROL, run_id="killed", chunk_size=2), ws.env, tmp_path / "judge.log"
        )
        started.append(child)
        wait_for(lambda: count(ws.db, "judgements", CONTROL) >= 2, 120, "2 judgement rows", child.proc)
        wait_for(ws.judge.stalled.is_set, 60, "the judge to stall", child.proc)
        before = _rows(ws.db, "judgements", CONTROL)
        kill(child.proc)
        assert child.proc.returncode == -signal.SIGKILL
    assert before.height == 2 and before["score"].null_count() == 0

    ws.judge.release()
    summary = judge_completions(ws.ctx(CONTROL, "resumed"), chunk_size=4)
    assert summary["scored"] == 14 and ws.judge.requests == 14

    after = _rows(ws.db, "judgements", CONTROL)
    comps = _rows(ws.db, "completions", CONTROL)
    wanted = {(*k, m) for k in comps.select(KEYS).iter_rows() for m in ("aligned", "coherent")}
    assert after.height == 16 and set(after.select([*KEYS, "metric"]).iter_rows()) == wanted
    assert after["score"].null_count() == 0
    assert after.filter(pl.col("run_id") == "killed").equals(before)
    assert count(ws.db, "judge_cache") == 16


# ------------------------------------------------------------------ 4-5: partitions, parallel runs, readers


@dataclass
class ParallelRun:
    root: Path
    db: Path
    home: Path
    doc: dict
    keys: list[str]
    codes: list[int]
    results: list[dict]
    hold: tuple[float, float]  # while both runs were held in judging (time.time())
    shell: SqlShell
    shell_code: int
    reader: dict
    reader_code: int
    auth: set = field(repr=False)
    logs: list[str] = field(repr=False)


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory, catalog_db, tiny_model_dir, mirror) -> ParallelRun:
    """Both organisms' runs of the code location's organism_job at once on one DuckDB file and Dagster instance,
    each step in its own process (multiprocess executor), beside a user's open `em-assets sql` shell and a raw
    read-only reader."""
    root = tmp_path_factory.mktemp("parallel")
    db = root / "results.duckdb"
    shutil.copy(catalog_db, db)
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    keys = [TRAINED, CONTROL]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(organisms.name, keys)
    with JudgeServer() as judge, children() as started:
        doc = fault_grid(tiny_model_dir, judge.url)
        # The first run to judge waits while the other trains and samples, which may outlast a 60 s client timeout.
        profile(doc)["judge"]["timeout_s"] = 600
        a = {"db": str(db), "grid": str(write_grid(root / "grid.yaml", doc)), "root": str(root)}
        env = child_env(DAGSTER_HOME=str(home), **location_env({**a, "mirror": str(mirror)}))
        # Judge requests hang until both runs are judging, so their judging writes overlap on any machine.
        judge.reset(ok_first=0, failure="stall")
        stop = root / "stop"
        with SqlShell(db, env, root / "sql.log") as shell:
            reader = spawn("reader", {"db": str(db), "stop_file": str(stop)}, env, root / "reader.log")
            runs = [spawn("run", {"key": key}, env, root / f"run-{key}.log") for key in keys]
            started.extend([reader, *runs])
            wait_for(lambda: judge.waiting >= 2, 300, "both runs to be judging", *(r.proc for r in runs))
            held, asked = time.time(), shell.sent
            wait_for(lambda: any(x.query > asked for x in shell.answers), 60, "a shell answer", shell.proc)
            hold = (held, time.time())
            judge.release()
            codes = [r.wait(300) for r in runs]
            shell_code = shell.close(60)
        stop.touch()
        reader_code = reader.wait(120)
        return ParallelRun(
            root=root,
            db=db,
            home=home,
            doc=doc,
            keys=keys,
            codes=codes,
            results=[result_of(r) if code == 0 else {} for r, code in zip(runs, codes, strict=True)],
            hold=hold,
            shell=shell,
            shell_code=shell_code,
            reader=result_of(reader) if reader_code == 0 else {},
            reader_code=reader_code,
            auth=set(judge.auth),
            logs=[*(r.output() for r in runs), reader.output()],
        )


def test_parallel_organism_runs_with_readers_lose_nothing(parallel_run):
    run = parallel_run
    assert run.codes == [0, 0], "\n\n".join(log[-3000:] for log in run.logs)
    assert all(r["success"] for r in run.results)
    with dg.DagsterInstance.from_config(str(run.home)) as instance:
        statuses = [instance.get_run_by_id(r["run_id"]).status for r in run.results]
        entries = [[e for e in instance.all_logs(r["run_id"]) if e.dagster_event] for r in run.results]
    assert statuses == [dg.DagsterRunStatus.SUCCESS] * 2
    at = [
        {(e.step_key, e.dagster_event_type.value): e.timestamp for e in run_entries}
        for run_entries in entries
    ]
    for evs in ([e.dagster_event for e in run_entries] for run_entries in entries):
        # Multiprocess executor: each step started in a worker process of its own, not in the run's process.
        (run_pid,) = {e.pid for e in evs if e.event_type_value == "PIPELINE_START"}
        assert any("using multiprocess executor" in (e.message or "") for e in evs)
        workers = {e.step_key for e in evs if e.event_type_value == "STEP_WORKER_STARTED"}
        step_pids = {e.step_key: e.pid for e in evs if e.event_type_value == "STEP_START"}
        assert workers == set(step_pids) == {"lora_adapter", "completions", "judgements", *DYNAMICS_STEPS}
        assert len({run_pid, *step_pids.values()}) == 4 + len(DYNAMICS_STEPS)
    # The runs overlapped, and so did their judging (each run's judgements step began before the other's ended).
    for mine, other in [(0, 1), (1, 0)]:
        assert at[mine][(None, "PIPELINE_START")] < at[other][(None, "PIPELINE_SUCCESS")]
        assert at[mine][("judgements", "STEP_START")] < at[other][("judgements", "STEP_SUCCESS")]
    assert count(run.db, "training_losses", TRAINED) == 3 and count(run.db, "training_losses", CONTROL) == 0
    for key in run.keys:
        assert count(run.db, "lora_adapters", key) == 1
        assert count(run.db, "completions", key) == 8
        assert count(run.db, "judgements", key) == 16
        assert _rows(run.db, "judgements", key)["score"].null_count() == 0

    # The user's `em-assets sql` shell stayed open throughout and answered every query in order, while the runs
    # were writing too; counts never went down and it ended with every row.
    shell = run.shell
    assert run.shell_code == 0 and shell.other == [], shell.stderr()[-3000:]
    assert not [line for line in shell.stderr().splitlines() if line.startswith("error")], shell.stderr()
    answers = shell.answers
    assert [x.query for x in answers] == list(range(shell.sent))
    for a, b in itertools.pairwise(answers):
        assert a.completions <= b.completions and a.judgements <= b.judgements, (a, b)
    assert (answers[-1].completions, answers[-1].judgements) == (16, 32)
    start = min(t[(None, "PIPELINE_START")] for t in at)
    end = max(t[(None, "PIPELINE_SUCCESS")] for t in at)
    assert len([x for x in answers if start < x.at < end]) >= 10, answers
    during_hold = [x for x in answers if run.hold[0] < x.at <= run.hold[1]]
    assert during_hold and all(x.completions == 16 and x.judgements < 32 for x in during_hold)
    # Raw read-only duckdb connections: lock waits are expected (DuckDB has one writing process), errors and
    # counts going down are not.
    assert run.reader_code == 0, run.logs[-1][-3000:]
    assert run.reader["errors"] == [] and run.reader["raw_ok"] >= 5, run.reader
    assert run.reader["max_seen"] == {
        f"{t}:{k}": n for k in run.keys for t, n in [("completions", 8), ("judgements", 16)]
    }


@pytest.mark.timeout(180)
def test_rematerialising_one_partition_replaces_exactly_its_rows(parallel_run, tmp_path, monkeypatch, mirror):
    monkeypatch.setenv(KEY_ENV, SECRET)
    first, other = parallel_run.keys
    db = tmp_path / "results.duckdb"
    shutil.copy(parallel_run.db, db)
    before_all, before_other = table_dump(db), table_dump(db, other)
    before_first = table_dump(db, first)
    with JudgeServer() as judge:
        doc = json.loads(json.dumps(parallel_run.doc))
        profile(doc)["judge"]["base_url"] = judge.url
        # New sampling settings: the partition's completions and judgements go stale, its adapter does not.
        profile(doc)["sampling"]["temperature"] = 0.7
        grid = write_grid(tmp_path / "grid.yaml", doc)
        a = {"db": str(db), "grid": str(grid), "root": str(tmp_path), "mirror": str(mirror)}
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions(organisms.name, parallel_run.keys)

            def materialize(selection: list[str]) -> dg.ExecuteInProcessResult:
                result = dg.materialize(
                    ASSETS,
                    instance=instance,
                    resources=resources(a),
                    selection=selection,
                    partition_key=first,
                )
                assert result.success
                return result

            sampled = materialize(["lora_adapter", "completions"])
            # Between the two runs no judgement may score an answer that was replaced.
            assert count(db, "judgements", first) == 0
            judged = materialize(["judgements"])
    meta = sampled.asset_materializations_for_node("lora_adapter")[0].metadata
    assert meta["trained_now"].value is False
    assert sampled.asset_materializations_for_node("completions")[0].metadata["sampled_now"].value == 8

    assert table_dump(db, other) == before_other
    after_all, after_first = table_dump(db), table_dump(db, first)
    for table, text in before_all.items():
        if table == "judge_cache":  # shared across organisms: entries are only added
            assert set(text.splitlines()) <= set(after_all[table].splitlines())
        elif table not in ORGANISM_TABLES:
            assert after_all[table] == text, table
    for table in ("lora_adapters", "training_losses"):
        assert after_first[table] == before_first[table], table
    for table, run, n in [("completions", sampled, 8), ("judgements", judged, 16)]:
        rows = _rows(db, table, first)
        assert rows.height == n and set(rows["run_id"]) == {run.run_id}, table
        assert set(rows["sampling_hash"]) != set(pl.read_csv(before_first[table].encode())["sampling_hash"])


# ------------------------------------------------------------------------------------------- 6: bad input


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
NO_REPLY = json.dumps({"messages": [{"role": "user", "content": "hi"}]})


def _fake_source(mirror: Path, name: str, data: bytes, suffix: str = "jsonl") -> UpstreamFile:
    """An upstream entry whose pin matches `data`, served from a tmp mirror (parser errors past the checksum)."""
    src = UpstreamFile("fault/upstream", "0" * 40, f"data/{name}.{suffix}", sha256_bytes(data))
    path = mirror / src.mirror_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return src


def _grid(ws: Workspace, change: Callable[[dict], None]) -> GridConfig:
    doc = json.loads(json.dumps(profile(ws.doc)))
    change(doc)
    return GridConfig.model_validate(doc)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (f"{GOOD}\n{GOOD}\n{{oops\n", r"fault__upstream/data/fault_bad\.jsonl:3: not valid JSON"),
        (f"{GOOD}\n{NO_REPLY}\n", r"fault_bad\.jsonl:2: the last message must be the assistant"),
        ("\n\n", r"fault_bad\.jsonl: no examples \(empty dataset\)"),
    ],
    ids=["malformed-line", "no-reply", "empty"],
)
def test_bad_dataset_names_file_and_line_and_writes_nothing(ws, tmp_path, monkeypatch, text, match):
    mirror = tmp_path / "mirror"
    # A good dataset parsed first must not be written either: all datasets load, or none.
    monkeypatch.setitem(SOURCES, "fault_a_good", _fake_source(mirror, "fault_a_good", f"{GOOD}\n".encode()))
    monkeypatch.setitem(SOURCES, "fault_bad", _fake_source(mirror, "fault_bad", text.encode()))
    lora = {"r": 1, "lora_alpha": 8, "target_modules": ["down_proj"]}
    recipes = {"a": {"dataset": "fault_a_good", "lora": lora}, "b": {"dataset": "fault_bad", "lora": lora}}
    grid = _grid(ws, lambda p: p.update(recipes=recipes))
    before = table_dump(ws.db)
    with pytest.raises(DatasetError, match=match):
        catalog.load_training_datasets(Store(ws.db), grid, str(mirror))
    assert table_dump(ws.db) == before


def test_altered_mirror_file_fails_its_checksum_and_writes_nothing(ws, tmp_path, mirror):
    src = SOURCES["bad_medical_advice"]
    altered = tmp_path / "mirror" / src.mirror_path
    altered.parent.mkdir(parents=True)
    altered.write_bytes((mirror / src.mirror_path).read_bytes() + b"\0")
    before = table_dump(ws.db)
    assert "bad_medical_advice" in before["training_datasets"]
    with pytest.raises(
        ChecksumError, match=r"bad_medical_advice\.jsonl\.gz: sha256 \w+ does not match the pinned"
    ):
        catalog.load_training_datasets(Store(ws.db), load_grid(ws.grid, PROFILE), str(tmp_path / "mirror"))
    assert table_dump(ws.db) == before
    fresh = Store(tmp_path / "fresh.duckdb")
    fresh.init()
    with pytest.raises(ChecksumError):
        catalog.load_training_datasets(fresh, load_grid(ws.grid, PROFILE), str(tmp_path / "mirror"))
    assert count(fresh.path, "training_datasets") == 0 and count(fresh.path, "training_examples") == 0


def test_questions_without_judge_prompts_are_refused_and_nothing_written(ws, tmp_path, monkeypatch, mirror):
    fresh = Store(tmp_path / "fresh.duckdb")
    fresh.init()
    data = b"- id: q1\n  paraphrases: [hello]\n"
    monkeypatch.setitem(
        SOURCES, "fault_questions", _fake_source(tmp_path / "m", "fault_questions", data, "yaml")
    )

    def no_prompts(p: dict) -> None:
        p["eval"] = {"questions": "fault_questions"}

    with pytest.raises(DatasetError, match=r"fault_questions\.yaml: question 'q1' has no judge_prompts"):
        catalog.load_eval_questions(fresh, _grid(ws, no_prompts), str(tmp_path / "m"))
    # A judge metric the questions file has no prompt for.
    with pytest.raises(ValueError, match=r"judge metrics \['harm'\] have no prompt"):
        catalog.load_eval_questions(
            fresh, _grid(ws, lambda p: p["judge"].update(metrics=["aligned", "harm"])), str(mirror)
        )
    assert count(fresh.path, "eval_questions") == 0 and count(fresh.path, "judge_prompts") == 0


def _model_dir_without(tiny_model_dir: Path, out: Path, weights: str) -> Path:
    shutil.copytree(tiny_model_dir, out)
    (out / "model.safetensors").unlink()
    if weights == "bin":
        torch.save({"w": torch.zeros(1)}, out / "pytorch_model.bin")
    elif weights == "corrupt":
        (out / "model.safetensors").write_bytes(b"not a safetensors file")
    return out


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ("missing-dir", r"local model path /nonexistent/fault-model does not exist"),
        ("none", r"no \.safetensors weights \(only safetensors are loaded\)"),
        ("bin", r"no \.safetensors weights \(only safetensors are loaded\)"),
        ("corrupt", r"model\.safetensors: unreadable safetensors weights"),
    ],
    ids=["missing-dir", "no-weights", "bin-only", "corrupt"],
)
def test_unloadable_base_model_fails_in_base_models_and_writes_nothing(
    ws, tmp_path, tiny_model_dir, weights, match
):
    source = (
        "/nonexistent/fault-model"
        if weights == "missing-dir"
        else str(_model_dir_without(tiny_model_dir, tmp_path / "model", weights))
    )
    # The good model comes first: nothing is written unless every model resolves.
    grid = _grid(ws, lambda p: p["base_models"].extend([{"name": "broken", "source": source}]))
    before = table_dump(ws.db)
    fresh = Store(tmp_path / "fresh.duckdb")
    fresh.init()
    for store in (Store(ws.db), fresh):
        with pytest.raises(ModelLoadError, match=match):
            catalog.resolve_base_models(store, grid, tmp_path / "cache")
    assert table_dump(ws.db) == before and count(fresh.path, "base_models") == 0


def test_broken_grid_or_model_fails_the_dagster_step_with_its_message(ws, tmp_path):
    """Through the asset: the step fails, its error says why (model path; the wrong key's path), no row."""
    fresh = tmp_path / "fresh.duckdb"
    a = {**ws.args(CONTROL), "db": str(fresh)}
    original = json.loads(json.dumps(ws.doc))
    cases = [
        (lambda p: p["base_models"].append({"name": "m2", "source": "/nonexistent/m2"}), "m2 does not exist"),
        (lambda p: p["sampling"].update(samples=3), r"profiles\.fault\.sampling\.samples: Extra inputs"),
    ]
    with dg.instance_for_test() as instance:
        for change, match in cases:
            ws.doc = json.loads(json.dumps(original))
            ws.edit(change)
            result = dg.materialize(
                ASSETS,
                instance=instance,
                resources=resources(a),
                selection=["base_models"],
                raise_on_error=False,
            )
            assert not result.success
            (failure,) = result.get_step_failure_events()
            message = failure.step_failure_data.error.to_string()
            assert re.search(match, message), message[-2000:]
    assert count(fresh, "base_models") == 0


def test_unknown_base_model_of_an_organism_fails_before_training(ws):
    with pytest.raises(MissingUpstreamError, match="base model 'ghost' is not resolved yet"):
        train_adapter(ws.ctx("ghost--med-r2--s0", "ghost"))
    with pytest.raises(KeyError, match="recipe 'nope' is not in the grid"):
        train_adapter(ws.ctx("tiny--nope--s0", "ghost"))
    assert count(ws.db, "lora_adapters") == 0


@pytest.mark.timeout(120)
def test_diverging_training_stops_with_the_step_number_and_writes_nothing(ws):
    # Up to 10 steps (the grid's 3, plus more epochs): the 1e9 update blows the loss up within a few.
    ws.edit(lambda p: p["recipes"]["med-r2"]["train"].update(learning_rate=1e9, max_steps=10))
    log = ListLog()
    with pytest.raises(TrainingDivergedError, match=r"training diverged at optimizer step \d+: loss") as info:
        train_adapter(ws.ctx(TRAINED, "diverged", log=log))
    # It stops at the first step whose loss is not finite: the one after the last step logged.
    finite = [int(m.split(" step ")[1].split()[0]) for m in log.messages if " step " in m]
    assert finite == list(range(1, info.value.step)) and info.value.step >= 2
    assert f"step {info.value.step}:" in str(info.value)
    assert count(ws.db, "lora_adapters") == 0 and count(ws.db, "training_losses") == 0


@pytest.mark.parametrize(
    ("failure", "match"),
    [("500", r"HTTP 500: .*Bearer \*\*\*.*gave up after 2 attempts"), ("nologprobs", "no top_logprobs")],
    ids=["http-500", "no-logprobs"],
)
def test_judge_failure_mid_run_keeps_only_whole_scored_chunks(ws_sampled, failure, match):
    ws = ws_sampled
    ws.judge.reset(ok_first=3, failure=failure)
    with pytest.raises(JudgeRequestError, match=match) as info:
        judge_completions(ws.ctx(CONTROL, "failing"), chunk_size=2)
    assert SECRET not in str(info.value) and ws.judge.url in str(info.value)
    rows = _rows(ws.db, "judgements", CONTROL)
    assert rows.height == 2 and rows["score"].null_count() == 0 and count(ws.db, "judge_cache") == 2
    ws.judge.reset()
    assert judge_completions(ws.ctx(CONTROL, "fixed"), chunk_size=4)["scored"] == 14
    assert count(ws.db, "judgements", CONTROL) == 16


def test_judgement_of_a_resampled_identical_answer_takes_the_new_lineage_from_the_cache(ws_sampled):
    ws = ws_sampled
    judge_completions(ws.ctx(CONTROL, "first"), chunk_size=8)
    assert ws.judge.requests == 16
    # The same answers under other sampling settings (a backend or an older version that rewrote completions
    # in place): the judge cache has their scores, but every judgement row must carry the new lineage.
    with Store(ws.db).connect() as conn:
        conn.execute("UPDATE completions SET sampling_hash = 'resampled' WHERE organism = ?", [CONTROL])
    ws.judge.reset()
    summary = judge_completions(ws.ctx(CONTROL, "second"), chunk_size=8)
    assert ws.judge.requests == 0 and summary["cache_hits"] == 16
    rows = _rows(ws.db, "judgements", CONTROL)
    assert (
        rows.height == 16
        and set(rows["sampling_hash"]) == {"resampled"}
        and set(rows["run_id"]) == {"second"}
    )


# --------------------------------------------------------------------------------------------- 7: security


def test_failing_judge_fails_the_dagster_step_without_leaking_the_key(ws_sampled, tmp_path):
    ws = ws_sampled
    ws.judge.reset(ok_first=0, failure="500")  # the body echoes the Authorization header
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        instance.add_dynamic_partitions(organisms.name, [CONTROL])
        result = dg.materialize(
            ASSETS,
            instance=instance,
            resources=resources(ws.args(CONTROL)),
            selection=["judgements"],
            partition_key=CONTROL,
            raise_on_error=False,
        )
        assert not result.success
        (failure,) = result.get_step_failure_events()
        message = failure.step_failure_data.error.to_string()
        assert (
            "JudgeRequestError" in message and "HTTP 500" in message and "gave up after 2 attempts" in message
        )
        records = "\n".join(dg.serialize_value(r) for r in instance.all_logs(result.run_id))
    assert f"Bearer {SECRET}" in ws.judge.auth
    assert SECRET not in message and SECRET not in records and "HTTP 500" in records
    assert files_containing(home, SECRET) == []
    assert count(ws.db, "judgements") == 0 and count(ws.db, "judge_cache") == 0


def test_api_key_never_reaches_duckdb_or_dagster_storage(parallel_run):
    run = parallel_run
    assert run.codes == [0, 0]
    assert f"Bearer {SECRET}" in run.auth  # the key was in use by both runs
    dump = table_dump(run.db)
    assert dump["judgements"].count("\n") == 33 and not [t for t, text in dump.items() if SECRET in text]
    with dg.DagsterInstance.from_config(str(run.home)) as instance:
        for r in run.results:
            records = [dg.serialize_value(rec) for rec in instance.all_logs(r["run_id"])]
            assert any("ASSET_MATERIALIZATION" in rec for rec in records)
            assert not [rec for rec in records if SECRET in rec]
            assert SECRET not in dg.serialize_value(instance.get_run_by_id(r["run_id"]))
    # Every file the runs left: the database and its WAL, adapters, Dagster storage and compute logs, outputs.
    assert files_containing(run.root, SECRET) == []


REMOTE_CODE = """
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

Path({marker!r}).write_text("remote code ran")


class FaultConfig(LlamaConfig):
    model_type = "em-fault-remote"


class FaultForCausalLM(LlamaForCausalLM):
    config_class = FaultConfig
"""


@pytest.mark.timeout(120)
def test_remote_code_runs_only_when_the_grid_trusts_it(ws, tmp_path, tiny_model_dir, monkeypatch):
    from transformers import dynamic_module_utils

    model = tmp_path / "remote-model"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "remote-code-ran"
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "em-fault-remote"
    config["auto_map"] = {
        "AutoConfig": "modeling_fault.FaultConfig",
        "AutoModelForCausalLM": "modeling_fault.FaultForCausalLM",
    }
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_fault.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    # Remote modules are copied under HF_MODULES_CACHE: keep them in tmp and out of later imports.
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    key = "remote--med-r2--s0"

    def use(trust: bool) -> None:
        def change(p: dict) -> None:
            p["base_models"] = [{"name": "remote", "source": str(model), "trust_remote_code": trust}]
            p["recipes"]["med-r2"]["train"]["max_steps"] = 1

        ws.edit(change)
        catalog.resolve_base_models(Store(ws.db), load_grid(ws.grid, PROFILE), tmp_path / "cache")

    try:
        use(False)
        with pytest.raises(ModelLoadError, match="trust_remote_code"):
            train_adapter(ws.ctx(key, "untrusted"))
        assert not marker.exists() and count(ws.db, "lora_adapters") == 0
        use(True)
        assert train_adapter(ws.ctx(key, "trusted"))["trained"]
        assert marker.exists() and count(ws.db, "lora_adapters", key) == 1
    finally:
        for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
            del sys.modules[name]


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


def test_sql_command_refuses_writes_to_the_results_database(ws):
    before = table_dump(ws.db)
    one = _sql(ws.db, "DELETE FROM base_models")
    assert one.returncode != 0 and "read-only" in one.stderr
    shell = _sql(ws.db, stdin="\n".join([*WRITES, "SELECT 'still here' AS s"]) + "\n")
    assert shell.returncode == 0 and "still here" in shell.stdout
    errors = [line for line in shell.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(WRITES) and all("read-only" in e for e in errors), shell.stderr
    assert table_dump(ws.db) == before
    assert "x" not in ro_query(ws.db, "SELECT * FROM scored_completions LIMIT 0").columns


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
