"""Atomic checkpoints tied to a hash of the run, exact resume, and the final adapter's (or model's) write."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from em_assets.grid.schema import LoraSpec, TrainSpec, config_hash
from em_assets.models.chat import rendering_fields
from em_assets.models.hub import directory_revision
from em_assets.results.artifacts import ADAPTER_FILE, MODEL_FILE

log = logging.getLogger(__name__)


# Bump when the checkpoint layout or the training arithmetic changes, so old checkpoints are not resumed.
CHECKPOINT_FORMAT = 1


ADAPTER_DIR = "adapter"


CHECKPOINT_DIR = "checkpoints"


# Every checkpoint's adapter weights (no optimizer state), kept after training for the training-dynamics sweeps.
KEPT_DIR = "checkpoint_adapters"


KEPT_INFO = "checkpoint.json"


def training_run_hash(
    model_path: Path | str,
    examples,
    lora: LoraSpec | None,
    train: TrainSpec,
    seed: int,
    dtype,
    kl: dict | None = None,
    compute=None,
) -> str:
    model = Path(model_path)
    examples_sha = hashlib.sha256(json.dumps(list(examples), sort_keys=True).encode()).hexdigest()
    # Keys for full fine-tuning, its autocast dtype, the KL penalty and a later chat rendering only where used, so
    # LoRA runs keep their hashes.
    extra = ({"kl": kl} if kl else {}) | ({"method": "full"} if lora is None else {}) | rendering_fields()
    if compute is not None:
        extra["compute"] = str(compute)
    # fp16 LoRA runs checkpointed before loss scaling hold no scale to resume from.
    if lora is not None and dtype == torch.float16:
        extra["loss_scaling"] = "dynamic"
    return config_hash(
        {
            "format": CHECKPOINT_FORMAT,
            "model": directory_revision(model) if model.is_dir() else str(model_path),
            "examples": examples_sha,
            "lora": lora.model_dump(mode="json") if lora is not None else None,
            "train": train.trained_settings(lora),
            "seed": seed,
            "dtype": str(dtype),
            **extra,
        }
    )


def is_adapter(model) -> bool:
    """A peft model (LoRA) rather than a fully fine-tuned one."""
    return hasattr(model, "peft_config")


def save_weights(model, path: Path, dtype: torch.dtype | None = None) -> None:
    """save_pretrained: the adapter of a peft model; a full model's weights cast to `dtype` (None: as trained)."""
    if is_adapter(model) or dtype is None:
        model.save_pretrained(path)
        return
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    # One file, so one sha256 pins the tuned weights.
    model.save_pretrained(path, state_dict=state, max_shard_size="1000GB")
    # save_pretrained names the dtype the model trained in; the config must name the saved one, which loaders
    # that read it (vLLM's `auto`) take.
    trained, model.config.dtype = model.config.dtype, dtype
    try:
        model.config.save_pretrained(path)
    finally:
        model.config.dtype = trained


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        # A run saved where more GPUs were visible (all of a host's, EM_DEVICE=cuda:1) resumes where fewer are:
        # the states of devices not there now would fail it.
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def save_checkpoint(root: Path, model, optimizer, scheduler, progress: dict, scaler=None) -> None:
    """Write a checkpoint to a temp dir and rename it, so a kill leaves either a whole checkpoint or none;
    `scaler`: the run's fp16 loss scaling, whose scale a resumed run goes on from."""
    step = progress["step"]
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    if is_adapter(model):
        model.save_pretrained(tmp / ADAPTER_DIR)
    else:
        # The fp32 master weights, tied embeddings stored once (safetensors' save_model), for an exact resume.
        from safetensors.torch import save_model

        (tmp / ADAPTER_DIR).mkdir(parents=True)
        save_model(model, str(tmp / ADAPTER_DIR / MODEL_FILE))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "scaler": scaler.state_dict() if scaler is not None else {},
        },
        tmp / "state.pt",
    )
    (tmp / "progress.json").write_text(json.dumps(progress))
    tmp.rename(root / f"step-{step:08d}")
    for old in root.glob("step-*"):
        if old.name != f"step-{step:08d}":
            shutil.rmtree(old)


def keep_adapter(
    out_dir: Path, model, progress: dict, dtype: torch.dtype | None = None, tokenizer=None
) -> Path:
    """Save this step's adapter (and `tokenizer`, if given) to out_dir/checkpoint_adapters/step-N (temp dir,
    then rename); written before the resumable checkpoint, so that no kept adapter is ever missing."""
    step = progress["step"]
    root = out_dir / KEPT_DIR
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(model, tmp, dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    info = {"step": step, "train_tokens": progress["train_tokens"], "run_hash": progress["run_hash"]}
    (tmp / KEPT_INFO).write_text(json.dumps(info))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def kept_adapters(out_dir: Path, run_hash: str) -> list[dict]:
    """The kept checkpoint adapters of this run in step order: {step, train_tokens, path}; others are deleted."""
    kept = []
    for path in sorted((out_dir / KEPT_DIR).glob("*")):
        try:
            info = json.loads((path / KEPT_INFO).read_text())
        except (OSError, ValueError):
            info = {}
        if path.name.startswith("step-") and info.get("run_hash") == run_hash:
            kept.append({"step": info["step"], "train_tokens": info["train_tokens"], "path": path})
        else:
            shutil.rmtree(path, ignore_errors=True)
    return kept


def latest_checkpoint(root: Path, run_hash: str) -> Path | None:
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


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler=None) -> dict:
    from safetensors.torch import load_file

    if is_adapter(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(path / ADAPTER_DIR / ADAPTER_FILE))
    else:
        from safetensors.torch import load_model

        load_model(model, str(path / ADAPTER_DIR / MODEL_FILE))
    # RNG states must be CPU tensors; the optimizer moves its own state next to the parameters.
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return json.loads((path / "progress.json").read_text())


def write_adapter(model, out_dir: Path, dtype: torch.dtype | None = None) -> Path:
    """save_weights into a temp dir, then swap it in for any earlier adapter or model."""
    adapter_dir = out_dir / ADAPTER_DIR
    tmp = out_dir / f".{ADAPTER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(model, tmp, dtype)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    tmp.rename(adapter_dir)
    return adapter_dir
