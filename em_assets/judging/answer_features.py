"""What the probe judge reads of one (question, answer): the frozen model's hidden states pooled over the answer
and over the question (each read alone, one forward pass per answer and per distinct question), and scalar signs
of degenerate text read off the same pass.

Word salad reads as tokens the model finds unlikely, a repetition loop as repeated n-grams and a compressible
text, an empty answer as zero tokens; an answer to another question as an answer far from its question's states
(the head compares them, judging/probe.py).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from em_assets.models.layers import decoder_layers

SCALARS = (
    "empty",
    "log_tokens",
    "mean_logprob",
    "std_logprob",
    "mean_entropy",
    "surprise_gap",
    "rare_token_share",
    "repeated_trigrams",
    "compression",
    "letter_share",
)
# Tokens a token's log-probability must fall under to count as rare (a chance of 1 in 10,000).
RARE_LOGPROB = -9.21
# Answer positions whose full-vocabulary logits are held at once: few enough that their fp32 log-softmax stays in
# the CPU's cache (one large block spills to memory on every pass over it).
LOGIT_CHUNK = 128


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


@dataclass(frozen=True)
class AnswerFeatures:
    """[answers, len(layers) * hidden] pooled states of each answer and of its question, and
    [answers, len(SCALARS)] scalar signs."""

    hidden: np.ndarray
    question: np.ndarray
    scalars: np.ndarray


def _final_norm(model):
    base = getattr(model, model.base_model_prefix, model)
    return base.norm


def _pass(model, seqs: list[list[int]], layers: Sequence[int]):
    """One right-padded forward pass: per token sequence, its pooled states at `layers`, and each of its tokens'
    log-probability and the entropy of the predictive distribution it was drawn from (every token after the
    first)."""
    # torch is imported here: the judge's module is loaded by the Dagster definitions, which stay torch-free.
    import torch

    with torch.inference_mode():
        device = model.get_input_embeddings().weight.device
        # At least one position: an empty answer pools to zeros rather than failing.
        width = max(1, *(len(ids) for ids in seqs))
        ids = torch.tensor([i + [0] * (width - len(i)) for i in seqs], dtype=torch.long, device=device)
        cols = torch.arange(width, device=device)
        lengths = torch.tensor([len(i) for i in seqs], device=device)
        answer = (cols[None, :] < lengths[:, None]).float()
        sums: list[torch.Tensor] = []
        normed: list[torch.Tensor] = []

        def record(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            sums.append(torch.einsum("bth,bt->bh", hidden.float(), answer))

        blocks = decoder_layers(model)
        handles = [blocks[i].register_forward_hook(record) for i in layers]
        handles.append(_final_norm(model).register_forward_hook(lambda m, a, out: normed.append(out)))
        try:
            model(
                input_ids=ids,
                attention_mask=answer.long(),
                use_cache=False,
                logits_to_keep=1,
            )
        finally:
            for h in handles:
                h.remove()
        pooled = torch.stack(sums, 1) / answer.sum(1).clamp_min(1.0)[:, None, None]
        # The state at position t predicts token t + 1: an answer token at t is scored from t - 1.
        predictor = torch.zeros_like(answer, dtype=torch.bool)
        predictor[:, :-1] = answer[:, 1:].bool()
        rows, pos = predictor.nonzero(as_tuple=True)
        head = model.get_output_embeddings()
        lp, ent = [], []
        for s in range(0, len(rows), LOGIT_CHUNK):
            r, p = rows[s : s + LOGIT_CHUNK], pos[s : s + LOGIT_CHUNK]
            logp = torch.log_softmax(head(normed[0][r, p].contiguous()).float(), dim=-1)
            lp.append(logp.gather(1, ids[r, p + 1][:, None])[:, 0])
            ent.append(-(logp.exp() * logp).sum(-1))
        lp_all = torch.cat(lp) if lp else torch.zeros(0)
        ent_all = torch.cat(ent) if ent else torch.zeros(0)
        per_seq = [
            (lp_all[rows == i].cpu().numpy(), ent_all[rows == i].cpu().numpy()) for i in range(len(seqs))
        ]
        return pooled, per_seq


def _text_signs(answer: str, tokens: list[int]) -> tuple[float, float, float]:
    trigrams = list(zip(tokens, tokens[1:], tokens[2:], strict=False))
    repeated = 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    raw = answer.encode()
    compression = len(zlib.compress(raw)) / len(raw) if raw else 0.0
    visible = [c for c in answer if not c.isspace()]
    letters = sum(c.isalpha() for c in visible) / len(visible) if visible else 0.0
    return repeated, compression, letters


def _scalars(answer: str, tokens: list[int], lp: np.ndarray, ent: np.ndarray) -> list[float]:
    if not tokens:
        return [1.0] + [0.0] * (len(SCALARS) - 1)
    mean_lp = float(lp.mean()) if len(lp) else 0.0
    mean_ent = float(ent.mean()) if len(ent) else 0.0
    return [
        0.0,
        float(np.log1p(len(tokens))),
        mean_lp,
        float(lp.std()) if len(lp) else 0.0,
        mean_ent,
        -mean_lp - mean_ent,
        float((lp < RARE_LOGPROB).mean()) if len(lp) else 0.0,
        *_text_signs(answer, tokens),
    ]


def _pooled_and_scored(
    model, tokenizer, texts: Sequence[str], layers, max_tokens, batch_size, on_progress=None
):
    """Each text (cut to max_tokens, no prompt around it) through the model once: pooled states at `layers`,
    and its tokens' log-probabilities and predictive entropies (every token after the first)."""
    tokens = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    # Batches of similar length waste less compute on padding.
    order = sorted(range(len(texts)), key=lambda i: len(tokens[i]))
    hidden = np.zeros((len(texts), len(layers) * model.config.hidden_size), dtype=np.float32)
    scored: list = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        pooled, per_seq = _pass(model, [tokens[i] for i in batch], layers)
        hidden[batch] = pooled.flatten(1).cpu().numpy()
        for j, i in enumerate(batch):
            scored[i] = per_seq[j]
        if on_progress is not None:
            on_progress(min(start + batch_size, len(order)), len(order))
    return tokens, hidden, scored


def answer_features(
    model,
    tokenizer,
    items: Sequence[QA],
    layers: Sequence[int],
    max_tokens: int,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> AnswerFeatures:
    """Pooled states and scalar signs of each answer (cut to max_tokens), and its question's pooled states."""
    tokens, hidden, scored = _pooled_and_scored(
        model, tokenizer, [it.answer for it in items], layers, max_tokens, batch_size, on_progress
    )
    questions = sorted({it.question for it in items})
    _, q_hidden, _ = _pooled_and_scored(model, tokenizer, questions, layers, max_tokens, batch_size)
    row = {q: i for i, q in enumerate(questions)}
    scalars = np.array(
        [_scalars(it.answer, tokens[i], *scored[i]) for i, it in enumerate(items)], dtype=np.float32
    ).reshape(len(items), len(SCALARS))
    return AnswerFeatures(hidden, q_hidden[[row[it.question] for it in items]], scalars)
