"""The child process of the fault tests: `python tests/support/child.py <command> '<json args>'`, so every fault
hits a real process. It prints `RESULT <json>` (the stage's summary) when it finishes.
  train   train_adapter; SIGKILLs itself when the loss of `kill_at_step` is logged (that step's checkpoint is
          not written yet, the previous one is)
  sample  sample_completions; after `pause_after` completion rows are written it stops in place (the parent
          polls the database, then SIGKILLs it)
  judge   judge_completions with a small chunk size (the parent's judge server stalls it mid-run)
  run     dg.execute_job of the code location's organism_job for one partition on the DAGSTER_HOME instance,
          each step in its own process (resources from the environment: organisms.location_env)
  reader  raw read-only duckdb queries in a loop until a stop file appears
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Run as a script (and re-imported by path in Dagster's step processes): the helpers are in tests/support/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb
import polars as pl

from em_assets.results.store import Store
from support.organisms import stage_context

if TYPE_CHECKING:
    import dagster as dg


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


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
