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
from em_assets.cli.tables import MARKDOWN, interval_column
from em_assets.settings import DAGSTER_HOME_ENV, LOGS_ENV, Settings, SettingsError, settings

if TYPE_CHECKING:
    from dagster import DagsterInstance


def _check_grid(current: Settings, organism_keys: list[str] | None) -> None:
    """The grid, its organisms' sources, that its base models can be resolved now (the catalog resolves every
    one), that its sampling backend can run here, that an API judge's server takes its key, and the organisms
    asked for (each must be one of the grid's)."""
    from em_assets.cli.organisms import checked_grid
    from em_assets.grid.load import GridError
    from em_assets.judging.judges import make_judge
    from em_assets.models.hub import unresolvable
    from em_assets.sampling.stage import vllm_unusable

    grid = checked_grid(current)
    if not current.calibration_path.is_file():
        # Read by the judge_sanity check, mid-run; relative, as every default path, to the working directory.
        raise SettingsError(
            f"{current.calibration_path} (the judge's calibration set) is not in the working directory "
            f"{Path.cwd()}: run em-assets from the repository root"
        )
    for i, base in enumerate(grid.base_models):
        why = unresolvable(base.source, base.revision)
        if why:
            raise GridError(f"base_models[{i}] ({base.name}): {why}")
    if grid.sampling.backend == "vllm" and (why := vllm_unusable(current.device)):
        raise GridError(f"sampling.backend: {why}")
    for spec in [grid.judge, *grid.agreement.compare]:
        if spec.backend == "openai":
            make_judge(grid, None, spec=spec).check_server()
    known = [o.key for o in grid.organisms()]
    unknown = [k for k in organism_keys or [] if k not in known]
    if unknown:
        raise GridError(
            f"organism {unknown[0]!r} is not in profile {current.profile!r}; its organisms: {known}"
        )


def _log_traceback(log_path: Path) -> None:
    with log_path.open("a", encoding="utf-8", errors="backslashreplace") as log:
        traceback.print_exc(file=log)


def local_instance():
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


def _run_job(instance: DagsterInstance, job_name: str, key: str | None, console: TextIO, width: int) -> None:
    from em_assets.cli.progress import ProgressConsole
    from em_assets.definitions import defs
    from em_assets.defs.recovery import recover, wait_for_pools

    say = _say(console)
    recover(instance, say)
    if job_name == "organism_job":
        # Dagster's in-process executor polls a blocked pool slot in a busy loop: wait here, asleep, instead.
        wait_for_pools(instance, say=say)
    run_id = str(uuid.uuid4())
    progress = ProgressConsole(console, _run_name(job_name, key), width)
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
    instance = local_instance()
    known = set(instance.get_dynamic_partitions(organisms.name))
    instance.add_dynamic_partitions(organisms.name, [k for k in keys if k not in known])
    runs = [("catalog_job", None)] + [("organism_job", k) for k in keys] + [("reports_job", None)]
    # One column wide enough for every run's name keeps the console's lines aligned.
    width = max(len(_run_name(job_name, key)) for job_name, key in runs)
    for job_name, key in runs:
        _run_job(instance, job_name, key, console, width)


def _run_name(job_name: str, key: str | None) -> str:
    """A run's name on the console: its organism, or its job's."""
    return key or job_name.removesuffix("_job")


def _stop_on_sigterm() -> None:
    """SIGTERM (timeout, systemd, SLURM, Kubernetes) stops a run as Ctrl-C does: run failed, slots freed."""

    signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))


def _where_next(figures_dir: Path) -> list[str]:
    report = figures_dir / "answers.html"
    return [
        f"Next: make dev (the UI on http://127.0.0.1:3000); figures in {figures_dir}/; answers browser "
        f"{report}" + ("" if report.exists() else " (not built)"),
        '  em-assets sql "SELECT organism, judge_source, em_rate_turner, em_rate_corrected FROM em_summary" (also'
        " em_domain_share, persona_mixtures, em_transition, ...)",
    ]


def closing_table(summary: pl.DataFrame) -> pl.DataFrame:
    """One row per organism: the grid judge's EM rate, its correction for the judge's error, and, for imported
    organisms, the rate under the scores their file carried."""
    grid = summary.filter(pl.col("judge_source") == "grid")
    files = summary.filter(pl.col("judge_source") == "file").select(
        "organism", pl.col("em_rate_turner").round(3).alias("em_file")
    )
    return (
        grid.join(files, on="organism", how="left")
        .sort(pl.col("method").is_in(["adapter", "model", "answers"]), "organism")
        .select(
            "organism",
            "method",
            pl.col("kl_regularised").alias("kl"),
            pl.col("n_answers").alias("n"),
            interval_column(pl.col("em_rate_turner"), pl.col("em_turner_lo"), pl.col("em_turner_hi")).alias(
                "em [95% CI]"
            ),
            interval_column(
                pl.col("em_rate_corrected"), pl.col("em_corrected_lo"), pl.col("em_corrected_hi")
            ).alias("em corrected"),
            "em_file",
            pl.col("coherence_rate").round(3).alias("coherent"),
        )
    )


def _legend(summary: pl.DataFrame, profile: str) -> list[str]:
    """What the closing table's columns say, and which judges scored its rows (a file's own scores are kept under
    the name its recipe's file_judge gives them, not always GPT-4o's)."""

    def judges(source: str) -> str:
        return ", ".join(
            sorted(set(summary.filter(pl.col("judge_source") == source)["judge_model"].drop_nulls()))
        )

    lines = [
        f"EM (Turner) under the grid's judge ({judges('grid')}); em corrected: for that judge's measured error "
        "(docs/em-rates.md)."
    ]
    if judges("file"):
        lines.append(f"em_file: under the scores an imported organism's file carried ({judges('file')}).")
    lines.append(
        "control, lora, full: trained here; adapter, model: published weights; answers: imported answers."
    )
    if profile == "demo":
        lines.append(
            "The demo's trained organisms are SmolLM2-135M's (a smoke test, not a finding); the imported answers "
            "are published organisms'."
        )
    return lines


def log_file(command: str) -> Path:
    """A new log file of this command's Dagster runs (one per invocation), made before anything runs: a folder
    that cannot hold it is bad input then (SettingsError), not a traceback after the work."""
    path = settings().logs_dir / f"{command}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as exc:
        raise SettingsError(
            f"the log {path} cannot be written ({exc.strerror}); set {LOGS_ENV} to a folder that can hold it"
        ) from None
    return path


def logged_runs(log_path: Path, work: Callable[[TextIO], None]) -> int | None:
    """Run `work` (Dagster runs writing their lines to the console it is given) with everything else sent to
    `log_path`: None when it succeeded, else 1 after printing the failing step's error in one line."""
    from em_assets.cli.progress import output_to_log

    _stop_on_sigterm()
    try:
        with output_to_log(log_path) as console:
            work(console)
    except BaseException as exc:
        _log_traceback(log_path)
        if not isinstance(exc, Exception) or bad_input_message(exc) is not None:
            raise
        # A failing step: its own error in one line; Dagster's wrapping and the traceback are in the log.
        err = getattr(exc, "user_exception", None) or exc
        print(f"error: {type(err).__name__}: {err}\n(traceback in {log_path})", file=sys.stderr)
        return 1
    return None


def run_reports(console: TextIO) -> None:
    """Rebuild the report tables, figures and answers browser from what the store holds now."""
    _run_job(local_instance(), "reports_job", None, console, len(_run_name("reports_job", None)))


def cmd_demo(args: argparse.Namespace) -> int:
    from em_assets.cli.results import usable_store
    from em_assets.models.machine import describe_machine, machine_line
    from em_assets.results.store import Store

    current = settings()
    # The grid and the store are checked before anything starts, so a typo fails in a second with no run
    # written; a store not there yet is the one the first run creates.
    _check_grid(current, args.organism)
    usable_store(may_create=True)
    log_path = log_file("demo")
    start = time.perf_counter()
    print(f"[em-assets] demo: profile {current.profile}; full log in {log_path}", flush=True)
    # What the run's time depends on, so a slow demo can be told from a slow machine (docs/cpu.md).
    print(f"[em-assets] machine: {machine_line(describe_machine())}", flush=True)
    failed = logged_runs(log_path, lambda console: run_pipeline(console, args.organism or None))
    if failed is not None:
        return failed
    summary = Store().query("SELECT * FROM em_summary")
    with pl.Config(**MARKDOWN, float_precision=3, fmt_str_lengths=48, tbl_width_chars=160):
        print(closing_table(summary))
    print("\n".join(_legend(summary, current.profile)))
    print(f"[em-assets] pipeline finished in {time.perf_counter() - start:.1f}s; full log in {log_path}")
    print("\n".join(_where_next(current.figures_dir)))
    return 0
