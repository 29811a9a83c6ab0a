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
    return ModelFacts(
        config.get("model_type", "?"), int(text.get("num_hidden_layers", 0)), params, frozenset(modules)
    )
