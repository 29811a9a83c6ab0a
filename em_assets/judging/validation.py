"""Judge validation stages: reference judgements into DuckDB, the distilled judge, and judge agreement."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import polars as pl

from em_assets.catalog.reference import parse_reference_csv, with_split
from em_assets.catalog.upstream import REFERENCE_JUDGEMENTS, fetch_bytes, sha256_file
from em_assets.context import MissingUpstreamError
from em_assets.grid.schema import GridConfig
from em_assets.judging import distill
from em_assets.results import judge_queries as q
from em_assets.results.store import Store, to_json, utc_now

log = logging.getLogger(__name__)


ADAPTER_FILE = "adapter_model.safetensors"


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


def _distill_key(grid: GridConfig, cache_dir: Path | None) -> tuple[str, str, str]:
    """(config hash, base revision, base path) of the grid's distilled judge."""
    from em_assets.models.hub import resolve

    spec = grid.distill
    base = resolve("distill-base", spec.source, spec.revision, cache_dir)
    shas = [src.sha256 for src in REFERENCE_JUDGEMENTS.values()]
    key = distill.distill_hash(spec, base.revision, shas, grid.agreement.held_out_base_models)
    return key, base.revision, str(base.path)


def distilled_identity(grid: GridConfig, store: Store | None, cache_dir: Path | None) -> tuple[str, str, str]:
    """(model, revision, adapter dir) of the trained distilled judge; the revision names the adapter's sha256
    and the prompt, so the judge cache never mixes two judges."""
    if store is None:
        raise MissingUpstreamError("the distilled judge is found through the results database; none given")
    key, base_revision, _ = _distill_key(grid, cache_dir)
    store.init()
    row = q.distilled_row(store, key)
    if row is None:
        raise MissingUpstreamError(
            f"no distilled judge {key} in the results database; materialise distilled_judge"
        )
    revision = f"{base_revision}+adapter:{row['adapter_sha256'][:16]}+prompt:{distill.PROMPT_HASH}"
    return f"distilled:{grid.distill.source}", revision, row["adapter_path"]


def _adapter_current(row: dict | None) -> bool:
    if row is None:
        return False
    path = Path(row["adapter_path"]) / ADAPTER_FILE
    return path.exists() and sha256_file(path) == row["adapter_sha256"]


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
    if grid.distill is None:
        raise MissingUpstreamError("the grid has no distill section")
    key, base_revision, base_path = _distill_key(grid, cache_dir)
    store.init()
    if _adapter_current(existing := q.distilled_row(store, key)):
        log.info("distilled judge %s is up to date; no training", key)
        return {"trained": False, **existing}
    reference = q.reference_frame(store)
    if reference.height == 0:
        raise MissingUpstreamError("no reference judgements; materialise reference_judgements first")
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
        "reference_sha256": to_json(sorted(set(reference["source_sha256"].to_list()))),
        "held_out_base_models": to_json(grid.agreement.held_out_base_models),
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
