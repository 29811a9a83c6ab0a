"""Helpers for tests/test_faults.py: a scripted OpenAI-compatible judge on 127.0.0.1, read-only polling of the
results database, a user's open `em-assets sql` shell, and the child processes the tests kill or run side by side.

Children run as `python tests/fault_support.py <command> '<json args>'`, so every fault hits a real process:
  train   train_adapter; SIGKILLs itself when the loss of `kill_at_step` is logged (that step's checkpoint is
          not written yet, the previous one is)
  sample  sample_completions; after `pause_after` completion rows are written it stops in place (the parent
          polls the database, then SIGKILLs it)
  judge   judge_completions with a small chunk size (the parent's judge server stalls it mid-run)
  run     dg.execute_job of the code location's organism_job for one partition on the DAGSTER_HOME instance,
          each step in its own process (resources from the environment: location_env)
  reader  raw read-only duckdb queries in a loop until a stop file appears
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl
import yaml

from em_assets.results.store import Store
from em_assets.settings import DB_ENV, GRID_ENV, MIRROR_ENV, PROFILE_ENV

if TYPE_CHECKING:
    import dagster as dg

PROFILE = "fault"
KEY_ENV = "EM_FAULT_JUDGE_KEY"
SECRET = "sk-fault-Xq93-do-not-leak-7731"
ORGANISM_TABLES = ["lora_adapters", "training_losses", "completions", "judgements"]
EM_ASSETS = str(Path(sys.executable).with_name("em-assets"))


# ------------------------------------------------------------------------------------------ grid documents


def profile(doc: dict) -> dict:
    return doc["profiles"][PROFILE]


def write_grid(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------ judge server


def _chat_reply(prompt: str) -> bytes:
    """A one-token chat completion whose top logprobs put 0.7 / 0.3 on two numbers derived from the prompt."""
    n = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 101
    top = {str(n): math.log(0.7), str((n + 37) % 101): math.log(0.3)}
    entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top.items()]
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": str(n)},
        "logprobs": {"content": [{"token": str(n), "logprob": top[str(n)], "top_logprobs": entries}]},
        "finish_reason": "length",
    }
    return json.dumps({"object": "chat.completion", "choices": [choice]}).encode()


@dataclass
class JudgeServer:
    """A real OpenAI-compatible /chat/completions server on 127.0.0.1 with scripted faults.

    `ok_first` requests are answered normally, then `failure` applies: "500" (the body echoes the caller's
    Authorization header, as some servers echo a rejected key), "nologprobs", or "stall" (the request hangs
    until `release()`, at most 60 s; `stalled` is set when the first one hangs, `waiting` counts those hanging).
    """

    ok_first: int | None = None
    failure: str | None = None
    requests: int = 0
    waiting: int = 0
    auth: set[str | None] = field(default_factory=set, repr=False)  # holds the key: keep it out of reports
    stalled: threading.Event = field(default_factory=threading.Event)
    _release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def reset(self, ok_first: int | None = None, failure: str | None = None) -> None:
        with self._lock:
            self.ok_first, self.failure, self.requests = ok_first, failure, 0
            self.stalled.clear()
            self._release.clear()

    def release(self) -> None:
        self.reset()
        self._release.set()

    def _respond(self, body: dict, auth: str | None) -> tuple[int, bytes]:
        with self._lock:
            self.requests += 1
            n = self.requests
            self.auth.add(auth)
            failing = self.failure is not None and (self.ok_first is None or n > self.ok_first)
            failure = self.failure
        if failing and failure == "stall":
            with self._lock:
                self.waiting += 1
            self.stalled.set()
            self._release.wait(60)
            with self._lock:
                self.waiting -= 1
            return 200, _chat_reply(body["messages"][0]["content"])
        if failing and failure == "500":
            return 500, json.dumps({"error": f"backend down; you sent {auth}"}).encode()
        if failing and failure == "nologprobs":
            choice = {"index": 0, "message": {"role": "assistant", "content": "80"}, "logprobs": None}
            return 200, json.dumps({"choices": [choice]}).encode()
        return 200, _chat_reply(body["messages"][0]["content"])

    def __enter__(self) -> JudgeServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload = outer._respond(body, self.headers.get("Authorization"))
                with contextlib.suppress(OSError):
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client killed mid-request is the point of these tests

        self._server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()


# ----------------------------------------------------------------------------------- database inspection


def ro_query(db: Path, sql: str, params: list | None = None) -> pl.DataFrame:
    """A query on a short-lived read-only connection (waits while a writer holds the file)."""
    with Store(db, lock_timeout_s=60).connect(read_only=True) as conn:
        return conn.execute(sql, params or []).pl()


def count(db: Path, table: str, organism: str | None = None) -> int:
    where, params = ("WHERE organism = ?", [organism]) if organism else ("", [])
    return int(ro_query(db, f"SELECT count(*) AS n FROM {table} {where}", params)["n"][0])


def table_dump(db: Path, organism: str | None = None) -> dict[str, str]:
    """Every base table as sorted CSV text (only the organism's rows of organism tables, when given)."""
    tables = ro_query(
        db,
        "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' ORDER BY 1",
    )["table_name"].to_list()
    out = {}
    for table in tables:
        if organism is not None:
            if table not in ORGANISM_TABLES:
                continue
            df = ro_query(db, f"SELECT * FROM {table} WHERE organism = ? ORDER BY ALL", [organism])
        else:
            df = ro_query(db, f"SELECT * FROM {table} ORDER BY ALL")
        out[table] = df.write_csv()
    return out


def files_containing(root: Path, needle: str) -> list[str]:
    """Files under root whose bytes contain needle (sqlite event logs, compute logs, run storage...)."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and needle.encode() in path.read_bytes():
            hits.append(str(path))
    return hits


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, *procs: subprocess.Popen) -> None:
    """Poll until predicate() holds; fails early (with the child's exit code) if one of procs exits first."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"child exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------ child processes


@dataclass
class Child:
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill(self.proc)
            raise AssertionError(f"child timed out after {timeout_s}s:\n{self.output()[-3000:]}") from None


def spawn(command: str, args: dict, env: dict[str, str], log: Path) -> Child:
    """Start a child in its own process group, output to `log` (no pipe to fill up)."""
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, __file__, command, json.dumps(args)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return Child(proc, log)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (the child and anything it started), then reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def stage_context(a: dict, store: Store | None = None, log: Any = None, run_id: str | None = None):
    """The StageContext a child (or the test itself) runs an organism stage with."""
    from em_assets.context import StageContext
    from em_assets.grid.load import load_grid
    from em_assets.grid.schema import Organism

    root = Path(a["root"])
    ctx = StageContext(
        store=store or Store(a["db"], lock_timeout_s=60),
        grid=load_grid(a["grid"], PROFILE),
        organism=Organism.parse(a["key"]),
        run_id=run_id or a.get("run_id", "child"),
        artifacts_dir=root / "artifacts",
        device="cpu",
        cache_dir=root / "cache",
    )
    if log is not None:
        ctx.log = log
    return ctx


def resources(a: dict) -> dict:
    from em_assets.defs.resources import ExperimentResource, ResultsDB

    root = Path(a["root"])
    return {
        "experiment": ExperimentResource(
            grid_path=a["grid"],
            profile=PROFILE,
            data_mirror=a["mirror"],
            cache_dir=str(root / "cache"),
            artifacts_dir=str(root / "artifacts"),
            figures_dir=str(root / "figures"),
            device="cpu",
        ),
        "results": ResultsDB(database=a["db"]),
    }


class _KillAtStep:
    """A stage logger that SIGKILLs its own process when the given training step's loss is logged."""

    def __init__(self, step: int) -> None:
        self.marker = f": step {step} loss "

    def info(self, msg: str, *args: Any) -> None:
        print(msg, flush=True)
        if self.marker in msg:
            os.kill(os.getpid(), signal.SIGKILL)

    warning = error = debug = info


class _PausingStore(Store):
    """Writes for real; after `pause_after` completion rows it stops in place, holding no connection."""

    def __init__(self, path: str, pause_after: int, marker: Path) -> None:
        super().__init__(path, lock_timeout_s=60)
        self.pause_after, self.marker, self.written = pause_after, marker, 0

    def append_rows(self, table: str, df: pl.DataFrame) -> None:
        super().append_rows(table, df)
        if table == "completions":
            self.written += df.height
            if self.written >= self.pause_after:
                self.marker.write_text(str(self.written))
                time.sleep(600)


def location_env(a: dict) -> dict[str, str]:
    """The environment from which the code location (em_assets.definitions) builds the resources of `a`."""
    root = Path(a["root"])
    return {
        DB_ENV: a["db"],
        GRID_ENV: a["grid"],
        PROFILE_ENV: PROFILE,
        MIRROR_ENV: a["mirror"],
        "EM_CACHE_DIR": str(root / "cache"),
        "EM_ARTIFACTS_DIR": str(root / "artifacts"),
        "EM_FIGURES_DIR": str(root / "figures"),
        "EM_DEVICE": "cpu",
    }


def organism_job() -> dg.JobDefinition:
    """The code location's organism_job, as `dagster dev` runs it: the default (multiprocess) executor."""
    from em_assets.definitions import defs

    return defs.resolve_job_def("organism_job")


# Steps fork from a server that imported the code location and the torch stages once per run: spawning each
# step would repeat those imports (seconds each on a small shared CPU).
RUN_CONFIG = {
    "execution": {
        "config": {
            "multiprocess": {
                "start_method": {
                    "forkserver": {
                        "preload_modules": [
                            "em_assets.definitions",
                            "em_assets.training",
                            "em_assets.sampling",
                        ]
                    }
                }
            }
        }
    }
}


@dataclass
class SqlAnswer:
    query: int
    at: float  # time.time(), comparable with Dagster event timestamps
    completions: int
    judgements: int


class SqlShell:
    """A user's open `em-assets sql` shell: a row-count query through its stdin every quarter second, answers
    kept with their arrival times, stderr in `log`."""

    every_s = 0.25

    def __init__(self, db: Path, env: dict[str, str], log: Path) -> None:
        self.db, self.env, self.log = db, env, log
        self.answers: list[SqlAnswer] = []
        self.other: list[str] = []
        self.sent = 0
        self._stop = threading.Event()

    def __enter__(self) -> SqlShell:
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [EM_ASSETS, "sql", "--db", str(self.db), "--format", "csv"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=self.env,
                text=True,
                bufsize=1,
                start_new_session=True,
            )
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._send, self._receive)]
        for thread in self._threads:
            thread.start()
        return self

    def _send(self) -> None:
        assert self.proc.stdin is not None
        while not self._stop.is_set():
            query = (
                f"SELECT {self.sent} AS q, (SELECT count(*) FROM completions) AS c, "
                "(SELECT count(*) FROM judgements) AS j"
            )
            try:
                self.proc.stdin.write(query + "\n")
                self.proc.stdin.flush()
            except OSError:
                return
            self.sent += 1
            self._stop.wait(self.every_s)

    def _receive(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            fields = line.strip().split(",")
            if fields == ["q", "c", "j"]:
                continue
            if len(fields) == 3 and all(f.isdigit() for f in fields):
                q, c, j = map(int, fields)
                self.answers.append(SqlAnswer(q, time.time(), c, j))
            else:
                self.other.append(line)

    def close(self, timeout_s: float) -> int:
        """Stop asking, close stdin (end of the session) and wait for the last answers and the shell's exit."""
        self._stop.set()
        self._threads[0].join()
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        code = self.proc.wait(timeout=timeout_s)
        self._threads[1].join(timeout_s)
        return code

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        kill(self.proc)


def _reader(a: dict) -> dict:
    """Open-query-close raw read-only connections until the stop file exists; counts must never go down."""
    stats: dict[str, Any] = {"raw_ok": 0, "lock_waits": 0, "errors": [], "max_seen": {}}
    stop = Path(a["stop_file"])
    sql = (
        "SELECT 'completions:' || organism AS k, count(*) AS n FROM completions GROUP BY ALL "
        "UNION ALL SELECT 'judgements:' || organism, count(*) FROM judgements GROUP BY ALL"
    )

    def check(rows: list[tuple[str, int]]) -> None:
        for k, n in rows:
            if n < stats["max_seen"].get(k, 0):
                stats["errors"].append(f"{k} went from {stats['max_seen'][k]} to {n} rows")
            stats["max_seen"][k] = max(n, stats["max_seen"].get(k, 0))

    while not stop.exists():
        try:
            conn = duckdb.connect(a["db"], read_only=True)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                stats["errors"].append(f"connect: {exc}")
            stats["lock_waits"] += 1
            time.sleep(0.05)
            continue
        try:
            check(conn.execute(sql).fetchall())
            stats["raw_ok"] += 1
        except duckdb.Error as exc:
            stats["errors"].append(f"query: {exc}")
        finally:
            conn.close()
        time.sleep(0.1)
    return stats


def main(command: str, a: dict) -> None:
    if command in ("train", "sample"):
        import torch

        # The same thread count as the test process, so resumed and reference training reduce alike.
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    if command == "train":
        from em_assets.training.stage import train_adapter

        summary = train_adapter(stage_context(a, log=_KillAtStep(a["kill_at_step"])))
    elif command == "sample":
        from em_assets.sampling.stage import sample_completions

        store = _PausingStore(a["db"], a["pause_after"], Path(a["marker"]))
        summary = sample_completions(stage_context(a, store=store))
    elif command == "judge":
        from em_assets.judging.stage import judge_completions

        summary = judge_completions(stage_context(a), chunk_size=a["chunk_size"])
    elif command == "run":
        import dagster as dg

        with dg.DagsterInstance.get() as instance:
            result = dg.execute_job(
                dg.reconstructable(organism_job),
                instance=instance,
                run_config=RUN_CONFIG,
                tags={"dagster/partition": a["key"]},
            )
        summary = {"run_id": result.run_id, "success": result.success}
    elif command == "reader":
        summary = _reader(a)
    else:
        raise SystemExit(f"unknown command {command}")
    if dataclasses.is_dataclass(summary):
        summary = dataclasses.asdict(summary)
    print("RESULT " + json.dumps(summary, default=str), flush=True)


def result_of(child: Child) -> dict:
    lines = [line for line in child.output().splitlines() if line.startswith("RESULT ")]
    assert lines, f"child printed no result:\n{child.output()[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    """Collects spawned children and kills whatever is still running at the end."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in started:
            kill(child.proc)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
