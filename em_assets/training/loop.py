"""SFT on chat examples as the upstream recipes do it: loss on the final assistant turn only, rsLoRA adapters or
every weight (full fine-tuning), an optional KL penalty to the chat model, AdamW with a warmup schedule and
gradient accumulation, atomic checkpoints and exact resume."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from em_assets.grid.schema import LoraSpec, TrainSpec, mean_over_hashed
from em_assets.models.facts import model_facts
from em_assets.models.load import load_tokenizer, pick_device, pick_dtype
from em_assets.models.processes import cpu_processes, threads_each
from em_assets.settings import settings
from em_assets.training.checkpoints import (
    CHECKPOINT_DIR,
    keep_adapter,
    kept_adapters,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    training_run_hash,
    write_adapter,
)
from em_assets.training.data_parallel import Helpers, seed_step, share
from em_assets.training.encode import Encoded, encode_dataset, encode_example, plan_kl_batches, plan_steps
from em_assets.training.step import (
    TrainingDivergedError,
    accumulate_gradients,
    adamw,
    backward,
    build_model,
    check_full_fits,
    frozen_reference,
    full_compute_dtype,
    kl_to_reference,
    loss_scaler,
    step_labels,
)
from em_assets.training.verdict import Verdict, read_verdict, run_shape, verdict_path, write_verdict

log = logging.getLogger(__name__)


# Upstream trains through TrainingArguments, whose default max_grad_norm is 1.0; TrainSpec has no field for it.
MAX_GRAD_NORM = 1.0


# "auto" tries helpers only when the steps left would take this long in one process: a helper takes seconds to
# start, and two single-thread processes gain at most a fraction of a step over one two-thread process, on some
# CPUs none (docs/cpu.md).
AUTO_WORKERS_MIN_SECONDS = 30.0


TRAIN_BYTES_PER_WEIGHT_BYTE = 12


@dataclass(frozen=True)
class KLTraining:
    """The KL penalty's data: chat examples of an out-of-domain dataset, its weight, examples per step and what
    its KL is averaged over (grid.schema.KLSpec)."""

    examples: Sequence[list[dict]]
    weight: float
    batch_size: int
    mean_over: str = "tokens_and_vocabulary"

    def settings(self) -> dict:
        """What the penalty changes in the trained weights, for the run's hash."""
        digest = hashlib.sha256(json.dumps(list(self.examples), sort_keys=True).encode()).hexdigest()
        return {"examples": digest, "weight": self.weight, "batch_size": self.batch_size} | mean_over_hashed(
            self.mean_over
        )

    def weight_per_token(self, vocabulary: int) -> float:
        """The weight of the KL per token: upstream's trainer divides the KL summed over `vocabulary` logits by
        tokens x vocabulary (a mean over the elements of its [tokens, vocabulary] KL)."""
        return self.weight / vocabulary if self.mean_over == "tokens_and_vocabulary" else self.weight


@dataclass
class TrainResult:
    """A finished run: the adapter (or, fully fine-tuned, model) directory and one loss record per optimizer
    step (resumed ones included)."""

    adapter_dir: Path
    losses: list[dict]
    steps: int
    train_tokens: int
    # Over this call's steps only: a resumed run's earlier steps are not timed.
    tokens_per_s: float
    resumed_from_step: int | None
    workers: int = 1
    workers_reason: str = ""
    # Adapter weights of every saved checkpoint: {step, train_tokens, path} in step order.
    checkpoints: list[dict] = field(default_factory=list)


def train_workers(train: TrainSpec, device: str, weight_bytes: int, dropout: float = 0.0) -> tuple[int, str]:
    """The most processes data-parallel training may use, and why: `train.workers`, or for "auto" one per core
    on CPU as memory allows (started and kept only as timed steps show they pay, `_auto_workers`)."""
    if device != "cpu":
        return 1, f"one process on {device}"
    if train.workers != "auto":
        return train.workers, "set by the recipe"
    # Each process draws its own dropout masks, so a timing that starts helpers would change the adapter.
    if dropout > 0:
        return 1, "auto: one process, since dropout masks depend on how many processes draw them"
    # Activations and the adapter's optimizer state come on top of the weights: rank-32 on all projections of
    # a small model peaks at many times its bf16 weights per process.
    most = cpu_processes(TRAIN_BYTES_PER_WEIGHT_BYTE * weight_bytes)
    if most == 1:
        return 1, "auto: one core, or memory for one copy"
    return most, "auto: one process; a run of three steps or more times its second to see if helpers pay"


@dataclass
class _Run:
    """One training run's moving parts: the model and its optimizer, the encoded data and step plan, helpers."""

    model: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    encoded: list[Encoded]
    steps: list[list[list[int]]]
    pad_id: int
    seed: int
    workers: int = 1
    # What the run may grow to under "auto" (1: never), and why the run has the processes it has.
    max_workers: int = 1
    workers_reason: str = ""
    # While "auto" tries helpers: the step timed in one process and its seconds per token.
    trial: tuple[int, float] | None = None
    # Where "auto" caches what its trial found for this machine and run shape, and what an earlier run found.
    verdict_file: Path | None = None
    shape: dict = field(default_factory=dict)
    cached: Verdict | None = None
    threads: int = 1
    helpers: Helpers | None = None
    # KL penalty: per optimizer step, the encoded out-of-domain examples; the frozen chat model for full
    # fine-tuning (None with LoRA, whose reference is the model with its adapters disabled).
    kl_batches: list[list[Encoded]] | None = None
    kl_weight: float = 0.0
    reference: Any = None
    # The dtype full fine-tuning autocasts to over its fp32 weights (None: LoRA, or fp32 compute).
    compute: torch.dtype | None = None
    # The loss scaling of an adapter over an fp16 base (None elsewhere).
    scaler: torch.amp.GradScaler | None = None


def _kl_batches(tokenizer, kl: KLTraining, n_steps: int, train: TrainSpec, seed: int) -> list[list[Encoded]]:
    """Each step's encoded KL examples (only those drawn are tokenized); replies cut off entirely are dropped."""
    plan = plan_kl_batches(len(kl.examples), n_steps, kl.batch_size, seed)
    drawn = sorted({i for step in plan for i in step})
    encoded = {i: encode_example(tokenizer, kl.examples[i], train.max_seq_length) for i in drawn}
    batches = [[encoded[i] for i in step if encoded[i].n_labels] for step in plan]
    cut = sum(not encoded[i].n_labels for i in drawn)
    if cut:
        log.warning(
            "%d of the %d KL examples drawn have no reply left within max_seq_length and are left out: "
            "%d of %d steps have a smaller KL batch, %d none (no KL term; kl is null in its loss row)",
            cut,
            len(drawn),
            sum(len(b) < len(step) for b, step in zip(batches, plan, strict=True)),
            len(plan),
            sum(not b for b in batches),
        )
    return batches


def _prepare(
    model_path, examples, lora: LoraSpec | None, train: TrainSpec, seed: int, device: str, trust: bool, kl
):
    """Tokenize and plan, build the model with a fresh adapter (or all weights trainable), its optimizer and
    schedule, the KL reference where there is one; also the model spec."""
    from transformers import get_scheduler

    tokenizer = load_tokenizer(model_path, trust_remote_code=trust)
    encoded = encode_dataset(tokenizer, examples, train, seed)
    steps = plan_steps([len(e.input_ids) for e in encoded], train, seed)
    torch.manual_seed(seed)
    spec = {
        "model_path": model_path,
        "device": device,
        # Full fine-tuning keeps fp32 weights: bf16 would round away updates of lr x gradient.
        "dtype": pick_dtype(device) if lora is not None else torch.float32,
        "trust_remote_code": trust,
        "lora": lora,
        "longest": max(len(e.input_ids) for e in encoded),
    }
    if lora is None and torch.device(device).type == "cuda":
        # A model too large for the GPU is refused in words here, not by a CUDA out-of-memory error mid-load.
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        check_full_fits(model_facts(Path(model_path)).num_params, kl is not None, total, device)
    model, params = build_model(**spec)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer = adamw(model, params, train.learning_rate, train.weight_decay)
    scheduler = get_scheduler(
        train.lr_scheduler_type, optimizer, num_warmup_steps=train.warmup_steps, num_training_steps=len(steps)
    )
    run = _Run(model, params, optimizer, scheduler, encoded, steps, tokenizer.pad_token_id, seed)
    # Data-parallel helpers sum adapter gradients; a full model's gradients are trained in one process.
    if lora is None:
        run.compute = full_compute_dtype(device)
        run.workers_reason = "full fine-tuning trains in one process"
    elif train.workers == "auto":
        run.max_workers, run.workers_reason = train_workers(train, device, weight_bytes, lora.lora_dropout)
    else:
        run.workers, run.workers_reason = train_workers(train, device, weight_bytes)
    if lora is not None:
        run.scaler = loss_scaler(spec["dtype"], device)
    if kl is not None:
        run.kl_batches = _kl_batches(tokenizer, kl, len(steps), train, seed)
        run.kl_weight = kl.weight_per_token(model.get_output_embeddings().weight.shape[0])
        if lora is None:
            run.reference = frozen_reference(model, model_path, device, spec["dtype"], trust)
    return run, spec


def _start_helpers(run: _Run, spec: dict) -> None:
    """Spawn the data-parallel helpers (workers > 1), each on its share of this process's threads."""
    log.info("training in %d processes", run.workers)
    per_rank = threads_each(run.workers)
    job = {
        "model": spec,
        "encoded": run.encoded,
        "steps": run.steps,
        "pad_id": run.pad_id,
        "threads": per_rank,
        "seed": run.seed,
    }
    run.threads = torch.get_num_threads()
    torch.set_num_threads(per_rank)
    run.helpers = Helpers.start(run.workers, run.params, job)


def _step_tokens(run: _Run, step: int) -> int:
    return sum(len(run.encoded[i].input_ids) for micro in run.steps[step - 1] for i in micro)


def _auto_workers(run: _Run, spec: dict, step: int, seconds: float, first: int) -> None:
    """For "auto", after each step: helpers start once the call's second step, alone, predicts at least
    AUTO_WORKERS_MIN_SECONDS left, unless a cached trial found they do not pay; without one, they stay only if
    their second step runs a token clearly faster (first steps warm up), and that verdict is cached."""
    per_token = seconds / max(1, _step_tokens(run, step))
    if step == first + 1 and step < len(run.steps):
        left = sum(_step_tokens(run, s) for s in range(step + 1, len(run.steps) + 1))
        predicted = per_token * left
        run.workers_reason = (
            f"auto: the steps after step {step} would take about {predicted:.0f} s in one process"
        )
        if predicted < AUTO_WORKERS_MIN_SECONDS:
            run.workers_reason += f", under the {AUTO_WORKERS_MIN_SECONDS:.0f} s helpers need to pay back"
            return
        if run.cached is not None:
            run.workers_reason += f"; an earlier trial on this machine ran {run.cached.words()} (cached)"
            if not run.cached.kept:
                return
        else:
            run.trial = (step, per_token)
        run.workers = run.max_workers
        _start_helpers(run, spec)
    elif run.trial is not None and step == run.trial[0] + 2:
        verdict = Verdict(run.workers, 1e3 * per_token, 1e3 * run.trial[1])
        run.trial = None
        run.workers_reason += f"; step {step} ran in {verdict.words()}"
        if run.verdict_file is not None:
            write_verdict(run.verdict_file, verdict, run.shape)
        if not verdict.kept:
            _stop_helpers(run)


def _find_verdict(run: _Run, spec: dict, train: TrainSpec, cache_dir: Path) -> None:
    """Where "auto" caches its trial's verdict for this run's shape, and the verdict an earlier run cached."""
    step_tokens = sum(_step_tokens(run, s) for s in range(1, len(run.steps) + 1)) // max(1, len(run.steps))
    shape = run_shape(
        spec["model_path"], str(spec["dtype"]), spec["lora"], train, run.max_workers, step_tokens
    )
    run.verdict_file, run.shape = verdict_path(cache_dir, shape), shape
    run.cached = read_verdict(run.verdict_file)


def _stop_helpers(run: _Run) -> None:
    run.helpers.finish()
    run.helpers, run.workers = None, 1
    torch.set_num_threads(run.threads)


def _gradients(run: _Run, step: int) -> tuple[float, int, int]:
    """Backpropagate optimizer step `step` over every rank; returns the summed loss, tokens and labels."""
    batches = [[run.encoded[i] for i in micro] for micro in run.steps[step - 1]]
    n_labels = step_labels(batches)
    helpers = run.helpers
    try:
        if helpers is not None:
            helpers.ensure_alive()
            helpers.group.broadcast_step(step)
            seed_step(run.seed, step, 0)
        loss_sum, tokens = accumulate_gradients(
            run.model,
            step,
            share(batches, 0, run.workers),
            run.pad_id,
            n_labels,
            compute=run.compute,
            scaler=run.scaler,
        )
        if helpers is not None:
            loss_sum, tokens = helpers.group.sum_gradients(loss_sum, tokens)
    except RuntimeError as exc:
        if helpers is None:
            raise
        raise helpers.check(exc) from exc
    return loss_sum, tokens, n_labels


def _kl_gradients(run: _Run, step: int, loss: float) -> float | None:
    """Backpropagate the per-token weight x the step's token-mean KL(chat model || tuned model); returns the KL
    (None without a penalty). Computed in this process only, so the helpers' gradient sum counts it once."""
    if run.kl_batches is None or not run.kl_batches[step - 1]:
        return None
    kl_sum, n = kl_to_reference(run.model, run.reference, run.kl_batches[step - 1], run.pad_id, run.compute)
    kl = kl_sum / n
    if not torch.isfinite(kl):
        raise TrainingDivergedError(step, loss, kl=kl.item())
    backward(run.kl_weight * kl, run.scaler)
    return kl.item()


def _optimizer_step(run: _Run, step: int) -> dict:
    """One optimizer step with divergence checks before the update; returns its loss record (no timing)."""
    loss_sum, tokens, n_labels = _gradients(run, step)
    loss = loss_sum / n_labels
    if not math.isfinite(loss):
        raise TrainingDivergedError(step, loss)
    kl = _kl_gradients(run, step, loss)
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, MAX_GRAD_NORM).item()
    learning_rate = run.scheduler.get_last_lr()[0]
    _update(run, step, loss, grad_norm)
    run.optimizer.zero_grad(set_to_none=True)
    return {
        "step": step,
        "total_steps": len(run.steps),
        "loss": loss,
        "learning_rate": learning_rate,
        "tokens": tokens,
        "grad_norm": grad_norm,
        "kl": kl,
    }


def _update(run: _Run, step: int, loss: float, grad_norm: float) -> None:
    """The optimizer and schedule step; under loss scaling a step whose scaled gradients overflowed is skipped
    and the scale halved (the scaled loss overflowing at a scale of 1 or less is divergence)."""
    if run.scaler is None:
        if not math.isfinite(grad_norm):
            raise TrainingDivergedError(step, loss, grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        return
    if not math.isfinite(grad_norm):
        if run.scaler.get_scale() <= 1.0:
            raise TrainingDivergedError(step, loss, grad_norm)
        log.warning(
            "step %d: fp16 gradients overflowed at loss scale %g; step skipped", step, run.scaler.get_scale()
        )
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if math.isfinite(grad_norm):
        run.scheduler.step()


def train_lora(
    model_path: Path | str,
    examples: Sequence[list[dict]],
    lora: LoraSpec | None,
    train: TrainSpec,
    out_dir: Path,
    *,
    seed: int,
    device: str | None = None,
    on_step: Callable[[dict], None] | None = None,
    trust_remote_code: bool = False,
    kl: KLTraining | None = None,
    cache_dir: Path | None = None,
) -> TrainResult:
    """Train a LoRA adapter (`lora` None: every weight) into out_dir/adapter, resuming from out_dir/checkpoints
    when the run matches; `kl` adds the KL penalty to the chat model."""
    # A compact loop rather than HF Trainer: it lets the loss skip prompt logits, checks every step for
    # divergence before anything is written, and makes checkpoints atomic and tied to a hash of the run.
    out_dir, device = Path(out_dir), device or pick_device()
    run, spec = _prepare(model_path, examples, lora, train, seed, device, trust_remote_code, kl)
    if run.max_workers > 1:
        # `workers: auto` caches what its trial found, by default in the settings' cache.
        _find_verdict(run, spec, train, cache_dir or settings().cache_dir)
    run_hash = training_run_hash(
        model_path, examples, lora, train, seed, spec["dtype"], kl.settings() if kl else None, run.compute
    )
    progress = _resume(out_dir, run, run_hash)
    resumed_from = progress["step"] or None
    # A fully fine-tuned checkpoint is a whole model directory, servable on its own: vLLM reads the tokenizer
    # beside the weights. It is kept in the dtype it is sampled in (half the fp32 bytes); the resumable
    # checkpoints keep fp32.
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code) if lora is None else None
    save_dtype = None if lora is not None else pick_dtype(device)

    def save() -> None:
        # Kept adapter first: a kill before the checkpoint resumes from the previous one and retrains this step.
        keep_adapter(out_dir, run.model, progress, save_dtype, tokenizer)
        save_checkpoint(
            out_dir / CHECKPOINT_DIR, run.model, run.optimizer, run.scheduler, progress, run.scaler
        )

    run_tokens, run_s = _run_steps(run, spec, train, progress, save, on_step)
    adapter_dir = _write_final(run, out_dir, progress["losses"], save_dtype, tokenizer)
    return TrainResult(
        adapter_dir=adapter_dir,
        losses=progress["losses"],
        steps=len(run.steps),
        train_tokens=progress["train_tokens"],
        tokens_per_s=run_tokens / run_s if run_s > 0 else 0.0,
        resumed_from_step=resumed_from,
        workers=run.workers,
        workers_reason=run.workers_reason,
        checkpoints=kept_adapters(out_dir, run_hash),
    )


def _write_final(
    run: _Run, out_dir: Path, losses: list[dict], save_dtype: torch.dtype | None, tokenizer
) -> Path:
    """Write the trained weights (and a full model's tokenizer) to out_dir/adapter and drop the resumable
    checkpoints; each one's trained weights stay in out_dir/checkpoint_adapters."""
    if run.scaler is not None and losses and not any(math.isfinite(r["grad_norm"]) for r in losses):
        # Every step's scaled gradients overflowed and was skipped: the weights are the untrained ones.
        raise TrainingDivergedError(losses[-1]["step"], losses[-1]["loss"], losses[-1]["grad_norm"])
    adapter_dir = write_adapter(run.model, out_dir, save_dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(adapter_dir)
    shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
    return adapter_dir


def _resume(out_dir: Path, run: _Run, run_hash: str) -> dict:
    """The run's progress: from its latest resumable checkpoint (weights and optimizer loaded) or step 0."""
    ckpt_root = out_dir / CHECKPOINT_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    latest = latest_checkpoint(ckpt_root, run_hash)
    kept_adapters(out_dir, run_hash)  # drops adapters kept by a run of another config
    if latest is None:
        return {"run_hash": run_hash, "step": 0, "losses": [], "train_tokens": 0, "elapsed_s": 0.0}
    log.info("resuming training from %s", latest)
    return load_checkpoint(latest, run.model, run.optimizer, run.scheduler, run.scaler)


def _run_steps(
    run: _Run,
    spec: dict,
    train: TrainSpec,
    progress: dict,
    save: Callable[[], None],
    on_step: Callable[[dict], None] | None,
) -> tuple[int, float]:
    """The optimizer steps after `progress`, recorded into it, saving every save_steps; (tokens, seconds) of
    this call. Helper processes are finished, or killed on any failure."""
    start, prior_s = time.perf_counter(), progress["elapsed_s"]
    run_tokens, threads = 0, torch.get_num_threads()
    try:
        if run.workers > 1:
            _start_helpers(run, spec)
        first = progress["step"] + 1
        for step in range(first, len(run.steps) + 1):
            step_start = time.perf_counter()
            record = _optimizer_step(run, step)
            if run.max_workers > 1:
                _auto_workers(run, spec, step, time.perf_counter() - step_start, first)
            run_tokens += record["tokens"]
            record["elapsed_s"] = prior_s + time.perf_counter() - start
            progress["losses"].append(record)
            progress.update(step=step, elapsed_s=record["elapsed_s"])
            progress["train_tokens"] += record["tokens"]
            if on_step is not None:
                on_step(record)
            if step % train.save_steps == 0 and step < len(run.steps):
                save()
        if run.helpers is not None:
            run.helpers.finish()
    except BaseException:
        if run.helpers is not None:
            run.helpers.kill()
        raise
    finally:
        torch.set_num_threads(threads)
    return run_tokens, time.perf_counter() - start
