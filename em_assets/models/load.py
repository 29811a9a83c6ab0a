"""Loading models and tokenizers onto a device in the dtype it computes fastest in."""

from __future__ import annotations

from pathlib import Path

import torch

from em_assets.models.hub import ModelLoadError
from em_assets.settings import settings

# torch's checks of the CPU instructions that multiply bf16 natively (AVX-512 BF16 and AMX tiles).
NATIVE_BF16_CHECKS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def pick_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX)."""
    return any(getattr(torch.cpu, check, lambda: False)() for check in NATIVE_BF16_CHECKS)


def pick_dtype(device: str, requested: str = "auto") -> torch.dtype:
    """bf16 where the hardware multiplies it natively (CUDA Ampere+, CPUs with AVX-512 BF16 or AMX, where bf16
    matmuls are several times faster than fp32), fp16 on MPS and older GPUs, fp32 on other CPUs."""
    if requested != "auto":
        return getattr(torch, requested)
    kind = torch.device(device).type
    if kind == "cuda":
        # Not emulated bf16, which any CUDA GPU allows and pre-Ampere ones run slowly.
        with torch.cuda.device(device):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float16
    if kind == "mps":
        return torch.float16
    chosen = settings().cpu_dtype
    if chosen != "auto":
        return getattr(torch, chosen)
    # Without those instructions torch runs a bf16 matmul in a fallback loop, slower than fp32 by orders of
    # magnitude (AVX2-only CPUs: docs/cpu.md).
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def dtype_name(device: str | None = None) -> str:
    """The dtype a model loads in on `device` (auto-detected, as load_model does) by name, e.g. "bfloat16"."""
    return str(pick_dtype(device or pick_device())).removeprefix("torch.")


def load_tokenizer(path: Path | str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"{path}: tokenizer has no chat template; em-assets needs an instruct model")
    return tokenizer


def load_model(
    path: Path | str,
    device: str | None = None,
    dtype: torch.dtype | str = "auto",
    trust_remote_code: bool = False,
):
    """Load a causal LM from safetensors only, on `device` (auto-detected), in eval mode."""
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    torch_dtype = pick_dtype(device, dtype) if isinstance(dtype, str) else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load model from {path}: {exc}") from exc
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)
    return model.to(device).eval()


def _contiguous_input(module, args: tuple) -> tuple:
    """Forward pre-hook: the module's first input made contiguous."""
    # transformers slices the hidden states for logits_to_keep. On such a strided 3D input, torch.matmul
    # copies a weight that needs no grad (every merged or frozen model: the judges, the organisms) once per
    # batch row into a bmm, which made the distilled judge several times slower than the plain model.
    return (args[0].contiguous(), *args[1:])


def is_full_model(path: Path | str | None) -> bool:
    """A fully fine-tuned model directory (its own config and weights) rather than a peft adapter."""
    return (
        path is not None
        and (Path(path) / "config.json").exists()
        and not (Path(path) / "adapter_config.json").exists()
    )


def load_organism_model(base: dict, adapter: dict, device: str | None = None):
    """Base model with the organism's adapter merged in (merging keeps sampling at base-model speed), or the
    fully fine-tuned model itself; the tokenizer is `base`'s (a published `model` organism's own, its row
    from organism_model_row)."""
    trust = bool(base["trust_remote_code"])
    tokenizer = load_tokenizer(base["path"], trust_remote_code=trust)
    if is_full_model(adapter.get("adapter_path")):
        return load_model(adapter["adapter_path"], device=device, trust_remote_code=trust), tokenizer
    model = load_model(base["path"], device=device, trust_remote_code=trust)
    if adapter.get("adapter_path"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter["adapter_path"]).merge_and_unload().eval()
    return model, tokenizer
