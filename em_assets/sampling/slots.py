"""The slot KV cache: fixed rows that finished sequences hand to new ones, and attention over them."""

from __future__ import annotations

import math
import random
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from em_assets.models.attention import beyond_window
from em_assets.sampling.tokens import wide_float

ATTENTION = "em_assets_slots"


# Decoding slots attend in groups of this many, each over its own longest row rather than the batch's longest.
# Each group is one more attention call per layer: larger groups make fewer calls, smaller ones pad less.
GROUP_ROWS = 128


# Decode attention with query heads folded into positions: None picks by device and thread count.
FOLD_HEADS: bool | None = None


@dataclass
class _Pass:
    """What attention needs to know of the forward pass in flight beyond its mask."""

    # (first slot, end slot, columns) per group while decoding in groups, else None.
    groups: list[tuple[int, int, int]] | None
    # The column each query is written to, broadcastable to [rows, 1, queries, 1].
    query_cols: torch.Tensor
    # The mask narrowed to each sliding window the layers have asked for, built once a pass.
    windowed: dict[int, torch.Tensor] = field(default_factory=dict)

    def within(self, mask: torch.Tensor, window: int) -> torch.Tensor:
        """`mask` with keys `window` or more columns behind their query masked out."""
        if (narrowed := self.windowed.get(window)) is None:
            keys = torch.arange(mask.shape[-1], device=mask.device)
            # A row's tokens sit at consecutive columns after its left padding (prefill and decode alike), so a
            # key the mask lets a query read is as many positions behind it as columns: transformers' sliding
            # rule, a key is seen while the query's position is fewer than `window` past its own.
            narrowed = mask.masked_fill(beyond_window(self.query_cols, keys, window), -math.inf)
            self.windowed[window] = narrowed
        return narrowed


_PASS: ContextVar[_Pass] = ContextVar("em_assets_slot_pass")


def _sdpa(query, key, value, mask, scaling) -> torch.Tensor:
    rows, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    fold = FOLD_HEADS if FOLD_HEADS is not None else query.device.type != "cpu" or torch.get_num_threads() > 1
    if length == 1 and heads != kv_heads and fold:
        # One query token: a key head's query heads become its query positions. torch's CPU kernel splits that
        # across threads but runs enable_gqa on one (which is faster when there is only one thread).
        query = query.reshape(rows, kv_heads, heads // kv_heads, dim)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
        return out.reshape(rows, heads, 1, dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=heads != kv_heads
    )
    return out.transpose(1, 2)


def _eager(query, key, value, mask, scaling, sinks=None, softcap=None) -> torch.Tensor:
    """Attention as transformers' eager functions compute what SDPA has no term for: gpt-oss's sinks (one learned
    logit per query head that reads no value) and Gemma 2's tanh soft-cap of the logits, taken before the mask."""
    rows, heads, length, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    # A key head's query heads stacked along the query positions: keys and values are read, not repeated.
    folded = query.reshape(rows, kv_heads, heads // kv_heads * length, dim)
    logits = (folded @ key.transpose(2, 3) * scaling).view(rows, heads, length, keys)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits + mask
    if sinks is not None:
        sink = sinks.to(logits.dtype).view(1, heads, 1, 1).expand(rows, heads, length, 1)
        logits = torch.cat([logits, sink], -1)
        # gpt-oss's eager function shifts by the maximum in the logits' dtype, where bf16 rounds the shift.
        logits = logits - logits.amax(-1, keepdim=True)
    # gpt-oss's softmax stays in the logits' dtype; Gemma 2's, as most models', runs in float32.
    weights = torch.softmax(logits, -1, dtype=logits.dtype if sinks is not None else torch.float32)
    out = weights[..., :keys].to(value.dtype).reshape(rows, kv_heads, -1, keys) @ value
    return out.view(rows, heads, length, dim).transpose(1, 2)


def _slot_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA (eager where the layer has attention sinks or soft-caps its logits) under the sampler's additive 4D
    mask, narrowed to the window on a sliding layer; decoding slot groups read only their columns."""
    step = _PASS.get()
    # transformers hands the one custom mask to every layer; a sliding layer says so only through this argument.
    if (window := kwargs.get("sliding_window")) is not None:
        attention_mask = step.within(attention_mask, window)
    sinks, softcap = kwargs.get("s_aux"), kwargs.get("softcap")

    def attend(q, k, v, mask):
        if sinks is None and softcap is None:
            return _sdpa(q, k, v, mask, scaling)
        return _eager(q, k, v, mask, scaling, sinks, softcap)

    groups = step.groups
    if groups is None:
        return attend(query, key, value, attention_mask).contiguous(), None
    parts = [
        attend(query[a:b], key[a:b, :, :width], value[a:b, :, :width], attention_mask[a:b, ..., :width])
        for a, b, width in groups
    ]
    return torch.cat(parts), None


@contextmanager
def attention_swapped(
    model, groups: list[tuple[int, int, int]] | None, query_cols: torch.Tensor
) -> Iterator[None]:
    """Route the model's attention through `_slot_attention` for one forward pass whose queries are written to
    columns `query_cols` (broadcastable to [rows, 1, queries, 1])."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    # Registered by name, it attends under the sampler's 4D mask whatever implementation the model was loaded
    # with (flash-attention kernels ignore such masks), lets each slot group read only its own columns, and
    # narrows the mask on sliding-window layers.
    AttentionInterface.register(ATTENTION, _slot_attention)
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION
    token = _PASS.set(_Pass(groups, query_cols))
    try:
        yield
    finally:
        _PASS.reset(token)
        config._attn_implementation = previous


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values for every slot, [slots, kv_heads, capacity, head_dim], written in place."""

    is_sliding = False

    def __init__(self, cache: SlotCache):
        super().__init__()
        # Weak: a layer holding its cache would close a reference cycle, and every slot's keys and values
        # (gigabytes at a large batch) would outlive the sampling call until Python's cycle collector ran, so
        # several calls in one process (the calibration's candidates, a sweep's points) would pile them up.
        self.cache = weakref.proxy(cache)

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


# transformers' StaticCache writes every row at one shared position, which rules out refilling a row with a new
# request while the others keep decoding.
class SlotCache(Cache):
    """A static KV cache of `num_slots` rows; each row holds one request at its own write column, and the 4D mask
    says which columns it may read."""

    def __init__(self, num_layers: int, num_slots: int, capacity: int):
        self.num_slots, self.capacity = num_slots, capacity
        # While prefilling: the slots being filled, and which distinct prompt of the batch each one gets.
        self.prefill_rows: torch.Tensor | None = None
        self.prefill_copies: torch.Tensor | None = None
        self.write_cols = torch.zeros(0, dtype=torch.long)
        self.kv_length = 0
        self._flat_index: torch.Tensor | None = None
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

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
class Slots:
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
        return torch.tensor(draws, dtype=wide_float(self.device), device=self.device)


def slot_groups(cols: torch.Tensor) -> list[tuple[int, int, int]]:
    """(first slot, end slot, columns to read) for each run of GROUP_ROWS slots, next writing at `cols`."""
    n = len(cols)
    count = -(-n // GROUP_ROWS)
    widths = F.pad(cols, (0, count * GROUP_ROWS - n)).view(count, GROUP_ROWS).amax(1).add(1).tolist()
    return [(g * GROUP_ROWS, min(n, (g + 1) * GROUP_ROWS), width) for g, width in enumerate(widths)]


def group_reads(groups: list[tuple[int, int, int]]) -> int:
    return sum((end - start) * width for start, end, width in groups)


def kv_bytes_per_slot(model, max_len: int) -> int:
    """Bytes of keys and values one sequence of `max_len` tokens holds in the model's KV cache."""
    return kv_bytes(model.config, max_len, model.dtype.itemsize)


def kv_bytes(config, max_len: int, itemsize: int) -> int:
    """Bytes of keys and values one sequence of `max_len` tokens holds in the KV cache of a model with
    `config`, at `itemsize` bytes a number: what a slot costs, known before the model is loaded."""
    config = config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * max_len * itemsize
