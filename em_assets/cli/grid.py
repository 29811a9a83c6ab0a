"""`em-assets add-model` and `judge-agreement`: growing the grid and checking its judge."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from em_assets.cli.tables import MARKDOWN, interval_column
from em_assets.settings import Settings, settings

if TYPE_CHECKING:
    from em_assets.grid.schema import GridConfig, JudgeSpec
    from em_assets.judging.agreement import MetricAgreement
    from em_assets.judging.agreement_stage import AgreementReport
    from em_assets.results.store import Store


def cmd_add_model(args: argparse.Namespace) -> int:
    from em_assets.grid.edit import add_base_model
    from em_assets.grid.load import GridError, load_grid

    current = settings()
    profile = args.profile or current.profile
    try:
        path = _grid_path(args.grid)
        spec = add_base_model(
            path,
            profile,
            _checked_source(args.source, args.revision),
            name=_not_empty("--name", args.name),
            revision=_not_empty("--revision", args.revision),
            trust_remote_code=args.trust_remote_code,
        )
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The grid sensor reads the file and profile its code location was started with, as this command's settings
    # name them: another --grid or --profile is not the one it watches.
    if (path.resolve(), profile) == (current.grid_path.resolve(), current.profile):
        then = "the grid sensor will add its organisms and runs"
    else:
        then = (
            f"the grid sensor adds its organisms where Dagster runs profile {profile!r} of {path} (EM_PROFILE, "
            f"EM_GRID; here {current.profile!r} of {current.grid_path})"
        )
    # A recipe that names its base models (a full fine-tune that fits only small ones) cannot name the new one.
    listed = [name for name, r in load_grid(path, profile).recipes.items() if r.base_models is not None]
    if listed:
        then += (
            f"; it gets every recipe but {', '.join(listed)}, which list their base_models (add {spec.name} there "
            "to train them on it)"
        )
    print(f"added base model {spec.name} ({spec.source}) to profile {profile!r}; {then}")
    return 0


def _grid_path(given: str | None) -> Path:
    """The grid file --grid names, else the configured one; a missing --grid file is refused here, since
    load_grid's hint to set EM_GRID would not help."""
    from em_assets.grid.load import GridError

    if given is None:
        return settings().grid_path
    if not Path(given).exists():
        raise GridError(f"grid file {given} (given with --grid) not found")
    return Path(given)


def _not_empty(option: str, value: str | None) -> str | None:
    # An empty value would otherwise read as the option left out (a derived name, the hub's main).
    if value is not None and not value.strip():
        from em_assets.grid.load import GridError

        raise GridError(f"{option} is empty; give a value or leave {option} out")
    return value


def _checked_source(source: str, revision: str | None) -> str:
    """The source as the grid is to hold it, refused where the demo's pre-check would refuse it."""
    from em_assets.grid.load import GridError
    from em_assets.grid.sources import check_source
    from em_assets.models.hub import EMBEDDED, unresolvable

    kind = check_source(source, sorted(EMBEDDED))
    if revision is not None and kind != "hub":
        raise GridError(f"--revision pins hub sources only; {source!r} is {_KIND_WORDS[kind]}")
    if kind != "local":
        return source
    # Only the folder is checked: a hub id would need the network, which the demo's pre-check asks instead.
    why = unresolvable(source)
    if why:
        raise GridError(why)
    # A run resolves a relative source against its own working directory (not the grid file's folder), so
    # only an absolute path names this folder wherever the run starts.
    local = Path(source).expanduser()
    return source if local.is_absolute() else os.path.abspath(local)


_KIND_WORDS = {"local": "a local directory", "embedded": "an embedded model"}


def cmd_judge_agreement(args: argparse.Namespace) -> int:
    """Score reference CSVs with a judge and compare with their own scores; bad input exits 2, writing nothing."""
    from em_assets.catalog.reference import ReferenceFileError
    from em_assets.cli.progress import logged_to_stderr
    from em_assets.grid.load import GridError
    from em_assets.judging.agreement_stage import fitted_answers, measure_agreement
    from em_assets.judging.error_rates import ErrorRateLookup
    from em_assets.results.errors import MissingUpstreamError

    current = settings()
    try:
        inputs = _agreement_inputs(current, args.reference, args.judge)
        rows, grid, spec, store = inputs.rows, inputs.grid, inputs.spec, inputs.store
        lookup = ErrorRateLookup(store, grid.thresholds, grid.agreement.reference_judges)
        with logged_to_stderr(), judge_failure_reported():
            report = measure_agreement(
                store,
                grid,
                spec,
                rows,
                inputs.templates,
                cache_dir=current.cache_dir,
                device=current.torch_device,
                lookup=lookup,
            )
    except (ReferenceFileError, GridError, MissingUpstreamError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except _JudgeFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    seen = fitted_answers(store, grid, spec, rows)
    if seen:
        print(
            f"warning: {seen} of {rows.height} answers are reference train answers the {spec.backend} judge is "
            f"fitted on: agreement on them is not held out (agreement.held_out_base_models names the others)",
            file=sys.stderr,
        )
    _print_agreement(report, args.format, grid.agreement.max_em_gap)
    return 0


@dataclass(frozen=True)
class _AgreementInputs:
    rows: pl.DataFrame
    grid: GridConfig
    spec: JudgeSpec
    templates: dict
    store: Store


def _agreement_inputs(current: Settings, reference: Sequence[str], judge: str | None) -> _AgreementInputs:
    """The reference rows, grid, judge, templates and store `judge-agreement` reads, each checked before the
    store is created (it holds the judge cache)."""
    from em_assets.catalog.reference import read_reference_files
    from em_assets.catalog.stage import check_grid_names
    from em_assets.cli.organisms import check_grid_reads
    from em_assets.cli.results import from_here, usable_store
    from em_assets.grid.load import load_grid
    from em_assets.judging.agreement_stage import pick_judge, upstream_templates
    from em_assets.judging.judges import judge_identity, make_judge

    rows = read_reference_files([Path(f) for f in reference])
    grid = load_grid(current.grid_path, current.profile)
    # Plan's checks of what the grid names, where a run of the judge reads it too.
    check_grid_names(grid)
    check_grid_reads(grid, current)
    spec = pick_judge(grid, judge)
    templates = upstream_templates(grid, current.data_mirror, current.cache_dir)
    store = usable_store(may_create=True)
    # The judge is found (a trained one in the store, a model on disk) and an API judge's key accepted
    # before the store is created.
    judge_identity(grid, current.cache_dir, store, spec, current.torch_device)
    if spec.backend == "openai":
        make_judge(grid, None, spec=spec).check_server()
    made = not store.exists()
    store.init()
    if made:
        # The judge cache's store, made where a relative EM_DB names it: perhaps not the repository.
        print(
            f"[em-assets] made the results store {store.location.describe()}"
            f"{from_here(*store.local_paths())} for the judge cache",
            file=sys.stderr,
        )
    return _AgreementInputs(rows, grid, spec, templates, store)


def _print_agreement(report: AgreementReport, fmt: str, max_em_gap: float) -> None:
    """The agreement report as JSON, or as markdown tables with the correction's coverage and EM gaps."""
    import json

    from em_assets.judging.agreement_stage import correction_coverage, em_gaps

    if fmt == "json":
        print(json.dumps(report.as_json(), indent=2))
        return
    print(f"judge {report.judge} ({report.model} @ {report.revision})")
    with pl.Config(**MARKDOWN, float_precision=3, fmt_str_lengths=60, tbl_width_chars=200):
        print(metrics_table(report.metrics))
        print(em_table(report.em))
    print(f"judge_corrected: Rogan-Gladen with {report.corrected_with}")
    print(correction_coverage(report.em))
    print(em_gaps(report.em, max_em_gap).words())


class _JudgeFailed(Exception):
    """The judge's server failed for good in the middle of scoring, after the store was written to."""


@contextlib.contextmanager
def judge_failure_reported() -> Iterator[None]:
    """A judge request failing for good while scoring, as one line: the server's fault, not bad input, so it
    exits 1. A refused key stays bad input (2); what was scored before it is kept in the judge cache."""
    from em_assets.judging.http import JudgeAuthError, JudgeRequestError

    try:
        yield
    except JudgeAuthError:
        raise
    except JudgeRequestError as exc:
        raise _JudgeFailed(
            f"{exc}; the scores before it are kept in the judge cache, so a rerun asks only for the rest"
        ) from None


def metrics_table(metrics: Sequence[MetricAgreement]) -> pl.DataFrame:
    """Per metric: the agreement statistics, Spearman and AUC beside their 95% intervals."""
    table = pl.DataFrame([{"metric": m.metric, **m.as_dict()} for m in metrics], infer_schema_length=None)
    # A statistic undefined for every metric (no misaligned answer: no AUC) reads as a null column.
    return table.with_columns(pl.exclude("metric", "n").cast(pl.Float64)).select(
        "metric",
        "n",
        interval_column(pl.col("spearman"), pl.col("spearman_lo"), pl.col("spearman_hi")).alias("spearman"),
        pl.col("pearson").round(3),
        pl.col("mae").round(1),
        interval_column(pl.col("auc"), pl.col("auc_lo"), pl.col("auc_hi")).alias("auc"),
    )


def em_table(em: pl.DataFrame) -> pl.DataFrame:
    """Per reference file: its EM rate under its own scores and under the judge's, the judge's corrected for
    its error, each with its 95% interval, and both coherence rates."""
    return em.select(
        pl.col("source_file").alias("file"),
        "n",
        interval_column(pl.col("reference"), pl.col("reference_lo"), pl.col("reference_hi")).alias(
            "em reference"
        ),
        interval_column(pl.col("judge_rate"), pl.col("judge_lo"), pl.col("judge_hi")).alias("em judge"),
        interval_column(
            pl.col("judge_corrected"), pl.col("judge_corrected_lo"), pl.col("judge_corrected_hi")
        ).alias("em judge corrected"),
        pl.col("reference_coherence").round(3).alias("coherent reference"),
        pl.col("judge_coherence").round(3).alias("coherent judge"),
    )
