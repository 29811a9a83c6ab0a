"""Helpers for the browser test: start the Dagster webserver on loopback, query its GraphQL API, find Chromium."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from support.net import free_port
from support.paths import REPO

CHROMIUM = Path("/usr/bin/chromium")
# Flags that work for root in a container without a GPU, a sandbox or the internet.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
# No daemon runs in the test, so runs must launch straight away instead of waiting in the queue; the grid
# sensor and the eager automation conditions stay off, so nothing but the run the test asks for starts.
DAGSTER_YAML = """\
run_coordinator:
  module: dagster._core.run_coordinator
  class: DefaultRunCoordinator
telemetry:
  enabled: false
"""

WORKSPACE_QUERY = """
{ workspaceOrError { __typename ... on PythonError { message }
  ... on Workspace { locationEntries { name loadStatus locationOrLoadError { __typename
      ... on PythonError { message stack }
      ... on RepositoryLocation { repositories { assetNodes { assetKey { path } } } } } } } } }
"""

RUNS_QUERY = """
query Runs($filter: RunsFilter) { runsOrError(filter: $filter) { __typename
  ... on Runs { results { runId status assetSelection { path } } } } }
"""

RUN_QUERY = """
query Run($runId: ID!) { runOrError(runId: $runId) { __typename ... on Run { runId status } } }
"""


RUN_ERRORS_QUERY = """
query RunErrors($runId: ID!) { logsForRun(runId: $runId) { __typename
  ... on EventConnection { events { __typename
    ... on ExecutionStepFailureEvent { stepKey error { message errorChain { error { message } } } }
    ... on RunFailureEvent { message } } } } }
"""


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _bin(name: str) -> str:
    """The console script next to this interpreter (the venv's), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


@dataclass
class DagsterUI:
    url: str
    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str]

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 30) -> dict:
        resp = httpx.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=timeout
        )
        resp.raise_for_status()
        body = resp.json()
        if body.get("errors"):
            raise RuntimeError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def location_entries(self) -> list[dict]:
        ws = self.graphql(WORKSPACE_QUERY)["workspaceOrError"]
        if ws["__typename"] != "Workspace":
            raise RuntimeError(f"workspace failed to load: {ws}")
        return ws["locationEntries"]

    def wait_for_location(self, timeout: float = 120) -> dict:
        """The code location once it finished loading (LOADED), whatever the outcome."""
        deadline = time.monotonic() + timeout
        entries: list[dict] = []
        while time.monotonic() < deadline:
            entries = self.location_entries()
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                assert len(entries) == 1, entries
                return entries[0]
            time.sleep(1)
        raise TimeoutError(f"code location not loaded after {timeout}s: {entries}\n{self.log_tail()}")

    def runs(self) -> list[dict]:
        data = self.graphql(RUNS_QUERY, {"filter": {}})["runsOrError"]
        assert data["__typename"] == "Runs", data
        return data["results"]

    def run_errors(self, run_id: str) -> list[str]:
        """The step and run failure messages of a run, for assertion messages."""
        logs = self.graphql(RUN_ERRORS_QUERY, {"runId": run_id})["logsForRun"]
        out = []
        for e in logs.get("events", []):
            if e["__typename"] == "ExecutionStepFailureEvent":
                error = e.get("error") or {}
                chain = [error.get("message", "")] + [
                    c["error"]["message"] for c in error.get("errorChain", [])
                ]
                out.append(f"{e['stepKey']}: " + " <- ".join(m.strip() for m in chain if m))
            elif e["__typename"] == "RunFailureEvent":
                out.append(e["message"])
        return out

    def wait_for_run(self, run_id: str, timeout: float = 180) -> str:
        """The run's final status; TimeoutError if it is still going after `timeout` seconds."""
        terminal = {"SUCCESS", "FAILURE", "CANCELED"}
        deadline = time.monotonic() + timeout
        status = "?"
        while time.monotonic() < deadline:
            status = self.graphql(RUN_QUERY, {"runId": run_id})["runOrError"]["status"]
            if status in terminal:
                return status
            time.sleep(1)
        raise TimeoutError(f"run {run_id} still {status} after {timeout}s\n{self.log_tail()}")


def _stop(proc: subprocess.Popen, grace: float = 15) -> None:
    """Stop the webserver and everything it started (code server, run workers): its whole process group."""
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers left in the group
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@contextlib.contextmanager
def dagster_webserver(tmp: Path, mirror: Path, ready_timeout: float = 120) -> Iterator[DagsterUI]:
    """`dagster-webserver -w workspace.yaml` on a free loopback port, with all state under `tmp`.

    The webserver alone (no daemon) is the UI of `dagster dev` without the sensor and automation ticks, which
    would otherwise start training runs for the demo grid on their own.
    """
    home = tmp / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "EM_GRID": str(REPO / "data" / "grid.yaml"),
        "EM_PROFILE": "demo",
        "EM_DATA_MIRROR": str(mirror),
        "EM_DB": str(tmp / "results.duckdb"),
        "EM_CACHE_DIR": str(tmp / "cache"),
        "EM_ARTIFACTS_DIR": str(tmp / "artifacts"),
        "EM_FIGURES_DIR": str(tmp / "figures"),
        "DAGSTER_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    port = free_port()
    log_path = tmp / "webserver.log"
    cmd = [_bin("dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    ui = DagsterUI(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, env=env)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"dagster-webserver exited with {proc.returncode}\n{ui.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{ui.url}/server_info", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"dagster-webserver not ready after {ready_timeout}s\n{ui.log_tail()}")
            time.sleep(0.5)
        yield ui
    finally:
        _stop(proc)
