"""What a model folder holds, read from its config and safetensors headers without loading the weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from em_assets.models.hub import ModelLoadError


@dataclass(frozen=True)
class ModelFacts:
    """What the catalog records of a base model, read from config and safetensors headers without loading."""

    model_type: str
    num_layers: int
    num_params: int
    # Modules with weights (a weight's name without its last part), which LoRA target_modules must match.
    modules: frozenset[str]


def unmatched_targets(targets: list[str], modules) -> list[str]:
    """The LoRA target names that match none of the `modules` names as peft matches them (a module name or its
    dotted tail)."""
    return [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]


def model_facts(path: Path) -> ModelFacts:
    from safetensors import SafetensorError, safe_open

    config = json.loads((path / "config.json").read_text())
    text = config.get("text_config", config)
    params, modules = 0, set()
    for file in path.glob("*.safetensors"):
        try:
            with safe_open(file, "pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    n = 1
                    for d in fh.get_slice(name).get_shape():
                        n *= d
                    params += n
                    modules.add(name.rsplit(".", 1)[0])
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{file}: unreadable safetensors weights ({exc})") from exc
    return ModelFacts(config.get("model_type", "?"), _num_layers(path, text), params, frozenset(modules))


# What configs call their decoder's layer count (Llama and most; GPT-2, Falcon and Bloom; MPT; others).
LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")


def _num_layers(path: Path, text: dict) -> int:
    """The decoder's layer count: from config.json, else from transformers' config class, whose defaults fill
    what a multimodal config's text_config leaves out; never a silent 0, which would make layer fractions -1."""
    found = next((int(text[k]) for k in LAYER_KEYS if text.get(k)), 0)
    if not found:
        from transformers import AutoConfig

        try:
            found = int(AutoConfig.from_pretrained(path).get_text_config().num_hidden_layers or 0)
        except (OSError, ValueError, AttributeError):
            found = 0
    if found < 1:
        raise ModelLoadError(f"{path / 'config.json'}: no decoder layer count ({', '.join(LAYER_KEYS)})")
    return found
