"""Training stage: the organism's LoRA adapter (or fully fine-tuned weights), trained unless one with the same
inputs exists."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from em_assets.context import StageContext
from em_assets.grid.schema import RecipeSpec, config_hash, recipe_method
from em_assets.models.hub import check_revision
from em_assets.results import queries
from em_assets.results.artifacts import sha256_file, weights_file
from em_assets.results.store import to_json, utc_now
from em_assets.training.imported import bring_organism, source_row

if TYPE_CHECKING:
    from em_assets.training.loop import TrainResult


@dataclass(frozen=True)
class AdapterResult:
    """The organism's adapter row after the stage, and what the stage did to get it."""

    trained: bool
    config_hash: str
    control: bool = False
    adapter_path: str | None = None
    adapter_sha256: str | None = None
    steps: int | None = None
    train_tokens: int | None = None
    tokens_per_s: float | None = None
    final_loss: float | None = None
    train_workers: int | None = None
    train_workers_reason: str | None = None
    resumed_from_step: int | None = None

    @classmethod
    def from_row(cls, row: dict, trained: bool, **extra) -> AdapterResult:
        fields = ("adapter_path", "adapter_sha256", "steps", "train_tokens", "tokens_per_s", "final_loss")
        return cls(
            trained=trained, config_hash=row["config_hash"], **{f: row.get(f) for f in fields}, **extra
        )


def checkpoint_rows(result, adapter: dict) -> pl.DataFrame:
    """One row per kept checkpoint plus the final adapter, with the adapter row's lineage."""
    loss = {r["step"]: r["loss"] for r in result.losses}
    grad_norm = {r["step"]: r.get("grad_norm") for r in result.losses}
    kept = [*result.checkpoints, {"step": result.steps, "train_tokens": result.train_tokens, "path": None}]
    lineage = ("organism", "base_model", "base_revision", "recipe", "seed", "dataset", "dataset_sha256")
    rows = [
        {
            **{k: adapter[k] for k in (*lineage, "config_hash", "adapter_sha256", "run_id", "created_at")},
            "step": c["step"],
            "checkpoint_path": str(c["path"]) if c["path"] else adapter["adapter_path"],
            "checkpoint_sha256": sha256_file(weights_file(Path(c["path"])))
            if c["path"]
            else adapter["adapter_sha256"],
            "train_tokens": c["train_tokens"],
            "loss": loss.get(c["step"]),
            "grad_norm": grad_norm.get(c["step"]),
        }
        for c in kept
    ]
    return pl.DataFrame(rows, schema_overrides={"step": pl.Int32}, infer_schema_length=None)


def up_to_date_adapter(ctx: StageContext, chash: str, save_steps: int) -> dict | None:
    """The organism's adapter row if it was trained with `chash`, its file still has the recorded bytes and
    every checkpoint `save_steps` asks for is recorded."""
    row = queries.adapter_with_hash(ctx.store, ctx.key, chash)
    if row is None:
        return None
    # save_steps does not change the weights (not in chash), but a denser one asks for checkpoints this run
    # never kept (as do runs from before checkpoints were kept): train again to keep them.
    wanted = {*range(save_steps, row["steps"], save_steps), row["steps"]}
    if not wanted <= set(queries.checkpoint_steps(ctx.store, ctx.key)):
        return None
    path = weights_file(Path(row["adapter_path"]))
    return row if path.exists() and sha256_file(path) == row["adapter_sha256"] else None


def run_training(ctx: StageContext, base: dict, recipe: RecipeSpec, out_dir: Path):
    """train_lora on the recipe's dataset (and KL dataset), logging each optimizer step."""
    from em_assets.training.loop import KLTraining, train_lora  # torch stays off the definitions' load path

    examples = [json.loads(m) for m in queries.training_messages(ctx.store, recipe.dataset)]
    kl = None
    if recipe.kl is not None:
        kl_examples = [json.loads(m) for m in queries.training_messages(ctx.store, recipe.kl.dataset)]
        kl = KLTraining(kl_examples, recipe.kl.weight, recipe.kl.batch_size, recipe.kl.mean_over)

    def on_step(rec: dict) -> None:
        kl_note = f" kl {rec['kl']:.4g}" if rec.get("kl") is not None else ""
        ctx.log.info(
            f"{ctx.key}: step {rec['step']} loss {rec['loss']:.4f}{kl_note} grad norm {rec['grad_norm']:.3g} "
            f"lr {rec['learning_rate']:.2e} tokens {rec['tokens']} (trained {rec['step']}/{rec['total_steps']})"
        )

    return train_lora(
        base["path"],
        examples,
        recipe.lora,
        recipe.train,
        out_dir,
        seed=ctx.organism.seed,
        device=ctx.device,
        on_step=on_step,
        trust_remote_code=bool(base["trust_remote_code"]),
        kl=kl,
    )


def loss_rows(ctx: StageContext, losses: list[dict]) -> pl.DataFrame:
    columns = ("step", "loss", "learning_rate", "tokens", "elapsed_s", "grad_norm", "kl")
    return pl.DataFrame(
        [{"organism": ctx.key, **{c: r.get(c) for c in columns}, "run_id": ctx.run_id} for r in losses],
        schema_overrides={"step": pl.Int32, "grad_norm": pl.Float64, "kl": pl.Float64},
    )


def _record_source(ctx: StageContext, recipe: RecipeSpec) -> None:
    """The organism_sources row, rewritten only when what it says changed (a rerun that trains nothing keeps it)."""
    row = source_row(ctx, recipe)
    known = queries.organism_source_row(ctx.store, ctx.key)
    if known is None or any(known[k] != v for k, v in row.items() if k not in ("run_id", "created_at")):
        ctx.store.replace_rows("organism_sources", pl.DataFrame([row]), "organism = ?", [ctx.key])


def train_adapter(ctx: StageContext) -> AdapterResult:
    """Train the organism's LoRA adapter (or, `method: full`, all its weights) unless one with the same inputs
    exists."""
    from em_assets.models.load import dtype_name  # torch stays off the definitions' load path

    org, store = ctx.organism, ctx.store
    if org.recipe not in ctx.grid.recipes:
        raise KeyError(f"organism {ctx.key}: recipe {org.recipe!r} is not in the grid")
    recipe = ctx.grid.recipes[org.recipe]
    if recipe.kind != "train":
        return AdapterResult.from_row(bring_organism(ctx, recipe), trained=False)
    _record_source(ctx, recipe)
    base = queries.base_model_row(store, org.base_model)
    common = _adapter_row(ctx, recipe, base["revision"])
    if recipe.dataset is None:
        chash = config_hash({"base_revision": base["revision"], "control": True})
        queries.write_adapter(
            store, ctx.key, {**common, "config_hash": chash}, pl.DataFrame(), pl.DataFrame()
        )
        return AdapterResult(trained=False, config_hash=chash, control=True)
    shas = ctx.dataset_shas(recipe)
    chash = ctx.trained_hash(recipe, base["revision"], dtype_name(ctx.device), shas)
    done = up_to_date_adapter(ctx, chash, recipe.train.save_steps)
    if done is not None:
        ctx.log.info(f"{ctx.key}: adapter {chash} is up to date; no training")
        return AdapterResult.from_row(done, trained=False)
    check_revision(base)
    result = run_training(ctx, base, recipe, (ctx.artifacts_dir / "adapters" / ctx.key / chash).resolve())
    row = common | _trained_columns(recipe, result, chash, *shas)
    queries.write_adapter(store, ctx.key, row, loss_rows(ctx, result.losses), checkpoint_rows(result, row))
    return AdapterResult.from_row(
        row,
        trained=True,
        train_workers=result.workers,
        train_workers_reason=result.workers_reason,
        resumed_from_step=result.resumed_from_step,
    )


def _adapter_row(ctx: StageContext, recipe: RecipeSpec, base_revision: str) -> dict:
    """The adapter row's columns every train recipe has, the untrained control's included."""
    org = ctx.organism
    return {
        "organism": ctx.key,
        "base_model": org.base_model,
        "base_revision": base_revision,
        "recipe": org.recipe,
        "seed": org.seed,
        "run_id": ctx.run_id,
        "created_at": utc_now(),
        "method": recipe_method(recipe),
        "kl_regularised": recipe.kl is not None,
    }


def _trained_columns(
    recipe: RecipeSpec, result: TrainResult, chash: str, dataset_sha256: str, kl_sha256: str | None
) -> dict:
    """The adapter row's columns of a trained organism: its data, configs and their hash, weights and training
    figures."""
    return {
        "dataset": recipe.dataset,
        "dataset_sha256": dataset_sha256,
        "adapter_path": str(result.adapter_dir),
        "adapter_sha256": sha256_file(weights_file(Path(result.adapter_dir))),
        "lora_config": to_json(recipe.lora.model_dump(mode="json")) if recipe.lora else None,
        "kl_config": to_json({**recipe.kl.model_dump(mode="json"), "dataset_sha256": kl_sha256})
        if recipe.kl
        else None,
        "train_config": to_json(recipe.train.model_dump(mode="json")),
        "config_hash": chash,
        "steps": result.steps,
        "train_tokens": result.train_tokens,
        "tokens_per_s": result.tokens_per_s,
        "final_loss": result.losses[-1]["loss"] if result.losses else None,
    }
