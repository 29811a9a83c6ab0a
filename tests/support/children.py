"""Child processes the tests kill or run side by side: each a `python tests/support/child.py` in its own
process group, output to a log file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from support.paths import REPO

CHILD_SCRIPT = Path(__file__).with_name("child.py")


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
            [sys.executable, str(CHILD_SCRIPT), command, json.dumps(args)],
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


def train_killed_at_step(ws, key: str, step: int, log: Path) -> None:
    """The training stage of `key` in a child process that SIGKILLs itself as step `step`'s loss is logged."""
    with children() as started:
        child = spawn("train", ws.args(key, kill_at_step=step, run_id="killed"), ws.env, log)
        started.append(child)
        assert child.wait(180) == -signal.SIGKILL, child.output()[-3000:]


def train_uninterrupted(ws, key: str, catalog_db: Path, root: Path):
    """`key` trained from a copy of the catalog in its own root, never stopped: what a resumed run must match."""
    from em_assets.training.stage import train_adapter
    from support.organisms import stage_context

    root.mkdir()
    shutil.copy(catalog_db, root / "results.duckdb")
    args = {**ws.args(key), "db": str(root / "results.duckdb"), "root": str(root)}
    return train_adapter(stage_context(args, run_id="reference"))


def not_utf8_env(**extra: str) -> dict[str, str]:
    """This environment under a locale whose encoding is not UTF-8: the C locale with Python's UTF-8 mode off
    (text read and written as ASCII, as a Latin-1 locale reads and writes Latin-1), which every Linux has."""
    kept = {k: v for k, v in os.environ.items() if k not in {"LANG", "PYTHONIOENCODING"} and k[:3] != "LC_"}
    return {**kept, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONPATH": str(REPO), **extra}


def holding(code: str) -> subprocess.Popen:
    """A `python -c code` child once it has printed `held` (it holds a lock or a session the test needs held)."""
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder
