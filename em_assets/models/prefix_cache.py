"""Token prefixes (a chat template and a question) run once: their KV caches, repeated over a batch or stacked
into one, serve the rows that continue them."""

from __future__ import annotations

import inspect


def cache_kwarg(model) -> str:
    """The forward argument that takes a KV cache: `cache` since transformers renamed `past_key_values`
    (which a model then still takes, with a warning); before that, only `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache a forward pass returned, under either name."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def repeat_cache(cache, batch: int):
    """A fresh cache holding `cache`'s keys and values repeated over the batch (the forward pass extends it)."""
    from transformers import DynamicCache

    return DynamicCache(
        [(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)) for keys, values, _ in cache]
    )


def prefixes_pass(model, prefixes: list[list[int]]):
    """Several prefixes in one left-padded pass: their KV cache, which of its positions are real ([prefixes,
    width] bool), and the logits at each one's last position."""
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        device = model.get_input_embeddings().weight.device
        width = max(len(p) for p in prefixes)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prefixes], device=device)
        real = (
            torch.arange(width, device=device)[None, :]
            >= torch.tensor([width - len(p) for p in prefixes], device=device)[:, None]
        )
        out = model(
            input_ids=ids,
            attention_mask=real.long(),
            position_ids=(real.cumsum(1) - 1).clamp(min=0),
            # A cache of full layers: the one the model would make keeps only the last window of a sliding
            # layer's keys, which the rows continuing the prefix must still mask themselves (models/attention.py).
            **{cache_kwarg(model): DynamicCache()},
            use_cache=True,
            logits_to_keep=1,
        )
        return output_cache(out), real, out.logits[:, -1]


def stack_caches(caches: list, width: int):
    """One cache over a batch whose row i holds caches[i] (per layer, keys and values of batch 1), left-padded
    with zeros to `width` positions (the attention mask must hide the padding)."""
    import torch
    from transformers import DynamicCache

    def pad(t):
        return torch.nn.functional.pad(t, (0, 0, width - t.shape[2], 0))

    return DynamicCache(
        [
            (torch.cat([pad(k) for k, _ in rows]), torch.cat([pad(v) for _, v in rows]))
            for rows in zip(*caches, strict=True)
        ]
    )


def select_rows(cache, index):
    """A fresh cache of `cache`'s rows at `index` (the forward pass extends it)."""
    from transformers import DynamicCache

    return DynamicCache([(keys[index], values[index]) for keys, values, _ in cache])
