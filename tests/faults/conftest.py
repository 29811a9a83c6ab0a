"""The parallel run the parallel-run and secrets tests inspect: built once a session (it takes minutes)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pytest
from support.children import children, result_of, spawn, wait_for
from support.judge_server import FaultJudge
from support.organisms import CONTROL, TRAINED, child_env, fault_grid, location_env, profile, write_grid
from support.sql_shell import SqlShell

from em_assets.defs.partitions import organisms


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


@pytest.fixture(scope="session")
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
    with FaultJudge() as judge, children() as started:
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
