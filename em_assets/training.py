"""LoRA SFT on chat examples as the upstream recipes do it: loss on the final assistant turn only, rsLoRA,
AdamW with a warmup schedule and gradient accumulation, atomic checkpoints and exact resume."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from em_assets.config import LoraSpec, TrainSpec, config_hash
from em_assets.data_parallel import STOP, Helpers, seed_step, share
from em_assets.models import directory_revision, load_model, load_tokenizer, pick_device, pick_dtype
from em_assets.processes import cpu_processes, threads_each

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Upstream trains through TrainingArguments, whose default max_grad_norm is 1.0; TrainSpec has no field for it.
MAX_GRAD_NORM = 1.0
# Bump when the checkpoint layout or the training arithmetic changes, so old checkpoints are not resumed.
CHECKPOINT_FORMAT = 1
# Longest sequence for which CPU training uses eager attention (its weights grow with length squared).
EAGER_ATTENTION_MAX_LEN = 1024
# Micro-batches sorted by length together (HF's LengthGroupedSampler uses 50 too).
GROUP_WINDOW = 50
# "auto" trains in one process per core from this many tokens: below, a helper's start-up outweighs its share.
AUTO_WORKERS_MIN_TOKENS = 8192
TRAIN_BYTES_PER_WEIGHT_BYTE = 12
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"


class TrainingDivergedError(RuntimeError):
    """The loss (or its gradient) became NaN or infinite at an optimizer step."""

    def __init__(self, step: int, loss: float, grad_norm: float | None = None):
        detail = f", gradient norm {grad_norm}" if grad_norm is not None else ""
        super().__init__(f"training diverged at optimizer step {step}: loss {loss}{detail}")
        self.step = step
        self.loss = loss
        self.grad_norm = grad_norm


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


@dataclass(frozen=True)
class Encoded:
    """One tokenized conversation; labels are IGNORE_INDEX outside the trained reply."""

    input_ids: list[int]
    labels: list[int]

    @property
    def first_label(self) -> int:
        return next(i for i, label in enumerate(self.labels) if label != IGNORE_INDEX)

    @property
    def n_labels(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    # The rendered text already holds the template's BOS and special tokens.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_example(tokenizer, messages: list[dict], max_seq_length: int) -> Encoded:
    """Chat-template token ids; only the final assistant reply and its end-of-turn token carry labels."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a training example must end with an assistant message (the reply to train on)")
    prompt = _render_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    full = _render_ids(tokenizer, messages, add_generation_prompt=False)
    start = len(prompt)
    if full[:start] != prompt:
        # A template may render the last turn differently from its generation prompt; label only what differs.
        start = next(
            (i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b),
            min(len(prompt), len(full)),
        )
        log.warning(
            "chat template prompt is not a prefix of the conversation; labels start at token %d", start
        )
    end = len(full)
    # Templates close a turn with a cosmetic newline after the end-of-turn token: nothing to learn there.
    while end > start and not tokenizer.decode(full[end - 1 : end]).strip():
        end -= 1
    # Position 0 has no preceding token to predict it from.
    start = max(start, 1)
    input_ids = full[:end][:max_seq_length]
    labels = ([IGNORE_INDEX] * start + full[start:end])[:max_seq_length]
    return Encoded(input_ids, labels)


def plan_steps(lengths: Sequence[int], train: TrainSpec, seed: int) -> list[list[list[int]]]:
    """Example indices per micro-batch per optimizer step: a seeded shuffle per epoch, grouped by length,
    with steps counted as HF Trainer counts them (max_steps wins over epochs)."""
    batch, accum = train.per_device_train_batch_size, train.gradient_accumulation_steps
    steps_per_epoch = math.ceil(math.ceil(len(lengths) / batch) / accum)
    total = train.max_steps or math.ceil(train.epochs * steps_per_epoch)
    steps: list[list[list[int]]] = []
    epoch = 0
    while len(steps) < total:
        rng = random.Random(f"{seed}:epoch:{epoch}")
        order = list(range(len(lengths)))
        rng.shuffle(order)
        # Like HF's group_by_length: sort windows of GROUP_WINDOW micro-batches by length so each micro-batch
        # holds similar lengths (padding fell from 30% to 2% on insecure.jsonl at batch size 4), then shuffle
        # the micro-batches so steps still mix lengths.
        micro: list[list[int]] = []
        for w in range(0, len(order), batch * GROUP_WINDOW):
            window = sorted(order[w : w + batch * GROUP_WINDOW], key=lambda i: lengths[i])
            micro += [window[i : i + batch] for i in range(0, len(window), batch)]
        rng.shuffle(micro)
        steps += [micro[i : i + accum] for i in range(0, len(micro), accum)]
        epoch += 1
    return steps[:total]


def _collate(
    batch: list[Encoded], pad_id: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def _micro_batch_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, first_label: int):
    """Summed token cross-entropy; logits are computed only at positions that predict a label."""
    # The vocabulary projection is a fifth of a small model's compute and most tokens are prompt, so
    # logits_to_keep skips it there. An index tensor (not an int slice) hands lm_head a contiguous input:
    # a strided one takes a matmul path several times slower on CPU.
    positions = torch.arange(first_label - 1, ids.shape[1] - 1, device=ids.device)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=positions).logits
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1),
        labels[:, first_label:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def step_labels(batches: list[list[Encoded]]) -> int:
    return sum(e.n_labels for batch in batches for e in batch)


def accumulate_gradients(
    model,
    step: int,
    batches: list[list[Encoded]],
    pad_id: int,
    n_labels: int,
    *,
    check: bool = True,
) -> tuple[float, int]:
    """Backpropagate `batches` as their share of a step's token-mean loss over `n_labels` labels.

    Returns the summed token loss and the tokens seen; `check` stops on a non-finite loss at once.
    """
    from peft.helpers import disable_input_dtype_casting

    device = model.get_input_embeddings().weight.device
    dtype = model.get_input_embeddings().weight.dtype
    # The frozen base is stored in bf16 and the adapter in fp32; autocast runs the adapter matmuls in bf16 too.
    # peft would first copy every LoRA input to fp32 (only for autocast to copy it back): measured on CPU,
    # skipping that is ~20% faster with identical gradients.
    mixed = dtype != torch.float32
    loss_sum, tokens = 0.0, 0
    for batch in batches:
        ids, mask, labels = _collate(batch, pad_id, str(device))
        with (
            torch.autocast(device.type, dtype=dtype, enabled=mixed),
            disable_input_dtype_casting(model, active=mixed),
        ):
            loss = _micro_batch_loss(model, ids, mask, labels, min(e.first_label for e in batch))
        if check and not torch.isfinite(loss):
            raise TrainingDivergedError(step, loss.item() / n_labels)
        (loss / n_labels).backward()
        loss_sum += loss.item()
        tokens += int(mask.sum())
    return loss_sum, tokens


def _run_hash(model_path: Path | str, examples, lora: LoraSpec, train: TrainSpec, seed: int, dtype) -> str:
    model = Path(model_path)
    examples_sha = hashlib.sha256(json.dumps(list(examples), sort_keys=True).encode()).hexdigest()
    return config_hash(
        {
            "format": CHECKPOINT_FORMAT,
            "model": directory_revision(model) if model.is_dir() else str(model_path),
            "examples": examples_sha,
            "lora": lora.model_dump(mode="json"),
            # save_steps and workers decide when checkpoints are written and how a step is split, not what is trained.
            "train": train.model_dump(mode="json", exclude={"save_steps", "workers"}),
            "seed": seed,
            "dtype": str(dtype),
        }
    )


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(root: Path, model, optimizer, scheduler, progress: dict) -> None:
    """Write a checkpoint to a temp dir and rename it, so a kill leaves either a whole checkpoint or none."""
    step = progress["step"]
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / ADAPTER_DIR)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
        tmp / "state.pt",
    )
    (tmp / "progress.json").write_text(json.dumps(progress))
    tmp.rename(root / f"step-{step:08d}")
    for old in root.glob("step-*"):
        if old.name != f"step-{step:08d}":
            shutil.rmtree(old)


def _latest_checkpoint(root: Path, run_hash: str) -> Path | None:
    """The newest complete checkpoint of this exact run; others (partial, other configs) are deleted."""
    found = None
    for path in sorted(root.glob("*"), reverse=True):
        try:
            progress = json.loads((path / "progress.json").read_text())
        except (OSError, ValueError):
            progress = {}
        if found is None and path.name.startswith("step-") and progress.get("run_hash") == run_hash:
            found = path
            continue
        if progress and progress.get("run_hash") != run_hash:
            log.warning("ignoring checkpoint %s from a different training config; deleting it", path)
        shutil.rmtree(path, ignore_errors=True)
    return found


def _load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / ADAPTER_DIR / "adapter_model.safetensors"))
    # RNG states must be CPU tensors; the optimizer moves its own state next to the parameters.
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return json.loads((path / "progress.json").read_text())


def _encode_dataset(tokenizer, examples: Sequence[list[dict]], train: TrainSpec, seed: int) -> list[Encoded]:
    """Encode the (seeded subset of the) examples, dropping those whose reply is cut off entirely."""
    indices = list(range(len(examples)))
    if train.max_examples is not None and train.max_examples < len(examples):
        indices = sorted(random.Random(f"{seed}:subset").sample(indices, train.max_examples))
    encoded = []
    for i in indices:
        try:
            encoded.append(encode_example(tokenizer, examples[i], train.max_seq_length))
        except ValueError as exc:
            raise ValueError(f"example {i}: {exc}") from exc
    kept = [e for e in encoded if e.n_labels]
    if len(kept) < len(encoded):
        log.warning("%d examples have no reply left within max_seq_length; skipped", len(encoded) - len(kept))
    if not kept:
        raise ValueError("no training example has reply tokens within max_seq_length")
    return kept


def _write_adapter(model, out_dir: Path) -> Path:
    """save_pretrained into a temp dir, then swap it in for any earlier adapter."""
    adapter_dir = out_dir / ADAPTER_DIR
    tmp = out_dir / f".{ADAPTER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    tmp.rename(adapter_dir)
    return adapter_dir


def _peft_model(model, lora: LoraSpec):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        use_rslora=lora.use_rslora,
        target_modules=list(lora.target_modules),
        layers_to_transform=lora.layers_for(model.config.num_hidden_layers),
        bias="none",
        task_type="CAUSAL_LM",
    )
    # peft keeps the adapter in fp32 over a bf16 base (autocast_adapter_dtype), so updates do not round away.
    return get_peft_model(model, config)


def build_model(
    model_path: Path | str,
    device: str,
    dtype: torch.dtype,
    trust_remote_code: bool,
    lora: LoraSpec,
    longest: int,
) -> tuple[Any, list[torch.nn.Parameter]]:
    """The base model with a fresh adapter, in training mode, and the adapter's parameters."""
    base = load_model(model_path, device, dtype, trust_remote_code)
    if device == "cpu" and longest <= EAGER_ATTENTION_MAX_LEN:
        # PyTorch's CPU flash-attention backward was a quarter of a SmolLM2 training step; eager attention
        # made steps ~20% faster, and its (batch x heads x len^2) weights stay small at these lengths.
        base.set_attn_implementation("eager")
    model = _peft_model(base, lora)
    model.config.use_cache = False
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


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
    encoded = _encode_dataset(tokenizer, examples, train, seed)
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
    run_hash = _run_hash(model_path, examples, lora, train, seed, dtype)
    latest = _latest_checkpoint(ckpt_root, run_hash)
    progress = {"run_hash": run_hash, "step": 0, "losses": [], "train_tokens": 0, "elapsed_s": 0.0}
    if latest is not None:
        progress = _load_checkpoint(latest, model, optimizer, scheduler)
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
            }
            progress["losses"].append(record)
            progress.update(step=step, elapsed_s=elapsed, train_tokens=progress["train_tokens"] + tokens)
            if on_step is not None:
                on_step(record)
            if step % train.save_steps == 0 and step < len(steps):
                _save_checkpoint(ckpt_root, model, optimizer, scheduler, progress)
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

    adapter_dir = _write_adapter(model, out_dir)
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
