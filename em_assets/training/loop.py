"""LoRA SFT on chat examples as the upstream recipes do it: loss on the final assistant turn only, rsLoRA,
AdamW with a warmup schedule and gradient accumulation, atomic checkpoints and exact resume."""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from em_assets.grid.schema import LoraSpec, TrainSpec
from em_assets.models.load import load_tokenizer, pick_device, pick_dtype
from em_assets.models.processes import cpu_processes, threads_each
from em_assets.training.checkpoints import (
    CHECKPOINT_DIR,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    training_run_hash,
    write_adapter,
)
from em_assets.training.data_parallel import STOP, Helpers, seed_step, share
from em_assets.training.encode import Encoded, encode_dataset, plan_steps
from em_assets.training.step import TrainingDivergedError, accumulate_gradients, build_model, step_labels

log = logging.getLogger(__name__)


# Upstream trains through TrainingArguments, whose default max_grad_norm is 1.0; TrainSpec has no field for it.
MAX_GRAD_NORM = 1.0


# "auto" trains in one process per core from this many tokens: below, a helper's start-up outweighs its share.
AUTO_WORKERS_MIN_TOKENS = 8192


TRAIN_BYTES_PER_WEIGHT_BYTE = 12


@dataclass
class TrainResult:
    """A finished run: the adapter directory and one loss record per optimizer step (resumed ones included)."""

    adapter_dir: Path
    losses: list[dict]
    steps: int
    train_tokens: int
    tokens_per_s: float
    resumed_from_step: int | None
    workers: int = 1


def train_workers(
    train: TrainSpec, device: str, steps: list[list[list[int]]], encoded: list[Encoded], weight_bytes: int
) -> int:
    """Processes for data-parallel training: `train.workers`, or for "auto" one per core on CPU (as memory
    allows) when the run has at least AUTO_WORKERS_MIN_TOKENS tokens (a helper takes seconds to start)."""
    if device != "cpu":
        return 1
    if train.workers != "auto":
        return train.workers
    tokens = sum(len(encoded[i].input_ids) for step in steps for micro in step for i in micro)
    if tokens < AUTO_WORKERS_MIN_TOKENS:
        return 1
    # Activations and the adapter's optimizer state come on top of the weights: rank-32 on all projections of
    # SmolLM2-135M peaked at 12x its bf16 weights per process.
    return cpu_processes(TRAIN_BYTES_PER_WEIGHT_BYTE * weight_bytes)


def train_lora(
    model_path: Path | str,
    examples: Sequence[list[dict]],
    lora: LoraSpec,
    train: TrainSpec,
    out_dir: Path,
    *,
    seed: int,
    device: str | None = None,
    on_step: Callable[[dict], None] | None = None,
    trust_remote_code: bool = False,
) -> TrainResult:
    """Train a LoRA adapter into out_dir/adapter, resuming from out_dir/checkpoints when the run matches.

    Checkpoints are deleted once the final adapter is written; tokens_per_s covers this call's steps only.
    """
    # A compact loop rather than HF Trainer: it lets the loss skip prompt logits, checks every step for
    # divergence before anything is written, and makes checkpoints atomic and tied to a hash of the run.
    from transformers import get_scheduler

    out_dir = Path(out_dir)
    device = device or pick_device()
    dtype = pick_dtype(device)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    encoded = encode_dataset(tokenizer, examples, train, seed)
    steps = plan_steps([len(e.input_ids) for e in encoded], train, seed)

    torch.manual_seed(seed)
    spec = {
        "model_path": model_path,
        "device": device,
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "lora": lora,
        "longest": max(len(e.input_ids) for e in encoded),
    }
    model, params = build_model(**spec)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    workers = train_workers(train, device, steps, encoded, weight_bytes)
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    scheduler = get_scheduler(
        train.lr_scheduler_type, optimizer, num_warmup_steps=train.warmup_steps, num_training_steps=len(steps)
    )

    ckpt_root = out_dir / CHECKPOINT_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    run_hash = training_run_hash(model_path, examples, lora, train, seed, dtype)
    latest = latest_checkpoint(ckpt_root, run_hash)
    progress = {"run_hash": run_hash, "step": 0, "losses": [], "train_tokens": 0, "elapsed_s": 0.0}
    if latest is not None:
        progress = load_checkpoint(latest, model, optimizer, scheduler)
        log.info("resuming LoRA training from %s", latest)
    resumed_from = progress["step"] or None

    helpers, threads = None, torch.get_num_threads()
    if workers > 1:
        log.info("training in %d processes", workers)
        per_rank = threads_each(workers)
        job = {
            "model": spec,
            "encoded": encoded,
            "steps": steps,
            "pad_id": tokenizer.pad_token_id,
            "threads": per_rank,
            "seed": seed,
        }
        torch.set_num_threads(per_rank)
        helpers = Helpers.start(workers, params, job)
    start, prior_s, run_tokens = time.perf_counter(), progress["elapsed_s"], 0
    try:
        for step in range(progress["step"] + 1, len(steps) + 1):
            batches = [[encoded[i] for i in micro] for micro in steps[step - 1]]
            n_labels = step_labels(batches)
            try:
                if helpers is not None:
                    helpers.group.broadcast_step(step)
                    seed_step(seed, step, 0)
                loss_sum, tokens = accumulate_gradients(
                    model, step, share(batches, 0, workers), tokenizer.pad_token_id, n_labels
                )
                if helpers is not None:
                    loss_sum, tokens = helpers.group.sum_gradients(loss_sum, tokens)
            except RuntimeError as exc:
                if helpers is None:
                    raise
                raise helpers.check(exc) from exc
            loss = loss_sum / n_labels
            if not math.isfinite(loss):
                raise TrainingDivergedError(step, loss)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM).item()
            if not math.isfinite(grad_norm):
                raise TrainingDivergedError(step, loss, grad_norm)
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            run_tokens += tokens
            elapsed = prior_s + time.perf_counter() - start
            record = {
                "step": step,
                "loss": loss,
                "learning_rate": learning_rate,
                "tokens": tokens,
                "elapsed_s": elapsed,
                "grad_norm": grad_norm,
                "total_steps": len(steps),
            }
            progress["losses"].append(record)
            progress.update(step=step, elapsed_s=elapsed, train_tokens=progress["train_tokens"] + tokens)
            if on_step is not None:
                on_step(record)
            if step % train.save_steps == 0 and step < len(steps):
                save_checkpoint(ckpt_root, model, optimizer, scheduler, progress)
        if helpers is not None:
            helpers.group.broadcast_step(STOP)
            helpers.stop()
    except BaseException:
        if helpers is not None:
            helpers.kill()
        raise
    finally:
        torch.set_num_threads(threads)
    run_s = time.perf_counter() - start

    adapter_dir = write_adapter(model, out_dir)
    shutil.rmtree(ckpt_root, ignore_errors=True)
    return TrainResult(
        adapter_dir=adapter_dir,
        losses=progress["losses"],
        steps=len(steps),
        train_tokens=progress["train_tokens"],
        tokens_per_s=run_tokens / run_s if run_s > 0 else 0.0,
        resumed_from_step=resumed_from,
        workers=workers,
    )
