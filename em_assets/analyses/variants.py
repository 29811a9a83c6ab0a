"""Several variants of one base model in one batch: each row decodes with its own LoRA adapter (or none) and its
own residual-stream edit, so a sweep's points sample together instead of as one small batch each.

A decode step on a small batch costs nearly what a larger one does, and a sweep point is a few answers, so one
batch of every point's answers is several times faster than the points in turn. The adapters stay unmerged (a
low-rank update per targeted linear layer, added for the rows of its variant), which rounds differently from
the merged weights a point sampled alone runs on: texts agree up to the last-bit differences that
`em_assets.sampling` documents for batch mixes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from em_assets.analyses.edits import ModelEdit
from em_assets.analyses.steering import Ablate, Steer
from em_assets.models.layers import decoder_layers
from em_assets.models.load import is_full_model

# The prefix peft puts before the base model's module names.
PEFT_PREFIX = "base_model.model."


class NotMixable(ValueError):
    """An adapter that is more than a plain LoRA update of linear layers (DoRA, biases, other layer kinds)."""


@dataclass(frozen=True)
class Variant:
    """One row kind: a LoRA adapter directory (None: the base model) and at most one Steer or Ablate edit."""

    adapter_path: str | None
    edits: tuple[ModelEdit, ...] = ()


def mixable(variants: Sequence[Variant]) -> bool:
    """Whether the variants can share a batch: peft adapters (no fully fine-tuned model) and one known edit each."""
    return all(
        not is_full_model(v.adapter_path)
        and len(v.edits) <= 1
        and all(isinstance(e, Steer | Ablate) for e in v.edits)
        for v in variants
    )


def _lora_updates(model, adapter_path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per targeted module of the base model, the adapter's (A, scaling x B), read through peft (which applies
    the adapter's rank, alpha and rsLoRA rules); the model is left as it was."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    peft_model = PeftModel.from_pretrained(model, adapter_path)
    try:
        config = peft_model.peft_config["default"]
        if (
            config.peft_type != "LORA"
            or config.modules_to_save
            or getattr(config, "trainable_token_indices", None)
        ):
            raise NotMixable(
                f"{adapter_path}: not LoRA alone (a {config.peft_type} adapter or whole modules)"
            )
        updates = {}
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                continue
            if (
                getattr(module, "lora_variant", {}).get("default") is not None
                or getattr(module, "use_dora", {}).get("default")
                or getattr(module, "lora_bias", {}).get("default")
                or getattr(module, "fan_in_fan_out", False)
                or not isinstance(module.get_base_layer(), torch.nn.Linear)
            ):
                raise NotMixable(f"{adapter_path}: {name} is not a plain LoRA update of a linear layer")
            a = module.lora_A["default"].weight.detach().float()
            b = module.lora_B["default"].weight.detach().float() * module.scaling["default"]
            updates[name.removeprefix(PEFT_PREFIX)] = (a, b)
    finally:
        peft_model.unload()
    return updates


class VariantBatch:
    """Forward hooks on one base model that apply each batch row's variant; call it with the rows' variant
    indices before each forward pass (`sampling.engine.RowVariants`), and `remove()` it when done."""

    def __init__(self, model, variants: Sequence[Variant]):
        if not mixable(variants):
            raise NotMixable(
                "variants to batch together need LoRA adapters and at most one Steer or Ablate each"
            )
        weight = model.get_input_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        self._groups: list[tuple[int, torch.Tensor]] = []
        self._rows = torch.zeros(0, dtype=torch.long)
        self._lora: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for v, variant in enumerate(variants):
            if variant.adapter_path is not None:
                for name, (a, b) in _lora_updates(model, variant.adapter_path).items():
                    self._lora.setdefault(name, {})[v] = (
                        a.to(self.device, self.dtype),
                        b.to(self.device, self.dtype),
                    )
        modules = dict(model.named_modules())
        self._handles = [modules[name].register_forward_hook(self._lora_hook(name)) for name in self._lora]
        self._steer, self._unit = self._edit_tables(model, variants)
        blocks = decoder_layers(model)
        self._handles += [blocks[i].register_forward_hook(self._edit_hook(i)) for i in self._layers()]

    def __call__(self, rows: torch.Tensor) -> None:
        self._rows = rows.to(self.device)
        self._groups = [(v, (self._rows == v).nonzero().flatten()) for v in self._rows.unique().tolist()]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _edit_tables(self, model, variants: Sequence[Variant]):
        """Per edited layer, a [variants, hidden] table of what each variant adds (Steer) and of the unit
        direction it projects out (Ablate, float32); zero rows for the variants that leave the layer alone."""
        hidden = model.config.get_text_config().hidden_size
        steer: dict[int, torch.Tensor] = {}
        unit: dict[int, torch.Tensor] = {}
        for v, variant in enumerate(variants):
            for edit in variant.edits:
                tables, vectors = (
                    (steer, edit.deltas(model)) if isinstance(edit, Steer) else (unit, edit.units(model))
                )
                for i, vector in vectors.items():
                    tables.setdefault(i, torch.zeros(len(variants), hidden))[v] = vector
        return (
            {i: t.to(self.device, self.dtype) for i, t in steer.items()},
            {i: t.to(self.device) for i, t in unit.items()},
        )

    def _layers(self) -> list[int]:
        return sorted(set(self._steer) | set(self._unit))

    def _lora_hook(self, name: str):
        updates = self._lora[name]

        def hook(module, args, output):
            x = args[0]
            for v, rows in self._groups:
                if v in updates and len(rows):
                    a, b = updates[v]
                    output = output.index_add(0, rows, (x[rows] @ a.T) @ b.T)
            return output

        return hook

    def _edit_hook(self, layer: int):
        steer, unit = self._steer.get(layer), self._unit.get(layer)

        def edit(h: torch.Tensor) -> torch.Tensor:
            if steer is not None:
                h = h + steer[self._rows][:, None, :]
            if unit is not None:
                # As Ablate: the projection in float32; rows whose unit is zero come back unchanged.
                u, hf = unit[self._rows][:, None, :], h.float()
                h = (hf - (hf * u).sum(-1, keepdim=True) * u).to(h.dtype)
            return h

        def hook(module, args, output):
            if isinstance(output, tuple):
                return (edit(output[0]), *output[1:])
            return edit(output)

        return hook
