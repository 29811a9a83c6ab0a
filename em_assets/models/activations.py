"""Answer-token residual-stream activations: per answer, the mean over its tokens at every decoder layer."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from em_assets.models.chat import chat_ids
from em_assets.models.layers import decoder_layers
from em_assets.models.packed import packed_linears


@dataclass(frozen=True)
class JudgedAnswer:
    """An answer to one prompt, as the sampler produced it."""

    messages: list[dict]
    answer: str


def answer_token_ids(tokenizer, item: JudgedAnswer) -> tuple[list[int], int]:
    """The prompt as the sampler rendered it followed by the answer's tokens; and where the answer starts.
    No messages: the answer's tokens alone."""
    prompt = chat_ids(tokenizer, item.messages) if item.messages else []
    answer = tokenizer(item.answer, add_special_tokens=False)["input_ids"]
    return prompt + answer, len(prompt)


@torch.inference_mode()
def iter_answer_means(
    model, tokenizer, items: Sequence[JudgedAnswer], batch_size: int = 8, max_tokens: int = 2048
) -> Iterator[torch.Tensor]:
    """Per batch, a [batch, layers, hidden] float32 tensor: each answer's mean activation over its tokens, layer i
    being the output of decoder layer i."""
    device = model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with packed_linears(model):
        for start in range(0, len(items), batch_size):
            encoded = [answer_token_ids(tokenizer, it) for it in items[start : start + batch_size]]
            if cut := [
                i for i, (ids, begin) in enumerate(encoded) if begin >= max_tokens and len(ids) > begin
            ]:
                # Its mean would be a zero vector, counted in its class's mean as if it were an answer's.
                raise ValueError(
                    f"answer {start + cut[0]}: its prompt alone fills the {max_tokens} tokens read, "
                    "leaving none of the answer"
                )
            encoded = [(ids[:max_tokens], min(begin, max_tokens)) for ids, begin in encoded]
            # At least one position: an empty answer without a prompt pools to zeros rather than failing.
            width = max(1, *(len(ids) for ids, _ in encoded))
            # Right padding: positions keep their unpadded values, so activations match an unbatched pass.
            ids = torch.tensor(
                [i + [pad] * (width - len(i)) for i, _ in encoded], dtype=torch.long, device=device
            )
            cols = torch.arange(width, device=device)
            lengths = torch.tensor([len(i) for i, _ in encoded], device=device)
            begins = torch.tensor([b for _, b in encoded], device=device)
            answer = ((cols[None, :] >= begins[:, None]) & (cols[None, :] < lengths[:, None])).float()
            attention = (cols[None, :] < lengths[:, None]).long()
            # Decoder layers' outputs, where `Steer` and `Ablate` hook in (not `hidden_states`, whose last entry is
            # after the final norm); summed as each is computed, so memory is one layer's activations at a time.
            sums = _layer_sums(model, ids, attention, answer)
            yield sums / answer.sum(dim=1).clamp_min(1.0)[:, None, None]  # (B, L, H)


def _layer_sums(model, ids, attention, answer) -> torch.Tensor:
    """[batch, layers, hidden]: each decoder layer's output summed over the positions `answer` weights."""
    sums: list[torch.Tensor] = []

    def record(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        sums.append(torch.einsum("bth,bt->bh", hidden.float(), answer))

    handles = [block.register_forward_hook(record) for block in decoder_layers(model)]
    try:
        # logits_to_keep=1: the full-vocabulary logits of every position would outweigh the activations.
        model(input_ids=ids, attention_mask=attention, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(sums, dim=1)


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
