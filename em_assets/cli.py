"""`em-assets` command line: run the demo, query results read-only, add a base model to the grid.

Exit status: 0 done; 2 bad input (arguments, grid, model sources, missing files), with one message and nothing
written; 1 a SQL statement the database rejected, or an unexpected failure (traceback in the demo's log);
130 when interrupted (Ctrl-C, or SIGTERM, which stops a run the same way).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import polars as pl

from em_assets.settings import DAGSTER_HOME_ENV, Settings, settings

if TYPE_CHECKING:
    from dagster import DagsterInstance

# Spinning OpenMP threads starve each other on small shared CPUs; set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _bad_input_message(exc: BaseException) -> str | None:
    """The message of a bad-input error anywhere in the chain (Dagster wraps errors raised inside steps)."""
    from em_assets.catalog.parsing import DatasetError
    from em_assets.catalog.upstream import ChecksumError
    from em_assets.grid.load import GridError

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        # ModelLoadError by name: importing its module loads torch, too slow for every error path.
        if isinstance(err, GridError | DatasetError | ChecksumError) or (
            type(err).__name__ == "ModelLoadError"
        ):
            return str(err)
        todo += [err.__cause__, err.__context__, getattr(err, "user_exception", None)]
    return None


def _check_grid(current: Settings) -> None:
    from em_assets.grid.load import load_grid

    load_grid(current.grid_path, current.profile)


def _log_traceback(log_path: Path) -> None:
    with log_path.open("a") as log:
        traceback.print_exc(file=log)


def _instance():
    """The persistent local instance (DAGSTER_HOME, default .dagster_home), so runs show in the UI."""
    from dagster import DagsterInstance

    home = settings().dagster_home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ[DAGSTER_HOME_ENV] = str(home)
    shipped = Path("dagster.yaml")
    if shipped.exists() and not (home / "dagster.yaml").exists():
        shutil.copy(shipped, home / "dagster.yaml")
    return DagsterInstance.get()


def _say(console: TextIO) -> Callable[[str], None]:
    def say(message: str) -> None:
        console.write(f"[em-assets] {message}\n")
        console.flush()

    return say


def _fail_if_still_active(instance: DagsterInstance, run_id: str, reason: str) -> None:
    """An interrupted run of this process: failed with the reason and its slots freed, whatever Dagster did."""
    from dagster import DagsterRunStatus

    run = instance.get_run_by_id(run_id)
    if run is not None and run.status in (DagsterRunStatus.STARTED, DagsterRunStatus.STARTING):
        instance.report_run_failed(run, message=reason)
    instance.event_log_storage.free_concurrency_slots_for_run(run_id)


def _run_job(instance: DagsterInstance, job_name: str, key: str | None, console: TextIO) -> None:
    from em_assets.definitions import defs
    from em_assets.defs.recovery import recover, wait_for_pools
    from em_assets.progress import ProgressConsole

    say = _say(console)
    recover(instance, say)
    if job_name == "organism_job":
        # Dagster's in-process executor polls a blocked pool slot in a busy loop: wait here, asleep, instead.
        wait_for_pools(instance, say=say)
    run_id = str(uuid.uuid4())
    progress = ProgressConsole(console, key or "")
    instance.add_event_listener(run_id, progress)
    try:
        defs.resolve_job_def(job_name).execute_in_process(instance=instance, partition_key=key, run_id=run_id)
    except BaseException as exc:
        _fail_if_still_active(instance, run_id, f"em-assets demo stopped: {type(exc).__name__}: {exc}")
        raise
    finally:
        progress.finish()


def run_pipeline(console: TextIO, organism_keys: list[str] | None = None) -> None:
    """Materialise the catalog, every organism partition of the grid, then the reports."""
    from em_assets.defs.partitions import organisms
    from em_assets.defs.resources import ExperimentResource

    keys = organism_keys or [o.key for o in ExperimentResource.from_env().grid().organisms()]
    instance = _instance()
    known = set(instance.get_dynamic_partitions(organisms.name))
    instance.add_dynamic_partitions(organisms.name, [k for k in keys if k not in known])
    runs = [("catalog_job", None)] + [("organism_job", k) for k in keys] + [("reports_job", None)]
    for job_name, key in runs:
        _run_job(instance, job_name, key, console)


def _stop_on_sigterm() -> None:
    """SIGTERM (timeout, systemd, SLURM, Kubernetes) stops a run as Ctrl-C does: run failed, slots freed."""

    signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))


def _where_next(figures_dir: Path) -> list[str]:
    report = figures_dir / "answers.html"
    return [
        "Where to look next:",
        "  UI (assets, runs, metadata): make dev, then http://127.0.0.1:3000",
        f"  figures: {figures_dir}/",
        f"  answers browser: {report}" + ("" if report.exists() else " (not built)"),
        '  SQL: em-assets sql "SELECT organism, em_rate_turner, coherence_rate FROM em_summary"',
    ]


def cmd_demo(args: argparse.Namespace) -> int:
    from em_assets.progress import output_to_log
    from em_assets.results.store import Store

    current = settings()
    # The grid is checked before anything starts, so a typo fails in a second with no run written.
    _check_grid(current)
    log_path = current.database.parent / "logs" / f"demo-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.log"
    _stop_on_sigterm()
    start = time.perf_counter()
    print(f"[em-assets] demo: profile {current.profile}; full log in {log_path}", flush=True)
    try:
        with output_to_log(log_path) as console:
            run_pipeline(console, args.organism or None)
    except BaseException as exc:
        _log_traceback(log_path)
        if not isinstance(exc, Exception) or _bad_input_message(exc) is not None:
            raise
        # A failing step: its own error in one line; Dagster's wrapping and the traceback are in the log.
        err = getattr(exc, "user_exception", None) or exc
        print(f"error: {type(err).__name__}: {err}\n(traceback in {log_path})", file=sys.stderr)
        return 1
    config = {
        "tbl_rows": -1,
        "tbl_cols": -1,
        "tbl_hide_dataframe_shape": True,
        "tbl_hide_column_data_types": True,
    }
    with pl.Config(**config, float_precision=3, fmt_str_lengths=40, tbl_width_chars=160):
        summary = Store().query(
            "SELECT organism, n_answers, em_rate_turner AS em_turner, em_turner_lo AS lo, em_turner_hi AS hi, "
            "em_rate_betley AS em_betley, coherence_rate AS coherent, mean_aligned, mean_coherent "
            "FROM em_summary ORDER BY organism"
        )
        print(summary)
    print(f"[em-assets] pipeline finished in {time.perf_counter() - start:.1f}s; full log in {log_path}")
    print("\n".join(_where_next(current.figures_dir)))
    return 0


def _print_frame(df: pl.DataFrame, fmt: str, max_rows: int) -> None:
    if fmt == "csv":
        sys.stdout.write(df.write_csv())
    elif fmt == "json":
        sys.stdout.write(df.write_json() + "\n")
    else:
        with pl.Config(tbl_rows=max_rows, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200):
            print(df)


def cmd_sql(args: argparse.Namespace) -> int:
    """Read-only queries. Each statement opens and closes its own connection, so an open shell never holds the
    database lock that running materialisations need."""
    import duckdb

    from em_assets.results.store import Store

    store = Store(args.db) if args.db else Store()
    if not store.path.exists():
        print(f"no results database at {store.path}", file=sys.stderr)
        return 2
    # Read-only with no file or network access: COPY ... TO and ATTACH cannot write elsewhere either.
    safe = {"enable_external_access": False}
    if args.query:
        try:
            with store.connect(read_only=True, config=safe) as conn:
                _print_frame(conn.execute(args.query).pl(), args.format, args.max_rows)
        except duckdb.Error as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("em-sql> " if interactive else "")
        except EOFError:
            return 0
        if not line.strip():
            continue
        if line.strip().rstrip(";").lower() in {"quit", "exit", ".quit", ".exit"}:
            return 0
        try:
            with store.connect(read_only=True, config=safe) as conn:
                _print_frame(conn.execute(line).pl(), args.format, args.max_rows)
        except duckdb.Error as exc:
            print(f"error: {exc}", file=sys.stderr)


def cmd_add_model(args: argparse.Namespace) -> int:
    from em_assets.grid.edit import add_base_model
    from em_assets.grid.load import GridError
    from em_assets.grid.sources import check_source
    from em_assets.models.hub import EMBEDDED

    try:
        check_source(args.source, sorted(EMBEDDED))
        spec = add_base_model(
            Path(args.grid) if args.grid else settings().grid_path,
            args.profile or settings().profile,
            args.source,
            name=args.name,
            revision=args.revision,
            trust_remote_code=args.trust_remote_code,
        )
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"added base model {spec.name} ({spec.source}); the grid sensor will add its organisms and runs")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="em-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="materialise every asset of the grid profile (EM_PROFILE, default demo)"
    )
    demo.add_argument("--organism", action="append", help="only this organism key (repeatable)")
    demo.set_defaults(func=cmd_demo)
    sql = sub.add_parser("sql", help="run a read-only SQL query on the results database")
    sql.add_argument(
        "query", nargs="?", help="one statement; without it, a shell reading statements from stdin"
    )
    sql.add_argument("--db", help="database file (default: EM_DB or data/results.duckdb)")
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.add_argument("--max-rows", type=int, default=50)
    sql.set_defaults(func=cmd_sql)
    add = sub.add_parser("add-model", help="add a base model (Hugging Face id or local path) to the grid")
    add.add_argument("source")
    add.add_argument("--name", help="grid name (default: derived from the source)")
    add.add_argument("--revision", help="hub commit to pin")
    add.add_argument("--trust-remote-code", action="store_true")
    add.add_argument("--grid", help="grid file (default: EM_GRID or data/grid.yaml)")
    add.add_argument("--profile", help="profile (default: EM_PROFILE or demo)")
    add.set_defaults(func=cmd_add_model)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BaseException as exc:
        # Dagster turns SIGINT and SIGTERM inside a step into DagsterExecutionInterruptedError.
        if isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "DagsterExecutionInterruptedError":
            print(
                "[em-assets] interrupted: the run is marked failed and its pool slots freed", file=sys.stderr
            )
            return 128 + signal.SIGINT
        message = _bad_input_message(exc) if isinstance(exc, Exception) else None
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
