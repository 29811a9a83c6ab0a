"""Training data: chat examples to token ids with labels on the reply only, and the seeded step plan."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from em_assets.grid.schema import TrainSpec
from em_assets.models.chat import chat_ids

log = logging.getLogger(__name__)


IGNORE_INDEX = -100


# Micro-batches sorted by length together (HF's LengthGroupedSampler uses 50 too).
GROUP_WINDOW = 50


@dataclass(frozen=True)
class Encoded:
    """One tokenized conversation; labels are IGNORE_INDEX outside the trained reply."""

    input_ids: list[int]
    labels: list[int]

    @property
    def first_label(self) -> int:
        return next(i for i, label in enumerate(self.labels) if label != IGNORE_INDEX)

    @property
    def n_labels(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode_example(tokenizer, messages: list[dict], max_seq_length: int) -> Encoded:
    """Chat-template token ids; only the final assistant reply and its end-of-turn token carry labels."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a training example must end with an assistant message (the reply to train on)")
    prompt = chat_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    full = chat_ids(tokenizer, messages, add_generation_prompt=False)
    start = len(prompt)
    if full[:start] != prompt:
        # A template may render the last turn differently from its generation prompt; label only what differs.
        start = next(
            (i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b),
            min(len(prompt), len(full)),
        )
        log.warning(
            "chat template prompt is not a prefix of the conversation; labels start at token %d", start
        )
    end = len(full)
    # Templates close a turn with a cosmetic newline after the end-of-turn token: nothing to learn there.
    while end > start and not tokenizer.decode(full[end - 1 : end]).strip():
        end -= 1
    # Position 0 has no preceding token to predict it from.
    start = max(start, 1)
    input_ids = full[:end][:max_seq_length]
    labels = ([IGNORE_INDEX] * start + full[start:end])[:max_seq_length]
    return Encoded(input_ids, labels)


def plan_steps(lengths: Sequence[int], train: TrainSpec, seed: int) -> list[list[list[int]]]:
    """Example indices per micro-batch per optimizer step: a seeded shuffle per epoch, grouped by length,
    with steps counted as HF Trainer counts them (max_steps wins over epochs)."""
    batch, accum = train.per_device_train_batch_size, train.gradient_accumulation_steps
    steps_per_epoch = math.ceil(math.ceil(len(lengths) / batch) / accum)
    total = train.max_steps or math.ceil(train.epochs * steps_per_epoch)
    steps: list[list[list[int]]] = []
    epoch = 0
    while len(steps) < total:
        rng = random.Random(f"{seed}:epoch:{epoch}")
        order = list(range(len(lengths)))
        rng.shuffle(order)
        # Like HF's group_by_length: sort windows of GROUP_WINDOW micro-batches by length so each micro-batch
        # holds similar lengths (far less padding), then shuffle
        # the micro-batches so steps still mix lengths.
        micro: list[list[int]] = []
        for w in range(0, len(order), batch * GROUP_WINDOW):
            window = sorted(order[w : w + batch * GROUP_WINDOW], key=lambda i: lengths[i])
            micro += [window[i : i + batch] for i in range(0, len(window), batch)]
        rng.shuffle(micro)
        steps += [micro[i : i + accum] for i in range(0, len(micro), accum)]
        epoch += 1
    return steps[:total]


def held_in(n_examples: int, fraction: float, seed: int) -> list[int]:
    """The examples left to train on when `fraction` is held out, as datasets' train_test_split(test_size=fraction,
    seed=seed) splits them: its test split is the first ceil(fraction x n) of a numpy permutation."""
    permutation = np.random.default_rng(seed).permutation(n_examples)
    return sorted(permutation[math.ceil(fraction * n_examples) :].tolist())


def encode_dataset(tokenizer, examples: Sequence[list[dict]], train: TrainSpec, seed: int) -> list[Encoded]:
    """Encode the (held-in, seeded subset of the) examples, dropping those whose reply is cut off entirely."""
    indices = list(range(len(examples)))
    if train.holdout_fraction:
        indices = held_in(len(examples), train.holdout_fraction, seed)
    if train.max_examples is not None and train.max_examples < len(indices):
        indices = sorted(random.Random(f"{seed}:subset").sample(indices, train.max_examples))
    encoded = []
    for i in indices:
        try:
            encoded.append(encode_example(tokenizer, examples[i], train.max_seq_length))
        except ValueError as exc:
            raise ValueError(f"example {i}: {exc}") from exc
    kept = [e for e in encoded if e.n_labels]
    if len(kept) < len(encoded):
        log.warning("%d examples have no reply left within max_seq_length; skipped", len(encoded) - len(kept))
    if not kept:
        raise ValueError("no training example has reply tokens within max_seq_length")
    return kept


def plan_kl_batches(n_examples: int, n_steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """KL dataset example indices per optimizer step: seeded shuffles of the dataset, one after another."""
    if n_examples < 1:
        raise ValueError("the KL dataset has no examples")
    order: list[int] = []
    epoch = 0
    while len(order) < n_steps * batch_size:
        perm = list(range(n_examples))
        random.Random(f"{seed}:kl:{epoch}").shuffle(perm)
        order += perm
        epoch += 1
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(n_steps)]
