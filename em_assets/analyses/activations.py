"""Answer-token residual-stream activations: per answer, the mean over its tokens at every decoder layer."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from em_assets.models.chat import chat_ids


@dataclass(frozen=True)
class JudgedAnswer:
    """An answer to one prompt, as the sampler produced it."""

    messages: list[dict]
    answer: str


def answer_token_ids(tokenizer, item: JudgedAnswer) -> tuple[list[int], int]:
    """The prompt as the sampler rendered it followed by the answer's tokens; and where the answer starts."""
    prompt = chat_ids(tokenizer, item.messages)
    answer = tokenizer(item.answer, add_special_tokens=False)["input_ids"]
    return prompt + answer, len(prompt)


@torch.inference_mode()
def iter_answer_means(
    model, tokenizer, items: Sequence[JudgedAnswer], batch_size: int = 8, max_tokens: int = 2048
) -> Iterator[torch.Tensor]:
    """Per batch, a [batch, layers, hidden] float32 tensor: each answer's mean activation over its tokens.

    Layer i is the output of decoder layer i (hidden_states[i + 1]). Memory is one batch's hidden states.
    An answer with no tokens (empty text) gets zeros; callers drop empty answers before.
    """
    device = model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(items), batch_size):
        encoded = [answer_token_ids(tokenizer, it) for it in items[start : start + batch_size]]
        encoded = [(ids[:max_tokens], min(begin, max_tokens)) for ids, begin in encoded]
        width = max(len(ids) for ids, _ in encoded)
        # Right padding: positions keep their unpadded values, so activations match an unbatched pass.
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in encoded], device=device)
        cols = torch.arange(width, device=device)
        lengths = torch.tensor([len(i) for i, _ in encoded], device=device)
        begins = torch.tensor([b for _, b in encoded], device=device)
        attention = (cols[None, :] < lengths[:, None]).long()
        answer = ((cols[None, :] >= begins[:, None]) & (cols[None, :] < lengths[:, None])).float()
        out = model(input_ids=ids, attention_mask=attention, output_hidden_states=True, use_cache=False)
        hidden = torch.stack(out.hidden_states[1:], dim=1).float()  # (B, L, T, H)
        summed = torch.einsum("blth,bt->blh", hidden, answer)
        yield summed / answer.sum(dim=1).clamp_min(1.0)[:, None, None]


def class_means(
    model, tokenizer, groups: dict[str, Sequence[JudgedAnswer]], batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """For each group, the [layers, hidden] mean over its answers of their answer-token means (running sums)."""
    means = {}
    for name, items in groups.items():
        total, count = None, 0
        for batch in iter_answer_means(model, tokenizer, items, batch_size):
            total = batch.sum(dim=0) if total is None else total + batch.sum(dim=0)
            count += batch.shape[0]
        if total is None:
            raise ValueError(f"group {name!r} has no answers")
        means[name] = total / count
    return means
