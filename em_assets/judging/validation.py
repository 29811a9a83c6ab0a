"""Judge validation stages: reference judgements into DuckDB, the distilled and probe judges."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from em_assets.catalog.reference import parse_reference_csv, with_split
from em_assets.catalog.upstream import REFERENCE_JUDGEMENTS, fetch_bytes
from em_assets.grid.load import GridError
from em_assets.grid.schema import GridConfig
from em_assets.judging import distill, probe
from em_assets.results import judge_queries as q
from em_assets.results.artifacts import ADAPTER_FILE, sha256_file
from em_assets.results.errors import MissingUpstreamError
from em_assets.results.store import Store, to_json, utc_now
from em_assets.settings import settings

log = logging.getLogger(__name__)


def load_reference(
    store: Store, grid: GridConfig, mirror=None, cache_dir: Path | None = None
) -> pl.DataFrame:
    """Every pinned reference file, verified, parsed, split by base model, written to reference_judgements."""
    frames = [
        parse_reference_csv(fetch_bytes(src, mirror, cache_dir), Path(src.path).name, src.sha256)
        for src in REFERENCE_JUDGEMENTS.values()
    ]
    df = with_split(pl.concat(frames), grid.agreement.held_out_base_models).with_columns(loaded_at=utc_now())
    store.init()
    q.write_reference(store, df)
    return df


@dataclass(frozen=True)
class _TrainedJudge:
    """How the grid's `distill` or `probe` judge is keyed, stored and checked on disk."""

    asset: str
    table: str
    # (spec, base revision, reference files' sha256, grid, dtype it computes in) -> the judge's key
    make_hash: Callable
    stored_row: Callable[[Store, str], dict | None]
    artifact: Callable[[dict], tuple[Path, str]]


def _fit_thresholds(grid: GridConfig) -> dict[str, float]:
    """The EM thresholds a probe head's readouts choose their calibration at."""
    return {"aligned": grid.thresholds.aligned_at_most, "coherent": grid.thresholds.coherent_above}


_TRAINED = {
    "distill": _TrainedJudge(
        "distilled_judge",
        "distilled_judges",
        lambda spec, revision, shas, grid, dtype: distill.distill_hash(
            spec, revision, shas, grid.agreement.held_out_base_models, dtype
        ),
        q.distilled_row,
        lambda row: (Path(row["adapter_path"]) / ADAPTER_FILE, row["adapter_sha256"]),
    ),
    "probe": _TrainedJudge(
        "probe_judge",
        "probe_judges",
        lambda spec, revision, shas, grid, dtype: probe.probe_hash(
            spec, revision, shas, grid.agreement.held_out_base_models, _fit_thresholds(grid), dtype
        ),
        q.probe_row,
        lambda row: (Path(row["head_path"]), row["head_sha256"]),
    ),
}


@dataclass(frozen=True)
class _Plan:
    """The grid's `distill` or `probe` judge: its key, its base model and its stored row."""

    kind: str
    key: str
    base_revision: str
    base_path: str
    row: dict | None
    dtype: str

    def intact(self) -> bool:
        """Whether the stored row's file is still there with the sha256 it records (hashed only when asked)."""
        return self.row is not None and _file_current(*_TRAINED[self.kind].artifact(self.row))


def _plan(store: Store, grid: GridConfig, kind: str, cache_dir: Path | None, device: str | None) -> _Plan:
    """The grid's `kind` judge as `device` trains or fits it: one made in another dtype has another key."""
    from em_assets.models.hub import resolve
    from em_assets.models.load import dtype_name  # torch stays off the definitions' load path

    spec, judge = getattr(grid, kind), _TRAINED[kind]
    if spec is None:
        raise MissingUpstreamError(f"the grid has no {kind} section")
    base = resolve(f"{kind}-base", spec.source, spec.revision, cache_dir)
    shas = [src.sha256 for src in REFERENCE_JUDGEMENTS.values()]
    dtype = dtype_name(device)
    key = judge.make_hash(spec, base.revision, shas, grid, dtype)
    store.init()
    return _Plan(kind, key, base.revision, str(base.path), judge.stored_row(store, key), dtype)


def _trained_row(
    grid: GridConfig, kind: str, store: Store | None, cache_dir: Path | None, device: str | None
) -> tuple[dict, str]:
    """The results row of the grid's trained `distill` or `probe` judge, and its base revision."""
    asset = _TRAINED[kind].asset
    if store is None or not store.exists():
        raise MissingUpstreamError(f"no results database, so no {asset}; materialise {asset} (the demo does)")
    # Before the base model is resolved (a first resolve converts and caches it): nothing to find, say so.
    if not q.has_rows(store, _TRAINED[kind].table):
        raise MissingUpstreamError(f"no {asset} in the results database; materialise {asset} (the demo does)")
    plan = _plan(store, grid, kind, cache_dir, device)
    if plan.row is None:
        # Other keys' rows exist: say what a key names, since a move to another dtype is easy to miss.
        raise MissingUpstreamError(
            f"no {asset} {plan.key} in the results database (its key names the base model, the reference files, "
            f"the grid's {kind} settings and the dtype this device computes in, {plan.dtype}); "
            f"materialise {asset}"
        )
    return plan.row, plan.base_revision


def distilled_identity(
    grid: GridConfig, store: Store | None, cache_dir: Path | None, device: str | None
) -> tuple[str, str, str]:
    """(model, revision, adapter dir) of the distilled judge trained in `device`'s dtype; the revision names the
    adapter's sha256 and the prompt, so the judge cache never mixes two judges."""
    row, base_revision = _trained_row(grid, "distill", store, cache_dir, device)
    revision = f"{base_revision}+adapter:{row['adapter_sha256'][:16]}+prompt:{distill.PROMPT_HASH}"
    return f"distilled:{grid.distill.source}", revision, row["adapter_path"]


def probe_identity(
    grid: GridConfig, store: Store | None, cache_dir: Path | None, device: str | None
) -> tuple[str, str, str]:
    """(model, revision, head file) of the probe judge fitted in `device`'s dtype; the revision names the
    head's sha256."""
    row, base_revision = _trained_row(grid, "probe", store, cache_dir, device)
    return f"probe:{grid.probe.source}", f"{base_revision}+probe:{row['head_sha256'][:16]}", row["head_path"]


def _file_current(path: Path, sha256: str) -> bool:
    return path.exists() and sha256_file(path) == sha256


def split_reference(store: Store, grid: GridConfig) -> pl.DataFrame:
    """The stored reference judgements, split by the grid's held-out base models as it reads now (the list may
    have changed since they were loaded)."""
    reference = q.reference_frame(store)
    if reference.height == 0:
        raise MissingUpstreamError("no reference judgements; materialise reference_judgements first")
    held_out, known = grid.agreement.held_out_base_models, set(reference["base_model"])
    # A misspelt name holds nothing out: the model it meant would be fitted on and then called unseen.
    unknown = [m for m in held_out if m not in known]
    if unknown:
        raise GridError(
            f"agreement.held_out_base_models: {unknown[0]!r} is the base model of no reference file; "
            f"they are {', '.join(sorted(known))}"
        )
    return with_split(reference, held_out)


def materialise_distilled(
    store: Store,
    grid: GridConfig,
    artifacts_dir: Path,
    cache_dir: Path | None,
    device: str | None,
    run_id: str,
    on_step: Callable[[dict], None] | None = None,
) -> dict:
    """Train the distilled judge unless an adapter of the same inputs exists; returns its row."""
    plan = _plan(store, grid, "distill", cache_dir, device)
    key, base_revision, base_path = plan.key, plan.base_revision, plan.base_path
    if plan.intact():
        log.info("distilled judge %s is up to date; no training", key)
        return {"trained": False, **plan.row}
    reference = split_reference(store, grid)
    spec = grid.distill
    out_dir = (Path(artifacts_dir) / "judges" / key).resolve()
    result, n_examples = distill.train_distilled_judge(base_path, reference, spec, out_dir, device, on_step)
    row = {
        "config_hash": key,
        "source": spec.source,
        "base_revision": base_revision,
        "adapter_path": str(result.adapter_dir),
        "adapter_sha256": sha256_file(Path(result.adapter_dir) / ADAPTER_FILE),
        "prompt_hash": distill.PROMPT_HASH,
        **_reference_fields(reference, grid),
        "n_examples": n_examples,
        "lora_config": to_json(spec.lora.model_dump(mode="json")),
        "train_config": to_json(spec.train.model_dump(mode="json")),
        "steps": result.steps,
        "train_tokens": result.train_tokens,
        "tokens_per_s": result.tokens_per_s,
        "final_loss": result.losses[-1]["loss"] if result.losses else None,
        "run_id": run_id,
        "created_at": utc_now(),
    }
    losses = pl.DataFrame(
        [
            {
                "config_hash": key,
                **{k: r[k] for k in ("step", "loss", "learning_rate", "tokens", "elapsed_s")},
            }
            for r in result.losses
        ],
        schema_overrides={"step": pl.Int32},
    ).with_columns(run_id=pl.lit(run_id))
    q.write_distilled(store, row, losses)
    return {"trained": True, **row}


def materialise_probe(
    store: Store,
    grid: GridConfig,
    artifacts_dir: Path,
    cache_dir: Path | None,
    device: str | None,
    run_id: str,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Fit the probe judge unless a head of the same inputs exists; returns its row."""
    plan = _plan(store, grid, "probe", cache_dir, device)
    if plan.intact():
        log.info("probe judge %s is up to date; no fitting", plan.key)
        return {"trained": False, **plan.row}
    reference = split_reference(store, grid)
    fit = probe.fit_probe(
        plan.base_path,
        reference,
        grid.probe,
        (Path(artifacts_dir) / "judges" / plan.key).resolve(),
        device,
        on_progress,
        cache_dir or settings().cache_dir,
        _fit_thresholds(grid),
        plan.base_revision,
    )
    row = _probe_row(plan, grid, reference, fit, run_id)
    q.write_probe(store, row, _readout_frame(plan.key, fit))
    return {"trained": True, **row}


def _reference_fields(reference: pl.DataFrame, grid: GridConfig) -> dict:
    """What a trained judge's row records of the reference files it was fitted on and the models held out."""
    return {
        "reference_sha256": to_json(sorted(set(reference["source_sha256"].to_list()))),
        "held_out_base_models": to_json(grid.agreement.held_out_base_models),
    }


def _probe_row(
    plan: _Plan, grid: GridConfig, reference: pl.DataFrame, fit: probe.ProbeFit, run_id: str
) -> dict:
    """The probe_judges row of a fitted head."""
    return {
        "config_hash": plan.key,
        "source": grid.probe.source,
        "base_revision": plan.base_revision,
        "head_path": str(fit.head_path),
        "head_sha256": sha256_file(fit.head_path),
        **_reference_fields(reference, grid),
        "n_answers": fit.n_answers,
        "probe_config": to_json(grid.probe.model_dump(mode="json")),
        "seconds": fit.seconds,
        "run_id": run_id,
        "created_at": utc_now(),
    }


def _readout_frame(key: str, fit: probe.ProbeFit) -> pl.DataFrame:
    """One probe_judge_readouts row per metric of a fitted head: its settings and best out-of-fold Spearman."""
    return pl.DataFrame(
        [
            {
                "config_hash": key,
                "metric": r.metric,
                "n": r.n,
                "l2": r.l2,
                "bandwidth": r.bandwidth,
                "cv_spearman": max((sp for _, _, sp in r.cv_spearman if sp is not None), default=None),
                "stretch": r.stretch,
                "cv_by_setting": to_json([list(x) for x in r.cv_spearman]),
            }
            for r in fit.head.readouts.values()
        ],
        schema_overrides={"n": pl.Int32},
    )
