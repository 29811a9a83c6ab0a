"""Batched sampling from Hugging Face causal LMs: a slot KV cache, continuous batching, per-request seeds.

Guarantees: each request draws from its own stream (`random.Random(seed)`, one uniform per token), so the
same requests, seeds, model, dtype and `batch_size` give identical texts run after run. Across batch sizes or
request mixes the draws stay the same but a prompt's logits move with its left padding: about 1e-5 in float32,
where texts nearly always agree, up to about 0.5 in bf16, where most differ (docs/cpu.md).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from em_assets.models.chat import chat_ids
from em_assets.models.packed import packed_linears
from em_assets.models.prefix_cache import cache_kwarg
from em_assets.sampling.slots import (
    SlotCache,
    Slots,
    attention_swapped,
    group_reads,
    kv_bytes_per_slot,
    slot_groups,
)
from em_assets.sampling.tokens import penalize_repeats, sample_tokens

LogitsHook = Callable[[list[int], torch.Tensor], None]
# Told, before every forward pass, which variant of the model each row of the batch is (a 1D long tensor):
# rows of several model variants decode together (em_assets.analyses.variants).
RowVariants = Callable[[torch.Tensor], None]


# batch_size "auto": slots on a CPU, and at most this many on a GPU.
CPU_BATCH = 256


MAX_GPU_BATCH = 1024


# Sort slots by length (copying the cache once) when that cuts the columns attention reads by this fraction.
RESORT_GAIN = 0.2


@dataclass(frozen=True)
class SampleRequest:
    key: str
    messages: list[dict]
    seed: int
    variant: int = 0


@dataclass(frozen=True)
class SampleResult:
    key: str
    text: str
    num_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class Finished:
    """One request's generated token ids (stop token included) and why generation ended."""

    index: int
    token_ids: list[int]
    finish_reason: str


def stop_token_ids(model, tokenizer) -> set[int]:
    """The ids that end a turn: the generation config's eos ids (often several) and the tokenizer's eos."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list | tuple) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def generate_ids(
    model,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    *,
    max_new_tokens: int,
    stop_ids: set[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    repetition_penalty: float = 1.0,
    batch_size: int = 64,
    logits_hook: LogitsHook | None = None,
    variants: Sequence[int] | None = None,
    row_variants: RowVariants | None = None,
) -> Iterator[list[Finished]]:
    """Sample continuations of tokenized prompts in `batch_size` slots that decode in lockstep, yielding
    requests as they finish; a finished slot is refilled with the next prompt, so the batch stays full."""
    # `logits_hook(request_indices, logits)` sees the float logits each token was drawn from; `variants` (one
    # per prompt) go, per batch row, to `row_variants` before each forward pass; `top_k` and
    # `repetition_penalty` act as transformers' warpers do (`sample_tokens`, `penalize_repeats`).
    _check_options(
        prompts, seeds, variants, max_new_tokens, batch_size, temperature, top_p, top_k, repetition_penalty
    )
    if not prompts:
        return
    device = model.get_input_embeddings().weight.device
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    # Sorted, so a refill gets prompts of similar length (little padding) and repeats of one prompt together.
    pending = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), tuple(prompts[i])), reverse=True)
    slots = Slots(min(batch_size, len(prompts)), max_new_tokens, device)
    cache = SlotCache(
        model.config.get_text_config().num_hidden_layers, slots.size, max(map(len, prompts)) + max_new_tokens
    )
    variants = variants or [0] * len(prompts)
    step = _Stepper(
        model,
        cache,
        slots,
        stops,
        temperature,
        top_p,
        logits_hook,
        variants,
        row_variants,
        top_k,
        repetition_penalty,
    )
    # Refilling costs a forward pass of its own: wait until an eighth of the slots are free.
    refill_at = max(1, slots.size // 8)
    with packed_linears(model):
        yield from _run(step, slots, pending, prompts, seeds, refill_at)


def _check_options(
    prompts: Sequence,
    seeds: Sequence,
    variants: Sequence | None,
    max_new_tokens: int,
    batch_size: int,
    temperature: float,
    top_p: float,
    top_k: int | None,
    penalty: float,
) -> None:
    if len(prompts) != len(seeds) or (variants is not None and len(variants) != len(prompts)):
        raise ValueError("one seed (and variant, if given) per prompt")
    if max_new_tokens < 1 or batch_size < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("need max_new_tokens >= 1, batch_size >= 1, temperature >= 0, 0 < top_p <= 1")
    if (top_k is not None and top_k < 1) or penalty <= 0:
        raise ValueError("need top_k >= 1 (or None) and repetition_penalty > 0")


def _run(
    step: _Stepper, slots: Slots, pending: list[int], prompts, seeds, refill_at: int
) -> Iterator[list[Finished]]:
    """Continuous batching's loop: refill free slots once enough are free, else decode every slot."""
    while True:
        free = [s for s, r in enumerate(slots.request) if r < 0]
        if pending and (len(free) >= min(refill_at, len(pending)) or len(free) == slots.size):
            taken = [pending.pop() for _ in range(min(len(free), len(pending)))]
            done = step.prefill(free[: len(taken)], taken, [prompts[i] for i in taken], seeds)
        else:
            active = slots.size - len(free)
            if active == 0:
                return
            if not pending and active <= slots.size // 2:
                # The queue is empty: drop idle slots so the batch shrinks instead of computing padding.
                step.select([s for s, r in enumerate(slots.request) if r >= 0])
            done = step.decode()
        if done:
            yield done


class _Stepper:
    """The two forward passes of continuous batching: prefill requests into free slots, decode all slots."""

    def __init__(
        self,
        model,
        cache: SlotCache,
        slots: Slots,
        stops,
        temperature,
        top_p,
        hook,
        variants,
        row_variants,
        top_k: int | None = None,
        penalty: float = 1.0,
    ):
        self.model, self.cache, self.slots, self.stops = model, cache, slots, stops
        self.temperature, self.top_p, self.hook = temperature, top_p, hook
        self.variants: Sequence[int] = variants
        self.row_variants: RowVariants | None = row_variants
        self.cache_kwarg = cache_kwarg(model)
        self.dtype = model.get_input_embeddings().weight.dtype
        self.top_k, self.penalty = top_k, penalty
        # With a repetition penalty: per slot, which token ids its prompt and answer so far hold [slots, vocab].
        self.seen: torch.Tensor | None = None

    def _forward(
        self, input_ids, allowed, position_ids, query_cols, groups=None, variants=None
    ) -> torch.Tensor:
        """Last-position logits; `allowed` [rows, 1, queries, columns] says which columns each query reads,
        `query_cols` which column each query is written to; `variants`: each row's model variant, for
        `row_variants`."""
        if self.row_variants is not None:
            self.row_variants(torch.tensor(variants, dtype=torch.long, device=input_ids.device))
        # Additive once here, not converted from boolean inside every layer's attention call.
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill_(
            ~allowed, -math.inf
        )
        with attention_swapped(self.model, groups, query_cols):
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_kwarg: self.cache},
            )
        return out.logits[:, -1]

    @torch.inference_mode()
    def prefill(
        self, rows: list[int], requests: list[int], prompts: list[Sequence[int]], seeds
    ) -> list[Finished]:
        slots, device = self.slots, self.slots.device
        # Samples of one question (and model variant) share its prompt: run each distinct prompt once, copy its
        # keys to its slots.
        keyed = [(self.variants[r], tuple(p)) for r, p in zip(requests, prompts, strict=True)]
        first = {k: i for i, k in enumerate(dict.fromkeys(keyed))}
        distinct = [p for _, p in first]
        copies = torch.tensor([first[k] for k in keyed], device=device)
        width = max(map(len, distinct))
        # Left padding puts every prompt's last token in the last column, where the logits are read.
        ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in distinct], device=device)
        pad = width - torch.tensor([len(p) for p in distinct], device=device)
        cols = torch.arange(width, device=device)
        positions = (cols - pad[:, None]).clamp_min(0)
        causal = cols[None, :, None] >= cols[None, None, :]
        # A real token reads real tokens only; a pad reads itself, as a fully masked row would give NaN.
        allowed = (causal & (cols[None, None, :] >= pad[:, None, None])) | (cols[:, None] == cols[None, :])
        index = torch.tensor(rows, dtype=torch.long, device=device)
        self.cache.prefill_rows, self.cache.prefill_copies = index, copies
        try:
            logits = self._forward(
                ids, allowed[:, None], positions, cols[:, None], variants=[v for v, _ in first]
            )[copies]
        finally:
            self.cache.prefill_rows = self.cache.prefill_copies = None
        for row, request in zip(rows, requests, strict=True):
            slots.request[row] = request
            slots.rngs[row] = random.Random(seeds[request]) if self.temperature > 0 else None
        slots.start[index] = pad[copies]
        slots.col[index] = width
        slots.pos[index] = (width - pad)[copies]
        slots.count[index] = 0
        slots.busy[index] = True
        if self.penalty != 1.0:
            self._see_prompts(index, ids[copies], pad[copies], logits.shape[-1])
        return self._advance(rows, index, logits)

    def _see_prompts(self, index: torch.Tensor, ids: torch.Tensor, pad: torch.Tensor, vocab: int) -> None:
        """Mark slots `index` as having seen only their prompts' token ids (`ids` left-padded by `pad`)."""
        if self.seen is None:
            self.seen = torch.zeros(self.slots.size, vocab, dtype=torch.bool, device=ids.device)
        # Padding goes to an extra column, dropped after: a scatter of False could undo a real token's True.
        real = torch.arange(ids.shape[1], device=ids.device)[None, :] >= pad[:, None]
        seen = torch.zeros(len(ids), vocab + 1, dtype=torch.bool, device=ids.device)
        seen.scatter_(1, ids.masked_fill(~real, vocab), True)
        self.seen[index] = seen[:, :vocab]

    @torch.inference_mode()
    def decode(self) -> list[Finished]:
        slots, cache = self.slots, self.cache
        groups = slot_groups(slots.col)
        order = slots.col.argsort(descending=True)
        if group_reads(slot_groups(slots.col[order])) < (1 - RESORT_GAIN) * group_reads(groups):
            self.select(order.tolist())
            groups = slot_groups(slots.col)
        cache.start_decode(slots.col, max(width for _, _, width in groups))
        cols = torch.arange(cache.kv_length, device=slots.device)
        allowed = (cols >= slots.start[:, None]) & (cols <= slots.col[:, None])
        logits = self._forward(
            slots.last[:, None],
            allowed[:, None, None],
            slots.pos[:, None],
            slots.col[:, None, None, None],
            groups if len(groups) > 1 else None,
            None if self.row_variants is None else [self.variants[r] if r >= 0 else 0 for r in slots.request],
        )
        # Free slots stay at column 0, rewriting a column nobody reads.
        slots.col += slots.busy
        slots.pos += slots.busy
        active = [s for s, r in enumerate(slots.request) if r >= 0]
        if len(active) == slots.size:
            return self._advance(active, torch.arange(slots.size, device=slots.device), logits)
        index = torch.tensor(active, dtype=torch.long, device=slots.device)
        return self._advance(active, index, logits[index])

    def _advance(self, rows: list[int], index: torch.Tensor, logits: torch.Tensor) -> list[Finished]:
        """Draw the next token for slots `rows` (tensor `index`) and free the slots that finished."""
        slots = self.slots
        if self.seen is not None:
            logits = penalize_repeats(logits, self.seen[index], self.penalty)
        if self.hook is not None:
            self.hook([slots.request[r] for r in rows], logits.float())
        tokens = sample_tokens(logits, slots.uniforms(rows), self.temperature, self.top_p, self.top_k)
        if self.seen is not None:
            self.seen[index, tokens] = True
        count = slots.count[index]
        slots.out[index, count] = tokens
        slots.last[index] = tokens
        count += 1
        slots.count[index] = count
        stopped = torch.isin(tokens, self.stops)
        ended = (stopped | (count >= slots.max_new_tokens)).nonzero().flatten().tolist()
        done = []
        for i in ended:
            row = rows[i]
            reason = "stop" if bool(stopped[i]) else "length"
            done.append(Finished(slots.request[row], slots.out[row, : int(count[i])].tolist(), reason))
            slots.request[row] = -1
            slots.rngs[row] = None
        if ended:
            freed = index[ended]
            slots.busy[freed] = False
            slots.start[freed] = 0
            slots.col[freed] = 0
        return done

    def select(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.slots.device)
        self.cache.select(index)
        self.slots.select(rows)
        if self.seen is not None:
            self.seen = self.seen[index]


def auto_batch_size(model, max_len: int) -> int:
    """Slots to decode at once: CPU_BATCH on a CPU; on a GPU, as many as half its free memory holds as KV
    cache."""
    device = model.get_input_embeddings().weight.device
    if device.type != "cuda":
        # More slots stop paying on a CPU (`make bench`).
        return CPU_BATCH
    # The driver counts what torch's allocator keeps cached as used; it is free to this process (a model or KV
    # cache freed earlier in it: a sweep's previous point, the sampling step before in an in-process run).
    free = torch.cuda.mem_get_info(device)[0]
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    # On a GPU throughput grows with the batch until memory runs out; the other half of the free memory is
    # left to activations and the allocator.
    return max(1, min(MAX_GPU_BATCH, free // 2 // kv_bytes_per_slot(model, max_len)))


def iter_samples(
    model,
    tokenizer,
    requests: Sequence[SampleRequest],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    repetition_penalty: float = 1.0,
    batch_size: int | str = 64,
    on_progress: Callable[[int, int], None] | None = None,
    row_variants: RowVariants | None = None,
) -> Iterator[list[SampleResult]]:
    """Sample one completion per request, yielding finished results in chunks (temperature 0: greedy); with
    `row_variants`, each request is sampled from its `variant` of the model."""
    prompts = [chat_ids(tokenizer, r.messages) for r in requests]
    if batch_size == "auto":
        batch_size = auto_batch_size(model, max(map(len, prompts), default=0) + max_new_tokens)
    chunk = max(1, batch_size // 4)
    buffer: list[Finished] = []
    done = 0
    for finished in generate_ids(
        model,
        prompts,
        [r.seed for r in requests],
        max_new_tokens=max_new_tokens,
        stop_ids=stop_token_ids(model, tokenizer),
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        batch_size=batch_size,
        variants=[r.variant for r in requests],
        row_variants=row_variants,
    ):
        buffer.extend(finished)
        done += len(finished)
        if on_progress is not None:
            on_progress(done, len(requests))
        if len(buffer) >= chunk:
            yield _results(tokenizer, requests, buffer)
            buffer = []
    if buffer:
        yield _results(tokenizer, requests, buffer)


def _results(tokenizer, requests: Sequence[SampleRequest], finished: list[Finished]) -> list[SampleResult]:
    """The finished requests' decoded texts."""
    texts = tokenizer.batch_decode([f.token_ids for f in finished], skip_special_tokens=True)
    return [
        SampleResult(requests[f.index].key, text, len(f.token_ids), f.finish_reason)
        for f, text in zip(finished, texts, strict=True)
    ]
