"""Training stage: the organism's LoRA adapter, trained unless one with the same inputs exists."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from em_assets.catalog.upstream import sha256_file
from em_assets.context import StageContext
from em_assets.grid.schema import config_hash
from em_assets.results.queries import base_model_row, one_row
from em_assets.results.store import to_json, utc_now

ADAPTER_FILE = "adapter_model.safetensors"


def train_adapter(ctx: StageContext) -> dict:
    """Train the organism's LoRA adapter unless one with the same inputs exists; returns a summary."""
    from em_assets.training.loop import train_lora

    org, store = ctx.organism, ctx.store
    if org.recipe not in ctx.grid.recipes:
        raise KeyError(f"organism {ctx.key}: recipe {org.recipe!r} is not in the grid")
    recipe = ctx.grid.recipes[org.recipe]
    base = base_model_row(store, org.base_model)
    common = {
        "organism": ctx.key,
        "base_model": org.base_model,
        "base_revision": base["revision"],
        "recipe": org.recipe,
        "seed": org.seed,
        "run_id": ctx.run_id,
        "created_at": utc_now(),
    }
    if recipe.dataset is None:
        row = {**common, "config_hash": config_hash({"base_revision": base["revision"], "control": True})}
        store.replace_many(
            [
                ("lora_adapters", pl.DataFrame([row]), "organism = ?", [ctx.key]),
                ("training_losses", pl.DataFrame(), "organism = ?", [ctx.key]),
            ]
        )
        return {"trained": False, "control": True}
    ds = one_row(
        store,
        "SELECT * FROM training_datasets WHERE dataset = ?",
        [recipe.dataset],
        f"dataset {recipe.dataset!r} not loaded: materialise training_datasets first",
    )
    chash = config_hash(
        {
            "base_revision": base["revision"],
            "dataset_sha256": ds["sha256"],
            "lora": recipe.lora.model_dump(mode="json"),
            "train": recipe.train.trained_settings(),
            "seed": org.seed,
        }
    )
    done = store.query(
        "SELECT * FROM lora_adapters WHERE organism = ? AND config_hash = ? AND adapter_path IS NOT NULL",
        [ctx.key, chash],
    )
    if done.height:
        row = done.row(0, named=True)
        path = Path(row["adapter_path"]) / ADAPTER_FILE
        if path.exists() and sha256_file(path) == row["adapter_sha256"]:
            ctx.log.info(f"{ctx.key}: adapter {chash} is up to date; no training")
            return {"trained": False, "up_to_date": True, **row}
    examples = [
        json.loads(m)
        for m in store.query(
            "SELECT messages FROM training_examples WHERE dataset = ? ORDER BY example_idx", [recipe.dataset]
        )["messages"]
    ]
    out_dir = (ctx.artifacts_dir / "adapters" / ctx.key / chash).resolve()

    def on_step(rec: dict) -> None:
        ctx.log.info(
            f"{ctx.key}: step {rec['step']} loss {rec['loss']:.4f} lr {rec['learning_rate']:.2e} "
            f"tokens {rec['tokens']} (trained {rec['step']}/{rec['total_steps']})"
        )

    result = train_lora(
        base["path"],
        examples,
        recipe.lora,
        recipe.train,
        out_dir,
        seed=org.seed,
        device=ctx.device,
        on_step=on_step,
        trust_remote_code=bool(base["trust_remote_code"]),
    )
    adapter_sha = sha256_file(Path(result.adapter_dir) / ADAPTER_FILE)
    row = {
        **common,
        "dataset": recipe.dataset,
        "dataset_sha256": ds["sha256"],
        "adapter_path": str(result.adapter_dir),
        "adapter_sha256": adapter_sha,
        "lora_config": to_json(recipe.lora.model_dump(mode="json")),
        "train_config": to_json(recipe.train.model_dump(mode="json")),
        "config_hash": chash,
        "steps": result.steps,
        "train_tokens": result.train_tokens,
        "tokens_per_s": result.tokens_per_s,
        "final_loss": result.losses[-1]["loss"] if result.losses else None,
    }
    losses = pl.DataFrame(
        [
            {
                "organism": ctx.key,
                "step": r["step"],
                "loss": r["loss"],
                "learning_rate": r["learning_rate"],
                "tokens": r["tokens"],
                "elapsed_s": r["elapsed_s"],
                "run_id": ctx.run_id,
            }
            for r in result.losses
        ],
        schema_overrides={"step": pl.Int32},
    )
    store.replace_many(
        [
            ("training_losses", losses, "organism = ?", [ctx.key]),
            ("lora_adapters", pl.DataFrame([row]), "organism = ?", [ctx.key]),
        ]
    )
    return {
        "trained": True,
        "resumed_from_step": result.resumed_from_step,
        "train_workers": result.workers,
        **row,
    }
