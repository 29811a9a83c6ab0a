"""A user's open `em-assets sql` shell beside running writers."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from support.children import kill
from support.paths import EM_ASSETS


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
