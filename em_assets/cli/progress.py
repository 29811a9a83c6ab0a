"""The demo's console: one line per run (the catalog, each organism, the reports) with what its steps did and
its time, fed by run events; everything else the run prints (Dagster's event log, library warnings, worker
output) goes to a log file. On a terminal the running step's progress bar is redrawn in place; elsewhere (a pipe,
a CI log) it is written as a line of its own at most every HEARTBEAT_S seconds, so a long step is never silent.

A failed step gets a line of its own, and so do an asset check that did not pass (a run's line counts its
checks) and a step's wait on a results file another process holds, so the console stays short however many
organisms and assets the pipeline grows. Progress comes from step log messages that end a phrase in
`<verb> <done>/<total>` ("sampled 12/40", "judged 16/40", "trained 3/12"): a new asset that logs that way is
counted with no change here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

PROGRESS = re.compile(r"\b([a-z]+) (\d+)/(\d+)\b")
# The store's warning that a step waits on a DuckDB file another process holds (results/backends.py): shown on the
# console, since the wait lasts up to EM_DB_LOCK_TIMEOUT and the console would otherwise look hung.
LOCK_WAIT = " is locked by "


_BAR = 20
HEARTBEAT_S = 60.0
# The widths of a run line's counts and of a failed check's reason (the UI shows all of it).
_COUNTED = 56
_WHY = 110


@dataclass
class StepLine:
    stage: str
    partition: str
    started: float = field(default_factory=time.monotonic)
    verb: str = ""
    done: int = 0
    total: int = 0

    def render(self, status: str, width: int) -> str:
        seconds = time.monotonic() - self.started
        label = f"{status:<6} {self.stage[:28]:<28} {self.partition:<{width}}"
        if not self.total:
            return f"{label} {'':{_BAR + 2}} {'':>16} {seconds:7.1f}s"
        filled = round(_BAR * self.done / self.total)
        bar = "[" + "#" * filled + "." * (_BAR - filled) + "]"
        return f"{label} {bar} {f'{self.verb} {self.done}/{self.total}':>16} {seconds:7.1f}s"


class ProgressConsole:
    """Turns one run's events into one closing line (and a line per failed step); the running step is redrawn
    in place on a terminal."""

    def __init__(self, out: TextIO, partition: str = "", width: int = 34) -> None:
        self.out, self.partition, self.width = out, partition, width
        self.tty = out.isatty()
        self.lines: dict[str, StepLine] = {}
        self.failed: list[str] = []
        self.done: list[str] = []
        self.counts: dict[str, int] = {}
        self.checks: list[tuple[bool, str]] = []
        self.started: float | None = None
        self.last_written = time.monotonic()

    def __call__(self, entry: Any) -> None:
        """An event-log listener (`DagsterInstance.add_event_listener`)."""
        step = entry.step_key
        if not step:
            return
        event = entry.dagster_event
        kind = event.event_type_value if event is not None else None
        if kind == "ASSET_CHECK_EVALUATION":
            self.checks.append(self._check_line(event.event_specific_data))
        elif kind == "STEP_START":
            self.started = self.started or time.monotonic()
            self.lines[step] = StepLine(step, self.partition)
            self._draw(step, "..")
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE", "STEP_SKIPPED") and step in self.lines:
            line = self.lines.pop(step)
            if kind == "STEP_FAILURE":
                self.failed.append(step)
                self._write(line.render("FAILED", self.width), final=True)
                return
            self.done.append(step)
            self._count(line)
            self._write("", final=False)
        elif event is None and step in self.lines and LOCK_WAIT in (entry.user_message or ""):
            self._write(
                f"{'wait':<6} {self.partition:<{self.width}} {step}: {entry.user_message}", final=True
            )
        elif event is None and step in self.lines:
            matches = PROGRESS.findall(entry.user_message or "")
            if matches:
                line = self.lines[step]
                verb, done, total = matches[-1]
                if line.total and (verb != line.verb or int(done) < line.done):
                    # A step's next phase (judge agreement's held-out files, then its hand-rated answers).
                    self._count(line)
                line.verb, line.done, line.total = verb, int(done), int(total)
                self._draw(step, "..")

    def _check_line(self, evaluation: Any) -> tuple[bool, str]:
        """(passed, the line a failed check gets: its severity, name and why, from its description or result)."""
        status = "warn" if getattr(evaluation.severity, "value", "") == "WARN" else "FAILED"
        result = evaluation.metadata.get("result")
        why = evaluation.description or getattr(result, "value", None)
        text = f"{status:<6} {self.partition:<{self.width}} check {evaluation.check_name}"
        return evaluation.passed, text + (f": {why}"[:_WHY] if why else "")

    def _count(self, line: StepLine) -> None:
        if line.total:
            self.counts[line.verb] = self.counts.get(line.verb, 0) + line.done

    def finish(self) -> None:
        """The run's line: its steps done, what they counted (e.g. "sampled 24, judged 96"), its checks passed and
        its time; then a line for each check that did not pass."""
        if not self.done:
            return
        n = len(self.done)
        steps = f"{n} step" + ("s" if n > 1 else "")
        counted = [f"{verb} {count}" for verb, count in self.counts.items()]
        if self.checks:
            counted.append(f"checks {sum(passed for passed, _ in self.checks)}/{len(self.checks)}")
        seconds = time.monotonic() - (self.started or time.monotonic())
        label = f"{'ok':<6} {self.partition:<{self.width}} {steps:<9}"
        self._write(f"{label} {', '.join(counted)[:_COUNTED]:<{_COUNTED}} {seconds:7.1f}s", final=True)
        for passed, line in self.checks:
            if not passed:
                self._write(line, final=True)
        self.done, self.counts, self.checks, self.started = [], {}, [], None

    def _draw(self, step: str, status: str) -> None:
        beat = not self.tty and time.monotonic() - self.last_written >= HEARTBEAT_S
        self._write(self.lines[step].render(status, self.width), final=beat)

    def _write(self, text: str, final: bool) -> None:
        if self.tty:
            self.out.write("\r\x1b[K" + text + ("\n" if final else ""))
        elif final:
            self.out.write(text + "\n")
        if final:
            self.last_written = time.monotonic()
        self.out.flush()


@contextlib.contextmanager
def output_to_log(log_path: Path) -> Iterator[TextIO]:
    """Send this process's stdout and stderr, and its children's, to `log_path`; yields the real stdout."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    streams = sys.stdout, sys.stderr
    # The console writes as stdout does (cli.encodable_stdout); the log is UTF-8 whatever the locale.
    console = os.fdopen(
        os.dup(saved[1]), "w", buffering=1, encoding=sys.stdout.encoding, errors=sys.stdout.errors
    )
    log = log_path.open("a", buffering=1, encoding="utf-8", errors="backslashreplace")
    # File descriptors for child processes and C code, sys.stdout/stderr for Python writers that hold their own.
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    try:
        yield console
    finally:
        log.flush()
        sys.stdout, sys.stderr = streams
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        log.close()
        console.close()


@contextlib.contextmanager
def logged_to_stderr() -> Iterator[None]:
    """Show what em_assets logs at INFO and above ("judge agreement: scored 64/5600 judgements ...") on stderr for
    the block, so a long command outside Dagster shows its progress and stdout keeps only its result."""
    logger = logging.getLogger("em_assets")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[em-assets] %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
