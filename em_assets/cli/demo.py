"""`em-assets demo`: every asset of the grid profile, one console line per step, the rest to a log."""

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

from em_assets.cli.errors import bad_input_message
from em_assets.settings import DAGSTER_HOME_ENV, Settings, settings

if TYPE_CHECKING:
    from dagster import DagsterInstance


def _check_grid(current: Settings) -> None:
    from em_assets.grid.load import load_grid
    from em_assets.training.imported import check_sources

    check_sources(load_grid(current.grid_path, current.profile))


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
    from em_assets.cli.progress import ProgressConsole
    from em_assets.definitions import defs
    from em_assets.defs.recovery import recover, wait_for_pools

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
        '  SQL: em-assets sql "SELECT organism, method, judge_model, em_rate_turner FROM em_summary"',
        '  where EM answers land: em-assets sql "SELECT organism, judge, domain, n_em, share FROM em_domain_share"',
    ]


def _which_rows(summary: pl.DataFrame) -> list[str]:
    """What the closing table's rows are: organisms trained here, and organisms brought in, by method."""
    methods = set(summary["method"].drop_nulls()) if "method" in summary.columns else set()
    lines = ["Rows:"]
    if methods & {"control", "lora", "full"}:
        lines.append(
            "  control, lora: organisms this run trained and sampled on the demo's base model (a few steps: they "
            "exercise training, sampling and the sweeps; their rates are a smoke test, not a finding)"
        )
    if methods & {"adapter", "model"}:
        lines.append("  adapter, model: published organisms sampled here without training")
    if "answers" in methods:
        lines.append(
            "  answers: published organisms' answers imported from files, one row per judge: the file's own "
            "scores (e.g. 'gpt-4o (file)') beside the grid's judge on the same answers (a seeded sample where "
            "the recipe sets max_answers)"
        )
    if len(lines) > 1:
        lines.append(
            "  em_corrected: the Turner rate corrected for the judge's measured error (the identity for GPT-4o; "
            "null where unmeasured); see docs/em-rates.md"
        )
    return lines if len(lines) > 1 else []


def cmd_demo(args: argparse.Namespace) -> int:
    from em_assets.cli.progress import output_to_log
    from em_assets.results.store import Store

    current = settings()
    # The grid is checked before anything starts, so a typo fails in a second with no run written.
    _check_grid(current)
    log_path = current.logs_dir / f"demo-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.log"
    _stop_on_sigterm()
    start = time.perf_counter()
    print(f"[em-assets] demo: profile {current.profile}; full log in {log_path}", flush=True)
    try:
        with output_to_log(log_path) as console:
            run_pipeline(console, args.organism or None)
    except BaseException as exc:
        _log_traceback(log_path)
        if not isinstance(exc, Exception) or bad_input_message(exc) is not None:
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
            "SELECT organism, method, kl_regularised AS kl, judge_model AS judge, n_answers AS n, "
            "em_rate_turner AS em_turner, em_turner_lo AS lo, em_turner_hi AS hi, em_rate_corrected AS em_corrected, "
            "em_corrected_lo AS c_lo, em_corrected_hi AS c_hi, coherence_rate AS coherent FROM em_summary "
            "ORDER BY method IN ('adapter', 'model', 'answers'), organism, judge_source, judge_model"
        )
        print(summary)
    print("\n".join(_which_rows(summary)))
    print(f"[em-assets] pipeline finished in {time.perf_counter() - start:.1f}s; full log in {log_path}")
    print("\n".join(_where_next(current.figures_dir)))
    return 0
