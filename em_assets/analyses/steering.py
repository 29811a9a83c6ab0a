"""Residual-stream edits for sweeps: add a direction (steering) or project one out (ablation), as forward hooks.

The hooks sit on the decoder layers, so they act in any forward pass: the project's sampler
(`sampling.engine`) runs the model's ordinary forward, prefill and decode alike. The vLLM backend runs its own
kernels and cannot apply them: `run_sweep` refuses edited points there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from em_assets.analyses.edits import ModelEdit
from em_assets.models.layers import decoder_layers
from em_assets.results.artifacts import sha256_file

DIRECTION_KEY = "direction"


class EditError(ValueError):
    """A direction file is missing, altered, or does not fit the model."""


def load_directions(path: Path | str, sha256: str):
    """The [layers, hidden] float32 tensor in a direction file, after checking its sha256."""
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise EditError(f"direction file {path} does not exist")
    if sha256_file(path) != sha256:
        raise EditError(
            f"direction file {path} does not match sha256 {sha256}: it changed since it was recorded"
        )
    return load_file(str(path))[DIRECTION_KEY]


def _hook(edit):
    """A forward hook replacing a decoder layer's hidden states by edit(hidden)."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)

    return hook


def _adding(vector):
    return lambda h: h + vector


def _projecting_out(unit):
    def project(h):
        # In float32: in bf16 the remaining component would be rounding noise of |h|.
        hf = h.float()
        return (hf - (hf @ unit)[..., None] * unit).to(h.dtype)

    return project


def _checked(directions, model, layers: tuple[int, ...] | None):
    blocks = decoder_layers(model)
    if directions.shape[0] != len(blocks):
        raise EditError(f"direction file has {directions.shape[0]} layers, the model {len(blocks)}")
    chosen = tuple(range(len(blocks))) if layers is None else layers
    bad = [i for i in chosen if not 0 <= i < len(blocks)]
    if bad:
        raise EditError(f"layers {bad} outside a model of {len(blocks)} layers")
    return blocks, chosen


@dataclass(frozen=True)
class Steer(ModelEdit):
    """Add `scale x direction[layer]` to the residual stream after each of `layers` (every position)."""

    layers: tuple[int, ...]
    vector_file: str
    vector_sha256: str
    scale: float

    def deltas(self, model) -> dict[int, object]:
        """Per steered layer, the float32 vector added."""
        directions = load_directions(self.vector_file, self.vector_sha256)
        _, layers = _checked(directions, model, self.layers)
        return {i: self.scale * directions[i].float() for i in layers}

    def hooks(self, model) -> list:
        blocks, weight = decoder_layers(model), model.get_input_embeddings().weight
        return [
            blocks[i].register_forward_hook(_hook(_adding(delta.to(weight.device, weight.dtype))))
            for i, delta in self.deltas(model).items()
        ]

    def apply(self, model) -> None:
        self.hooks(model)

    def describe(self) -> dict:
        # The sha256 names the vector; the path is left out, so moving the artifacts directory resamples nothing.
        return {
            "edit": "Steer",
            "layers": list(self.layers),
            "vector_sha256": self.vector_sha256,
            "scale": self.scale,
        }


@dataclass(frozen=True)
class Ablate(ModelEdit):
    """Project the unit direction of `source_layer` out of the residual stream after each of `layers`
    (None: every layer), as Soligo et al. ablate one layer's direction everywhere."""

    source_layer: int
    direction_file: str
    direction_sha256: str
    layers: tuple[int, ...] | None = None

    def units(self, model) -> dict[int, object]:
        """Per ablated layer, the float32 unit direction projected out."""
        directions = load_directions(self.direction_file, self.direction_sha256)
        _, layers = _checked(directions, model, self.layers)
        _checked(directions, model, (self.source_layer,))
        vector = directions[self.source_layer].float()
        if float(vector.norm()) == 0:
            raise EditError(f"the direction of layer {self.source_layer} is zero; there is nothing to ablate")
        return dict.fromkeys(layers, vector / vector.norm())

    def hooks(self, model) -> list:
        blocks, device = decoder_layers(model), model.get_input_embeddings().weight.device
        return [
            blocks[i].register_forward_hook(_hook(_projecting_out(unit.to(device))))
            for i, unit in self.units(model).items()
        ]

    def apply(self, model) -> None:
        self.hooks(model)

    def describe(self) -> dict:
        return {
            "edit": "Ablate",
            "source_layer": self.source_layer,
            "direction_sha256": self.direction_sha256,
            "layers": None if self.layers is None else list(self.layers),
        }


def random_directions(directions, seed: int):
    """Random vectors with each layer's norm of `directions` (a seeded Gaussian, normalised): the control."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    # Drawn on the CPU, so the control is the same on every device; then moved to the directions' device (a
    # GPU, where the class means were computed on one).
    noise = torch.randn(directions.shape, generator=generator, dtype=torch.float32).to(directions.device)
    return noise / noise.norm(dim=-1, keepdim=True) * directions.float().norm(dim=-1, keepdim=True)
