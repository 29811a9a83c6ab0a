"""What the probe judge reads of one (question, answer): the frozen model's hidden states pooled over the answer,
read as the assistant's reply to the question under the chat template (GPT-4o judges an answer to its question
too), and pooled over the question read alone; and scalar signs of degenerate text read off the answer's pass.

Word salad reads as tokens the model finds unlikely, a repetition loop as repeated n-grams and a compressible
text, an empty answer as zero tokens; an answer to another question as an answer far from its question's states
(the head compares them, judging/probe.py). Each question's chat turn runs once; its KV cache serves every
answer to it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from em_assets.models.chat import chat_ids
from em_assets.models.layers import decoder_layers, final_logit_softcap, final_norm
from em_assets.models.packed import packed_linears
from em_assets.models.prefix_cache import cache_kwarg, prefixes_pass, select_rows, stack_caches

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
# The head over the whole vocabulary costs about a third of the pass at every position, so the likelihood signs
# read every second answer token (the first, the third, ...).
LOGIT_STRIDE = 2
# Questions a judge keeps read at once (a reading, mostly its chat turn's KV cache, is 1-2 MB for the demo's
# model): past that they are read again, which costs one pass per batch of questions.
MAX_READINGS = 128


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


@dataclass(frozen=True)
class QuestionReading:
    """What is read of a question once for every answer to it: its chat turn's length and KV cache (per layer,
    keys and values of batch 1), the log-probabilities and entropy of the token after the turn, and the
    question's states pooled alone."""

    length: int
    cache: list
    next_logp: object
    next_entropy: float
    alone: np.ndarray


def _read_questions(model, tokenizer, questions: Sequence[str], layers, max_tokens: int, batch_size: int):
    """Each question's reading: batch_size chat turns a left-padded pass, and batch_size questions alone."""
    import torch

    out: dict[str, QuestionReading] = {}
    for first in range(0, len(questions), batch_size):
        chunk = questions[first : first + batch_size]
        turns = [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in chunk]
        cache, real, last = prefixes_pass(model, turns)
        logp = torch.log_softmax(last.float(), dim=-1)
        entropy = _entropy(logp)
        alone = [tokenizer(q, add_special_tokens=False)["input_ids"][:max_tokens] for q in chunk]
        pooled, _ = _pooled_and_scored(model, alone, layers, batch_size)
        width = real.shape[1]
        for i, (q, turn) in enumerate(zip(chunk, turns, strict=True)):
            start = width - len(turn)
            kv = [(k[i : i + 1, :, start:].clone(), v[i : i + 1, :, start:].clone()) for k, v, _ in cache]
            out[q] = QuestionReading(len(turn), kv, logp[i], entropy[i].item(), pooled[i])
    return out


def _pass(
    model, seqs: list[list[int]], layers: Sequence[int], turns: Sequence[QuestionReading] | None = None
):
    """One right-padded forward pass over token sequences, each after its question's chat turn when `turns` are
    given: per sequence, its states at `layers` pooled over its tokens, and the log-probability and predictive
    entropy of every LOGIT_STRIDE-th of its tokens (from the first after a turn, else from the third)."""
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

        context = (
            {"attention_mask": answer.long()}
            if turns is None
            else _turn_context(model, turns, answer, cols, device)
        )
        blocks = decoder_layers(model)
        handles = [blocks[i].register_forward_hook(record) for i in layers]
        handles.append(final_norm(model).register_forward_hook(lambda m, a, out: normed.append(out)))
        try:
            model(input_ids=ids, logits_to_keep=1, **context)
        finally:
            for h in handles:
                h.remove()
        pooled = torch.stack(sums, 1) / answer.sum(1).clamp_min(1.0)[:, None, None]
        per_seq = _token_scores(model, normed[0], ids, answer)
        if turns is not None:
            per_seq = [
                _with_first(seq, t, *scored) for seq, t, scored in zip(seqs, turns, per_seq, strict=True)
            ]
        return pooled, per_seq


def _turn_context(model, turns: Sequence[QuestionReading], answer, cols, device) -> dict:
    """The forward's keyword arguments that read each sequence after its turn: the turns' KV caches left-padded
    into one, the attention mask over cache and sequence, and the positions that follow the turn."""
    import torch

    lengths = torch.tensor([t.length for t in turns], device=device)
    past = int(lengths.max())
    real = torch.arange(past, device=device)[None, :] >= (past - lengths)[:, None]
    # Each distinct turn's cache is padded once; the batch's rows are gathered from them.
    distinct = {id(t): t for t in turns}
    slot = {key: i for i, key in enumerate(distinct)}
    stacked = stack_caches([t.cache for t in distinct.values()], past)
    return {
        "attention_mask": torch.cat([real.float(), answer], 1).long(),
        cache_kwarg(model): select_rows(stacked, torch.tensor([slot[id(t)] for t in turns], device=device)),
        "use_cache": True,
        "position_ids": lengths[:, None] + cols[None, :],
    }


def _with_first(seq: list[int], turn: QuestionReading, lp: np.ndarray, ent: np.ndarray):
    """A sequence's token scores with its first token's, predicted by the last position of its chat turn."""
    if not seq:
        return lp, ent
    return np.r_[turn.next_logp[seq[0]].item(), lp], np.r_[turn.next_entropy, ent]


def _entropy(logp):
    """Entropy of each row's distribution, from its log-probabilities."""
    return -(logp.exp() * logp).sum(-1)


def _token_scores(model, normed, ids, answer) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sequence, the log-probabilities and predictive entropies of every LOGIT_STRIDE-th of its tokens after
    the first (the third, fifth, ...) from the state before each, through the language-model head LOGIT_CHUNK
    positions at a time."""
    import torch

    # The state at position t predicts token t + 1: an answer token at t is scored from t - 1.
    predictor = torch.zeros_like(answer, dtype=torch.bool)
    predictor[:, :-1] = answer[:, 1:].bool()
    predictor[
        :, torch.arange(predictor.shape[1], device=predictor.device) % LOGIT_STRIDE != LOGIT_STRIDE - 1
    ] = False
    rows, pos = predictor.nonzero(as_tuple=True)
    head, cap = model.get_output_embeddings(), final_logit_softcap(model)
    lp, ent = [], []
    for s in range(0, len(rows), LOGIT_CHUNK):
        r, p = rows[s : s + LOGIT_CHUNK], pos[s : s + LOGIT_CHUNK]
        logits = head(normed[r, p].contiguous())
        if cap is not None:
            # As the model's forward caps them: the head alone is not the model's distribution.
            logits = torch.tanh(logits / cap) * cap
        logp = torch.log_softmax(logits.float(), dim=-1)
        lp.append(logp.gather(1, ids[r, p + 1][:, None])[:, 0])
        ent.append(_entropy(logp))
    # On the rows' device: a batch with no token to score (answers of two tokens or fewer) indexes these by
    # `rows == i`, which fails on a GPU for a CPU tensor.
    lp_all = torch.cat(lp) if lp else torch.zeros(0, device=rows.device)
    ent_all = torch.cat(ent) if ent else torch.zeros(0, device=rows.device)
    return [(lp_all[rows == i].cpu().numpy(), ent_all[rows == i].cpu().numpy()) for i in range(len(ids))]


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
    model,
    tokens: Sequence[list[int]],
    layers,
    batch_size,
    turns: Sequence[QuestionReading] | None = None,
    on_progress=None,
):
    """Each token sequence through the model once (after its question's chat turn, if given): its pooled states
    at `layers`, and its tokens' log-probabilities and predictive entropies."""
    # Batches of similar length waste less compute on padding.
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    hidden = np.zeros(
        (len(tokens), len(layers) * model.config.get_text_config().hidden_size), dtype=np.float32
    )
    scored: list = [None] * len(tokens)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        batch_turns = None if turns is None else [turns[i] for i in batch]
        pooled, per_seq = _pass(model, [tokens[i] for i in batch], layers, batch_turns)
        hidden[batch] = pooled.flatten(1).cpu().numpy()
        for j, i in enumerate(batch):
            scored[i] = per_seq[j]
        if on_progress is not None:
            on_progress(min(start + batch_size, len(order)), len(order))
    return hidden, scored


def answer_features(
    model,
    tokenizer,
    items: Sequence[QA],
    layers: Sequence[int],
    max_tokens: int,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None = None,
    readings: dict[str, QuestionReading] | None = None,
) -> AnswerFeatures:
    """Pooled states and scalar signs of each answer (cut to max_tokens) read as the assistant's reply to its
    question under the chat template, and its question's pooled states read alone. `readings`: questions read
    before with the same model, layers and budget (a judge's memo); the new ones are added to it."""
    readings = {} if readings is None else readings
    new = sorted({it.question for it in items} - readings.keys())
    if len(readings) + len(new) > MAX_READINGS:
        readings.clear()
        new = sorted({it.question for it in items})
    tokens = [tokenizer(it.answer, add_special_tokens=False)["input_ids"][:max_tokens] for it in items]
    with packed_linears(model):
        readings.update(_read_questions(model, tokenizer, new, layers, max_tokens, batch_size))
        turns = [readings[it.question] for it in items]
        hidden, scored = _pooled_and_scored(model, tokens, layers, batch_size, turns, on_progress)
    question = np.array([t.alone for t in turns], dtype=np.float32).reshape(hidden.shape)
    scalars = np.array(
        [_scalars(it.answer, tokens[i], *scored[i]) for i, it in enumerate(items)], dtype=np.float32
    ).reshape(len(items), len(SCALARS))
    return AnswerFeatures(hidden, question, scalars)
