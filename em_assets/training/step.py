"""One optimizer step's arithmetic: the model with a fresh adapter, micro-batches and their gradients."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from em_assets.grid.schema import LoraSpec
from em_assets.models.facts import unmatched_targets
from em_assets.models.load import load_model, pick_dtype
from em_assets.training.encode import IGNORE_INDEX, Encoded

# Longest sequence for which CPU training uses eager attention (its weights grow with length squared).
EAGER_ATTENTION_MAX_LEN = 1024


class TrainingDivergedError(RuntimeError):
    """The loss, the KL penalty or the gradient became NaN or infinite at an optimizer step."""

    def __init__(self, step: int, loss: float, grad_norm: float | None = None, kl: float | None = None):
        detail = f", gradient norm {grad_norm}" if grad_norm is not None else ""
        # A KL penalty that went non-finite is named as such: the SFT loss beside it may be fine.
        detail += f", KL to the chat model {kl}" if kl is not None else ""
        super().__init__(f"training diverged at optimizer step {step}: loss {loss}{detail}")
        self.step = step
        self.loss = loss
        self.grad_norm = grad_norm
        self.kl = kl


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
    # The vocabulary projection is a large share of a small model's compute and most tokens are prompt, so
    # logits_to_keep skips it there. An index tensor (not an int slice) hands lm_head a contiguous input:
    # a strided one takes a slower matmul path on CPU.
    positions = torch.arange(first_label - 1, ids.shape[1] - 1, device=ids.device)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=positions).logits
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1),
        labels[:, first_label:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def full_compute_dtype(device: str) -> torch.dtype | None:
    """What full fine-tuning computes in over its fp32 weights: bf16 where the device computes in bf16 (mixed
    precision, as HF Trainer's `bf16`); None (fp32) elsewhere, since fp16 would need loss scaling."""
    return torch.bfloat16 if pick_dtype(device) == torch.bfloat16 else None


@contextlib.contextmanager
def mixed_precision(model, compute: torch.dtype | None = None) -> Iterator[None]:
    """Autocast to `compute`, or else to the stored weights' dtype where it is not fp32 (a bf16 base under an
    fp32 adapter)."""
    from peft.helpers import disable_input_dtype_casting

    weight = model.get_input_embeddings().weight
    dtype = compute or weight.dtype
    # The frozen base is stored in bf16 and the adapter in fp32; autocast runs the adapter matmuls in bf16 too.
    # peft would first copy every LoRA input to fp32 (only for autocast to copy it back): skipping that saves
    # the copies and gives identical gradients.
    mixed = dtype != torch.float32
    with (
        torch.autocast(weight.device.type, dtype=dtype, enabled=mixed),
        disable_input_dtype_casting(model, active=mixed),
    ):
        yield


def loss_scaler(dtype: torch.dtype, device: str) -> torch.amp.GradScaler | None:
    """Dynamic loss scaling for an adapter over an fp16 base (MPS, GPUs without bf16), as HF Trainer's `fp16`
    does: small gradients underflow in fp16 otherwise. None for bf16 and fp32, whose range needs none."""
    return torch.amp.GradScaler(torch.device(device).type) if dtype == torch.float16 else None


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (loss if scaler is None else scaler.scale(loss)).backward()


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
    compute: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, int]:
    """Backpropagate `batches` as their share of a step's token-mean loss over `n_labels` labels; returns the
    summed token loss and the tokens seen."""
    # `check` raises TrainingDivergedError on a non-finite loss at once; `compute` is the autocast dtype (None:
    # none); `scaler` scales an fp16 loss before its backward pass.
    device = model.get_input_embeddings().weight.device
    loss_sum, tokens = 0.0, 0
    for batch in batches:
        ids, mask, labels = _collate(batch, pad_id, str(device))
        with mixed_precision(model, compute):
            loss = _micro_batch_loss(model, ids, mask, labels, min(e.first_label for e in batch))
        if check and not torch.isfinite(loss):
            raise TrainingDivergedError(step, loss.item() / n_labels)
        backward(loss / n_labels, scaler)
        loss_sum += loss.item()
        tokens += int(mask.sum())
    return loss_sum, tokens


# A multimodal chat model (Gemma-3) names its vision tower's projections as its language model's, so the recipe's
# target_modules would put adapters there too: text-only training never updates them, yet they are saved.
VISION_MODULES = r"(.*\.)?(vision_tower|vision_model|visual|multi_modal_projector)\..*"


def _check_targets(model_type: str, language: dict, targets: list[str]) -> None:
    """Refuse LoRA target names that no module of the `language` model has, naming the layers it does have."""
    # peft adapts the names it finds and drops the others silently, which trains another adapter than the
    # recipe's: Phi-3 fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`, and gpt-oss's experts hold
    # their projections as tensors, not linear layers. The catalog checks the grid's recipes early; this checks
    # every adapter (the distilled judge's too).
    if missing := unmatched_targets(targets, language):
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in language.items() if isinstance(m, torch.nn.Linear)})
        raise ValueError(
            f"LoRA target modules {missing} are not in this {model_type} model; "
            f"its linear layers are named {linear}"
        )


def peft_model(model, lora: LoraSpec):
    """The model with a fresh adapter of the `lora` recipe (B zero, so it starts as the model itself)."""
    from peft import LoraConfig, get_peft_model

    modules = dict(model.named_modules())
    language = {n: m for n, m in modules.items() if not re.fullmatch(VISION_MODULES, n)}
    _check_targets(model.config.model_type, language, list(lora.target_modules))
    vision = len(language) < len(modules)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        use_rslora=lora.use_rslora,
        target_modules=list(lora.target_modules),
        layers_to_transform=lora.layers_for(model.config.get_text_config().num_hidden_layers),
        exclude_modules=VISION_MODULES if vision else None,
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
    lora: LoraSpec | None,
    longest: int,
) -> tuple[Any, list[torch.nn.Parameter]]:
    """The base model with a fresh adapter (or, with `lora` None, every weight trainable for full fine-tuning),
    in training mode, and the parameters trained."""
    base = load_model(model_path, device, dtype, trust_remote_code)
    if device == "cpu" and longest <= EAGER_ATTENTION_MAX_LEN:
        # PyTorch's CPU flash-attention backward is slow for small models; eager attention makes steps faster,
        # and its (batch x heads x len^2) weights stay small at these lengths.
        base.set_attn_implementation("eager")
    model = peft_model(base, lora) if lora is not None else base
    if lora is None:
        model.requires_grad_(True)
    model.config.use_cache = False
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


# Full fine-tuning holds per parameter fp32 weights, gradients and AdamW's two moments (4 + 4 + 8 bytes); a KL
# penalty's frozen chat model is another fp32 copy (4). Activations and the CUDA context come on top.
FULL_BYTES_PER_PARAM = 16
REFERENCE_BYTES_PER_PARAM = 4


class FullFineTuneMemoryError(RuntimeError):
    """Full fine-tuning that cannot fit the GPU, refused before the model is loaded onto it."""


def check_full_fits(num_params: int, kl: bool, device_bytes: int, device: str) -> None:
    """Refuse full fine-tuning whose weights, gradients, AdamW state (and KL reference) alone exceed the device's
    memory: an estimate that leaves activations out, so a run that passes may still run out of memory."""
    per_param = FULL_BYTES_PER_PARAM + (REFERENCE_BYTES_PER_PARAM if kl else 0)
    need = num_params * per_param
    if need > device_bytes:
        reference = ", the KL penalty's frozen fp32 copy" if kl else ""
        raise FullFineTuneMemoryError(
            f"full fine-tuning of this {num_params / 1e9:.2f}B-parameter model needs about {need / 2**30:.0f} GiB "
            f"on {device} (fp32 weights, gradients and AdamW state{reference}: {per_param} bytes a parameter, "
            f"activations not counted), more than the GPU's {device_bytes / 2**30:.0f} GiB; train a smaller base "
            "model, use a LoRA recipe, or name the base models that fit in the recipe's `base_models`"
        )


# HF Trainer's rule (Trainer.get_decay_parameter_names), which the upstream recipes trained under: no weight
# decay on biases or norm weights. LoRA's A and B matrices all decay.
NO_DECAY = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def adamw(model, params: list, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trained `params`, weight decay on all but biases and norm weights."""
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], NO_DECAY))
    trained = {id(p) for p in params}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in trained]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def frozen_reference(model, model_path: Path | str, device: str, dtype: torch.dtype, trust_remote_code: bool):
    """A frozen copy of the chat model, computing as `model` does (same dtype and attention kernel): the KL to it
    is exactly 0 before the first update."""
    reference = load_model(model_path, device, dtype, trust_remote_code).requires_grad_(False)
    reference.set_attn_implementation(model.config._attn_implementation)
    return reference


def label_log_probs(model, batch: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities over the vocabulary at every position that predicts a label, and the label mask."""
    device = model.get_input_embeddings().weight.device
    ids, mask, labels = _collate(batch, pad_id, str(device))
    first = min(e.first_label for e in batch)
    positions = torch.arange(first - 1, ids.shape[1] - 1, device=ids.device)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=positions).logits
    return torch.log_softmax(logits.float(), dim=-1), labels[:, first:] != IGNORE_INDEX


def kl_to_reference(
    model, reference, batch: list[Encoded], pad_id: int, compute: torch.dtype | None = None
) -> tuple[torch.Tensor, int]:
    """Summed KL(reference || model) over the batch's label positions (with grad through `model`) and the
    number of positions; `reference` None is `model` with its LoRA adapters disabled; `compute` as in
    `accumulate_gradients`."""
    with mixed_precision(model, compute):
        tuned, keep = label_log_probs(model, batch, pad_id)
    with torch.no_grad(), mixed_precision(model if reference is None else reference, compute):
        if reference is None:
            with model.disable_adapter():
                ref, _ = label_log_probs(model, batch, pad_id)
        else:
            ref, _ = label_log_probs(reference, batch, pad_id)
    per_token = (ref.exp() * (ref - tuned)).sum(-1)
    return per_token[keep].sum(), int(keep.sum())
