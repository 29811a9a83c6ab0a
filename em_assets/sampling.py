"""Batched sampling from Hugging Face causal LMs: a slot KV cache, continuous batching, per-request seeds.

Guarantees: each request draws from its own stream (`random.Random(seed)`, one uniform per token), so the
same requests, seeds, model and `batch_size` give identical texts run after run. Across batch sizes or request
mixes the draws stay the same but logits can differ in their last bits (kernels block differently), so texts
agree unless a draw lands within that rounding of a token boundary: rarely in float32, more often in bf16.
"""

from __future__ import annotations

import inspect
import math
import random
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

LogitsHook = Callable[[list[int], torch.Tensor], None]
ATTENTION = "em_assets_slots"
NUCLEUS_GUESS = 256
SAMPLE_ROWS = 8
# Decoding slots attend in groups of this many, each over its own longest row rather than the batch's longest.
# Each group is one more attention call per layer: at batch 256 on CPU, 128 beat 32 by 16% and 256 by 3%.
GROUP_ROWS = 128
# batch_size "auto": slots on a CPU, and at most this many on a GPU.
CPU_BATCH = 256
MAX_GPU_BATCH = 1024
# Sort slots by length (copying the cache once) when that cuts the columns attention reads by this fraction.
RESORT_GAIN = 0.2
# Decode attention with query heads folded into positions: None picks by device and thread count.
FOLD_HEADS: bool | None = None
# (first slot, end slot, columns) per group for the decode step in flight.
_GROUPS: ContextVar[list[tuple[int, int, int]] | None] = ContextVar("em_assets_slot_groups", default=None)


@dataclass(frozen=True)
class SampleRequest:
    key: str
    messages: list[dict]
    seed: int


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


def sample_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), cut to the top-p nucleus, drawn at `uniforms`."""
    if temperature == 0:
        return logits.argmax(-1)
    if top_p < 1:
        return _sample_nucleus(logits, uniforms, temperature, top_p)
    tokens = torch.empty(len(logits), dtype=torch.long, device=logits.device)
    # A few rows at a time, so each row's float copy stays in cache from exp to block sums: 3x faster on CPU.
    for start in range(0, len(logits), SAMPLE_ROWS):
        rows = slice(start, start + SAMPLE_ROWS)
        weights = logits[rows].float()
        if temperature != 1:
            weights /= temperature
        weights = weights.sub_(weights.amax(-1, keepdim=True)).exp_()
        tokens[rows] = _invert_cdf(weights, uniforms[rows])
    return tokens


def _sample_nucleus(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    # Sorting the whole vocabulary is slow; the nucleus nearly always lies in the top few hundred tokens.
    top, order = probs.topk(min(NUCLEUS_GUESS, probs.shape[-1]), dim=-1)
    if not bool((top.sum(-1) >= top_p).all()):
        top, order = probs.sort(dim=-1, descending=True)
    # Keep a token while the mass ranked above it is under top_p (transformers' TopPLogitsWarper rule).
    top = top.masked_fill(top.cumsum(-1) - top >= top_p, 0.0)
    return order.gather(-1, _invert_cdf(top, uniforms).unsqueeze(-1)).squeeze(-1)


def _invert_cdf(weights: torch.Tensor, uniforms: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i], per row: the inverse-CDF draw from unnormalised `weights`.

    One uniform per row is what makes per-request seeds cheap. A cumsum over a whole 50k-150k vocabulary is
    slow and loses precision, so this finds the block of `block` tokens first, then the token inside it.
    """
    rows, vocab = weights.shape
    if vocab % block:
        weights = F.pad(weights, (0, -vocab % block))
    blocks = weights.view(rows, -1, block)
    block_mass = blocks.sum(-1).double()
    cdf = block_mass.cumsum(-1)
    target = uniforms.to(cdf) * cdf[:, -1]
    # A zero-mass block never holds the first cdf entry above the target, so it is never picked.
    b = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)
    rest = target - (cdf.gather(-1, b.unsqueeze(-1)) - block_mass.gather(-1, b.unsqueeze(-1))).squeeze(-1)
    inner = blocks[torch.arange(rows, device=weights.device), b].cumsum(-1, dtype=torch.float64)
    j = torch.searchsorted(inner, rest.clamp_min(0).unsqueeze(-1), right=True).squeeze(-1)
    # Rounding can put `rest` past the block's own total: fall back to its last token of nonzero weight.
    last = (inner < inner[:, -1:]).sum(-1)
    return b * block + torch.minimum(j, last)


def _sdpa(query, key, value, mask, scaling) -> torch.Tensor:
    rows, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    fold = FOLD_HEADS if FOLD_HEADS is not None else query.device.type != "cpu" or torch.get_num_threads() > 1
    if length == 1 and heads != kv_heads and fold:
        # One query token: a key head's query heads become its query positions. torch's CPU kernel splits that
        # across threads but runs enable_gqa on one (which is 15% faster when there is only one thread).
        query = query.reshape(rows, kv_heads, heads // kv_heads, dim)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
        return out.reshape(rows, heads, 1, dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=heads != kv_heads
    )
    return out.transpose(1, 2)


def _slot_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA under the sampler's additive 4D mask; decoding slot groups read only their columns."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("the sampler's attention has no logit soft-capping or attention sinks")
    window = kwargs.get("sliding_window")
    if window is not None and window < key.shape[2]:
        raise NotImplementedError(f"sequences longer than the sliding window ({window}) are not supported")
    groups = _GROUPS.get()
    if groups is None:
        return _sdpa(query, key, value, attention_mask, scaling).contiguous(), None
    parts = [
        _sdpa(
            query[a:b], key[a:b, :, :width], value[a:b, :, :width], attention_mask[a:b, ..., :width], scaling
        )
        for a, b, width in groups
    ]
    return torch.cat(parts), None


@contextmanager
def _attention_swapped(model, groups: list[tuple[int, int, int]] | None) -> Iterator[None]:
    """Route the model's attention through `_slot_attention` for one forward pass.

    An attention function registered by name attends under the sampler's 4D mask whatever implementation the
    model was loaded with (flash-attention kernels ignore such masks), and lets each slot group read only its
    own columns.
    """
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    AttentionInterface.register(ATTENTION, _slot_attention)
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION
    token = _GROUPS.set(groups)
    try:
        yield
    finally:
        _GROUPS.reset(token)
        config._attn_implementation = previous


class _SlotLayer(CacheLayerMixin):
    """One layer's keys and values for every slot, [slots, kv_heads, capacity, head_dim], written in place."""

    is_sliding = False

    def __init__(self, cache: _SlotCache):
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        slots, capacity = self.cache.num_slots, self.cache.capacity
        # zeros, not empty: masked columns still meet a 0 attention weight, and 0 * NaN garbage is NaN.
        self.keys = key_states.new_zeros((slots, key_states.shape[1], capacity, key_states.shape[-1]))
        self.values = value_states.new_zeros((slots, value_states.shape[1], capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cache = self.cache
        if cache.prefill_rows is not None:
            width, rows, copies = key_states.shape[2], cache.prefill_rows, cache.prefill_copies
            self.keys[:, :, :width].index_copy_(0, rows, key_states[copies])
            self.values[:, :, :width].index_copy_(0, rows, value_states[copies])
            return key_states, value_states
        # One (slot, head) row of the flat buffer per new key: index_copy_ is far cheaper than index_put_.
        index = cache.flat_index(self.keys.shape)
        self.keys.view(-1, self.keys.shape[-1]).index_copy_(0, index, key_states.flatten(0, 2))
        self.values.view(-1, self.values.shape[-1]).index_copy_(0, index, value_states.flatten(0, 2))
        return self.keys[:, :, : cache.kv_length], self.values[:, :, : cache.kv_length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.kv_length, 0

    def get_seq_length(self) -> int:
        return self.cache.kv_length

    def get_max_length(self) -> int:
        return self.cache.capacity

    def select(self, rows: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[rows], self.values[rows]


class _SlotCache(Cache):
    """A static KV cache of `num_slots` rows; each row holds one request at its own columns.

    transformers' StaticCache writes every row at one shared position, which rules out refilling a row with a
    new request while the others keep decoding; here each row has its own write column, and the 4D mask says
    which columns it may read.
    """

    def __init__(self, num_layers: int, num_slots: int, capacity: int):
        self.num_slots, self.capacity = num_slots, capacity
        # While prefilling: the slots being filled, and which distinct prompt of the batch each one gets.
        self.prefill_rows: torch.Tensor | None = None
        self.prefill_copies: torch.Tensor | None = None
        self.write_cols = torch.zeros(0, dtype=torch.long)
        self.kv_length = 0
        self._flat_index: torch.Tensor | None = None
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    def start_decode(self, write_cols: torch.Tensor, kv_length: int) -> None:
        self.write_cols, self.kv_length = write_cols, kv_length
        self._flat_index = None

    def flat_index(self, shape: torch.Size) -> torch.Tensor:
        """Rows of the [slots * heads * capacity, head_dim] view that this step's keys go to (all layers)."""
        if self._flat_index is None:
            slots, heads, capacity, _ = shape
            base = torch.arange(slots * heads, device=self.write_cols.device).view(slots, heads) * capacity
            self._flat_index = (base + self.write_cols[:, None]).flatten()
        return self._flat_index

    def select(self, rows: torch.Tensor) -> None:
        """Reorder (and drop) slots: row i becomes old row rows[i]."""
        for layer in self.layers:
            layer.select(rows)
        self.num_slots = len(rows)


@dataclass
class _Slots:
    """Per-slot decoding state; slot i holds request `request[i]` (-1: free)."""

    size: int
    max_new_tokens: int
    device: torch.device
    request: list[int] = field(init=False)
    rngs: list[random.Random | None] = field(init=False)

    def __post_init__(self) -> None:
        n, device = self.size, self.device
        self.request = [-1] * n
        self.rngs = [None] * n
        # The first column a slot may read, the column and position id of its next input token, that token.
        self.start = torch.zeros(n, dtype=torch.long, device=device)
        self.col = torch.zeros(n, dtype=torch.long, device=device)
        self.pos = torch.zeros(n, dtype=torch.long, device=device)
        self.last = torch.zeros(n, dtype=torch.long, device=device)
        self.count = torch.zeros(n, dtype=torch.long, device=device)
        self.busy = torch.zeros(n, dtype=torch.bool, device=device)
        self.out = torch.zeros(n, self.max_new_tokens, dtype=torch.long, device=device)

    def select(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.request = [self.request[r] for r in rows]
        self.rngs = [self.rngs[r] for r in rows]
        for name in ("start", "col", "pos", "last", "count", "busy", "out"):
            setattr(self, name, getattr(self, name)[index])
        self.size = len(rows)

    def uniforms(self, rows: Sequence[int]) -> torch.Tensor:
        draws = [rng.random() if (rng := self.rngs[r]) is not None else 0.0 for r in rows]
        return torch.tensor(draws, dtype=torch.float64, device=self.device)


def _cache_kwarg(model) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers 5.x renamed `past_key_values` to `cache`; the old name still works there, with a warning.
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


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
    batch_size: int = 64,
    logits_hook: LogitsHook | None = None,
) -> Iterator[list[Finished]]:
    """Sample continuations of tokenized prompts, yielding requests as they finish.

    `batch_size` slots decode in lockstep; a finished slot is refilled with the next prompt, so the batch
    stays full. `logits_hook(request_indices, logits)` sees the float logits each token was drawn from.
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    if max_new_tokens < 1 or batch_size < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("need max_new_tokens >= 1, batch_size >= 1, temperature >= 0, 0 < top_p <= 1")
    if not prompts:
        return
    device = model.get_input_embeddings().weight.device
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    # Sorted, so a refill gets prompts of similar length (little padding) and repeats of one prompt together.
    pending = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), tuple(prompts[i])), reverse=True)
    slots = _Slots(min(batch_size, len(prompts)), max_new_tokens, device)
    cache = _SlotCache(model.config.num_hidden_layers, slots.size, max(map(len, prompts)) + max_new_tokens)
    step = _Stepper(model, cache, slots, stops, temperature, top_p, logits_hook)
    # Refilling costs a forward pass of its own: wait until an eighth of the slots are free.
    refill_at = max(1, slots.size // 8)
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

    def __init__(self, model, cache: _SlotCache, slots: _Slots, stops, temperature, top_p, hook):
        self.model, self.cache, self.slots, self.stops = model, cache, slots, stops
        self.temperature, self.top_p, self.hook = temperature, top_p, hook
        self.cache_kwarg = _cache_kwarg(model)
        self.dtype = model.get_input_embeddings().weight.dtype

    def _forward(self, input_ids, allowed, position_ids, groups=None) -> torch.Tensor:
        """Last-position logits; `allowed` [rows, 1, queries, columns] says which columns each query reads."""
        # Additive once here, not converted from boolean inside every layer's attention call.
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill_(
            ~allowed, -math.inf
        )
        with _attention_swapped(self.model, groups):
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
        # Samples of one question share its prompt: run each distinct prompt once, copy its keys to its slots.
        first = {p: i for i, p in enumerate(dict.fromkeys(map(tuple, prompts)))}
        distinct = list(first)
        copies = torch.tensor([first[tuple(p)] for p in prompts], device=device)
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
            logits = self._forward(ids, allowed[:, None], positions)[copies]
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
        return self._advance(rows, index, logits)

    @torch.inference_mode()
    def decode(self) -> list[Finished]:
        slots, cache = self.slots, self.cache
        groups = _groups(slots.col)
        order = slots.col.argsort(descending=True)
        if _reads(_groups(slots.col[order])) < (1 - RESORT_GAIN) * _reads(groups):
            self.select(order.tolist())
            groups = _groups(slots.col)
        cache.start_decode(slots.col, max(width for _, _, width in groups))
        cols = torch.arange(cache.kv_length, device=slots.device)
        allowed = (cols >= slots.start[:, None]) & (cols <= slots.col[:, None])
        logits = self._forward(
            slots.last[:, None],
            allowed[:, None, None],
            slots.pos[:, None],
            groups if len(groups) > 1 else None,
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
        if self.hook is not None:
            self.hook([slots.request[r] for r in rows], logits.float())
        tokens = sample_tokens(logits, slots.uniforms(rows), self.temperature, self.top_p)
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
        self.cache.select(torch.tensor(rows, dtype=torch.long, device=self.slots.device))
        self.slots.select(rows)


def _groups(cols: torch.Tensor) -> list[tuple[int, int, int]]:
    """(first slot, end slot, columns to read) for each run of GROUP_ROWS slots, next writing at `cols`."""
    n = len(cols)
    count = -(-n // GROUP_ROWS)
    widths = F.pad(cols, (0, count * GROUP_ROWS - n)).view(count, GROUP_ROWS).amax(1).add(1).tolist()
    return [(g * GROUP_ROWS, min(n, (g + 1) * GROUP_ROWS), width) for g, width in enumerate(widths)]


def _reads(groups: list[tuple[int, int, int]]) -> int:
    return sum((end - start) * width for start, end, width in groups)


def kv_bytes_per_slot(model, max_len: int) -> int:
    """Bytes of keys and values one sequence of `max_len` tokens holds in the model's KV cache."""
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * max_len * model.dtype.itemsize


def auto_batch_size(model, max_len: int) -> int:
    """Slots to decode at once: CPU_BATCH on a CPU; on a GPU, as many as half its free memory holds as KV cache.

    On a CPU more slots stop paying at about 256 (`make bench`); on a GPU throughput grows with the batch until
    memory runs out, and the rest of the free memory is left to activations and the allocator.
    """
    device = model.get_input_embeddings().weight.device
    if device.type != "cuda":
        return CPU_BATCH
    free = torch.cuda.mem_get_info(device)[0]
    return max(1, min(MAX_GPU_BATCH, free // 2 // kv_bytes_per_slot(model, max_len)))


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` under the chat template, ending with the assistant turn's opening."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already writes any BOS token; the tokenizer must not add another.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def iter_samples(
    model,
    tokenizer,
    requests: Sequence[SampleRequest],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int | str = 64,
    on_progress: Callable[[int, int], None] | None = None,
) -> Iterator[list[SampleResult]]:
    """Sample one completion per request, yielding finished results in chunks (temperature 0: greedy).

    `batch_size="auto"` sizes the batch for the model's device (`auto_batch_size`).
    """
    prompts = [render_prompt(tokenizer, r.messages) for r in requests]
    if batch_size == "auto":
        batch_size = auto_batch_size(model, max(map(len, prompts), default=0) + max_new_tokens)
    chunk = max(1, batch_size // 4)
    buffer: list[Finished] = []
    done = 0

    def results() -> list[SampleResult]:
        texts = tokenizer.batch_decode([f.token_ids for f in buffer], skip_special_tokens=True)
        return [
            SampleResult(requests[f.index].key, text, len(f.token_ids), f.finish_reason)
            for f, text in zip(buffer, texts, strict=True)
        ]

    for finished in generate_ids(
        model,
        prompts,
        [r.seed for r in requests],
        max_new_tokens=max_new_tokens,
        stop_ids=stop_token_ids(model, tokenizer),
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
    ):
        buffer.extend(finished)
        done += len(finished)
        if on_progress is not None:
            on_progress(done, len(requests))
        if len(buffer) >= chunk:
            yield results()
            buffer = []
    if buffer:
        yield results()


def _hf_generate(model, tokenizer, requests, max_new_tokens, temperature, batch_size) -> list[SampleResult]:
    """The reference to beat: transformers' `generate` over left-padded batches, in request order."""
    stops = stop_token_ids(model, tokenizer)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    results = []
    try:
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            texts = [
                tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False)
                for r in chunk
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.get_input_embeddings().weight.device)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
            with torch.inference_mode():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=sorted(stops),
                    pad_token_id=tokenizer.pad_token_id,
                    **(sampling if temperature > 0 else {"do_sample": False}),
                )
            for r, row in zip(chunk, out[:, enc["input_ids"].shape[1] :].tolist(), strict=True):
                ends = [i for i, t in enumerate(row) if t in stops]
                ids = row[: ends[0] + 1] if ends else row
                text = tokenizer.decode(ids, skip_special_tokens=True)
                results.append(SampleResult(r.key, text, len(ids), "stop" if ends else "length"))
    finally:
        tokenizer.padding_side = side
    return results


def benchmark_sampling(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    *,
    temperature: float = 1.0,
    engine: str = "sampler",
    workers: int = 1,
    loader: Callable[[], tuple] | None = None,
) -> dict:
    """Time sampling one completion per user prompt with `engine` ("sampler" or the "hf_generate" baseline).

    Returns tokens (generated, stop tokens included), seconds, tok_per_s, cpu_seconds and peak_rss_mb (of the
    process so far). Run both engines in one process to compare them: other work on the machine skews either.
    With `workers` > 1 the sampler runs in that many single-thread processes that each call `loader()` for a
    model (`em_assets.sampling_pool`); their start-up counts in the time, their memory in worker_peak_rss_mb.
    """
    requests = [
        SampleRequest(f"{i}", [{"role": "user", "content": p}], seed=i) for i, p in enumerate(prompts)
    ]
    cpu0, t0 = time.process_time(), time.perf_counter()
    if engine == "hf_generate":
        results = _hf_generate(model, tokenizer, requests, max_new_tokens, temperature, batch_size)
    elif engine == "sampler":
        options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "batch_size": batch_size}
        if workers > 1:
            from em_assets.sampling_pool import iter_samples_in_workers

            if loader is None:
                raise ValueError("workers > 1 needs a loader")
            chunks = iter_samples_in_workers(loader, requests, workers=workers, **options)
        else:
            chunks = iter_samples(model, tokenizer, requests, **options)
        results = [r for chunk in chunks for r in chunk]
    else:
        raise ValueError(f"unknown engine {engine!r}")
    seconds = time.perf_counter() - t0
    tokens = sum(r.num_tokens for r in results)
    return {
        "engine": engine,
        "batch_size": batch_size,
        "requests": len(requests),
        "tokens": tokens,
        "seconds": seconds,
        "tok_per_s": tokens / seconds,
        "cpu_seconds": time.process_time() - cpu0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers": workers,
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if workers > 1
        else None,
    }
