"""Custom attention masks as each of a model's layers reads them: a sliding-window layer sees only the keys within
its window of the query's position.

transformers passes a custom 4D mask to every layer unchanged, so a model with sliding-window layers (Gemma 2 and
3, Mistral, Qwen with `use_sliding_window`) would attend past the window on prompts longer than it, and score
them otherwise than its own forward pass does. Models that name a type per layer (`layer_types`) take one mask
per type; the others slide on every layer when their config has a window.
"""

from __future__ import annotations

import torch

SLIDING = "sliding_attention"


def sliding_window(model) -> int | None:
    """The window of the model's sliding-window layers, None where no layer slides."""
    config = model.config.get_text_config()
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window is None or (types is not None and SLIDING not in types):
        return None
    return int(window)


def beyond_window(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Where a key is `window` or more positions behind its query (broadcast): transformers' sliding layers see a
    key only while the query is fewer than `window` positions past it."""
    return query_pos - key_pos >= window


def layer_masks(
    model, sees: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Additive [batch, 1, queries, keys] mask(s) in the model's dtype and on its device, from `sees` (bool
    [batch, queries, keys]) and the positions of queries and keys ([batch, queries], [batch, keys]): one
    tensor, or one per layer type."""
    weight = model.get_input_embeddings().weight

    def additive(allowed: torch.Tensor) -> torch.Tensor:
        # An additive float mask means the same to the sdpa and eager kernels (a bool one does not).
        mask = torch.zeros(allowed.shape, dtype=weight.dtype).masked_fill(
            ~allowed, torch.finfo(weight.dtype).min
        )
        return mask[:, None].to(weight.device)

    window = sliding_window(model)
    if window is None:
        return additive(sees)
    near = sees & ~beyond_window(query_pos[:, :, None], key_pos[:, None, :], window)
    types = getattr(model.config.get_text_config(), "layer_types", None)
    if types is None:
        return additive(near)
    return {kind: additive(near if kind == SLIDING else sees) for kind in set(types)}
