"""LoRA adapter files as data: A and B per adapted module, and copies with B scaled (Turner et al.'s
behavioural phase transition), written as ordinary peft adapters so every sampling backend loads them."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np

from em_assets.results.artifacts import ADAPTER_FILE, private_tmp

CONFIG_FILE = "adapter_config.json"


# An embedding layer's factors are saved as lora_embedding_A and lora_embedding_B, without ".weight".
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?:(?P<part>[AB])\.weight|embedding_(?P<emb>[AB]))$"
)


def lora_factors(adapter_dir: Path | str) -> dict[str, dict[str, np.ndarray]]:
    """{module: {"A": (r, in), "B": (out, r)}} as float64 arrays, from an adapter directory."""
    # Through torch: numpy has no bfloat16, the dtype adapters trained on CPU are saved in.
    from safetensors.torch import load_file

    tensors = {k: v.double().numpy() for k, v in load_file(str(Path(adapter_dir) / ADAPTER_FILE)).items()}
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _LORA_KEY.match(key)
        if match:
            part = match["part"] or match["emb"]
            out.setdefault(match["module"], {})[part] = np.asarray(value, dtype=np.float64)
    incomplete = sorted(m for m, parts in out.items() if set(parts) != {"A", "B"})
    if not out or incomplete:
        raise ValueError(f"{adapter_dir}: no complete LoRA A/B pairs (incomplete: {incomplete})")
    return out


def write_scaled_adapter(adapter_dir: Path | str, factor: float, out_dir: Path | str) -> Path:
    """A copy of the adapter with every lora_B multiplied by `factor`, written atomically to out_dir."""
    from safetensors.torch import load_file, save_file

    src, out = Path(adapter_dir), Path(out_dir)
    tensors = load_file(str(src / ADAPTER_FILE))
    scaled = {k: v * factor if _is_b(k) else v for k, v in tensors.items()}
    if not any(_is_b(k) for k in tensors):
        raise ValueError(f"{src}: no lora_B weights to scale")
    tmp = private_tmp(out, "")
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in scaled.items()}, str(tmp / ADAPTER_FILE), {"format": "pt"})
        shutil.copy(src / CONFIG_FILE, tmp / CONFIG_FILE)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _is_b(key: str) -> bool:
    match = _LORA_KEY.match(key)
    return bool(match) and "B" in (match["part"], match["emb"])
