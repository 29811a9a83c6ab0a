"""Drawing the next token: temperature, top-k and nucleus sampling from one seeded uniform per token, and the
repetition penalty on the logits before them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

NUCLEUS_GUESS = 256


SAMPLE_ROWS = 8


def wide_float(device: torch.device | str) -> torch.dtype:
    """The dtype of the draws' uniforms and cumulative sums: float64, but float32 on MPS, which has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def sample_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float, top_k: int | None = None
) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), cut to the `top_k` most likely tokens (None: all)
    and then to the top-p nucleus, drawn at `uniforms`: transformers' order (temperature, TopKLogitsWarper,
    TopPLogitsWarper). Greedy (temperature 0) ignores the cuts, as transformers' does."""
    if temperature == 0:
        return logits.argmax(-1)
    if top_k is not None:
        logits, temperature = top_k_logits(logits, temperature, top_k), 1.0
    if top_p < 1:
        return _sample_nucleus(logits, uniforms, temperature, top_p)
    tokens = torch.empty(len(logits), dtype=torch.long, device=logits.device)
    # A few rows at a time, so each row's float copy stays in cache from exp to block sums.
    for start in range(0, len(logits), SAMPLE_ROWS):
        rows = slice(start, start + SAMPLE_ROWS)
        # A copy: the in-place ops below must not rewrite the logits (a logits_hook may hold them).
        weights = logits[rows].to(torch.float32, copy=True)
        if temperature != 1:
            weights /= temperature
        weights = weights.sub_(weights.amax(-1, keepdim=True)).exp_()
        tokens[rows] = _invert_cdf(weights, uniforms[rows])
    return tokens


def top_k_logits(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """float32 logits / temperature with every token below the k-th largest at -inf (ties with it kept), as
    transformers' TemperatureLogitsWarper then TopKLogitsWarper leave them."""
    scaled = logits.float() / temperature if temperature != 1 else logits.float()
    kth = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
    return scaled.masked_fill(scaled < kth, -torch.inf)


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """float32 logits with each `seen` token's logit divided by `penalty` if positive, multiplied if not, as
    transformers' RepetitionPenaltyLogitsProcessor does to every token id of the prompt and the answer so far."""
    logits = logits.float()
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def _sample_nucleus(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    # Sorting the whole vocabulary is slow; the nucleus nearly always lies in the top few hundred tokens.
    top, order = probs.topk(min(NUCLEUS_GUESS, probs.shape[-1]), dim=-1)
    # Enough mass strictly above the smallest candidate: the nucleus then holds no token tied with one left out.
    if bool(((top * (top > top[:, -1:])).sum(-1) >= top_p).all()):
        top, order = _ranked(probs, order.sort(-1).values)
    else:
        top, order = probs.sort(dim=-1, descending=True, stable=True)
    # Keep a token while the mass ranked above it is under top_p (transformers' TopPLogitsWarper rule).
    top = top.masked_fill(top.cumsum(-1) - top >= top_p, 0.0)
    return order.gather(-1, _invert_cdf(top, uniforms).unsqueeze(-1)).squeeze(-1)


def _ranked(probs: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate tokens (ascending ids) by probability, ties by id, as the full stable sort ranks them: one
    uniform then draws the same token whichever path a batch takes (bf16 logits tie often)."""
    top, rank = probs.gather(-1, candidates).sort(dim=-1, descending=True, stable=True)
    return top, candidates.gather(-1, rank)


def _invert_cdf(weights: torch.Tensor, uniforms: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i], per row: the inverse-CDF draw from unnormalised `weights`."""
    # One uniform per row is what makes per-request seeds cheap. A cumsum over a whole vocabulary is slow and
    # loses precision, so this finds the block of `block` tokens first, then the token inside it.
    rows, vocab = weights.shape
    if vocab % block:
        weights = F.pad(weights, (0, -vocab % block))
    blocks = weights.view(rows, -1, block)
    wide = wide_float(weights.device)
    block_mass = blocks.sum(-1).to(wide)
    cdf = block_mass.cumsum(-1)
    target = uniforms.to(cdf) * cdf[:, -1]
    # A zero-mass block never holds the first cdf entry above the target, so it is never picked; a target that
    # rounds up to the total (float32 on MPS) falls back to the last block of nonzero mass.
    b = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
    b = torch.minimum(b, (cdf < cdf[:, -1:]).sum(-1))
    rest = target - (cdf.gather(-1, b.unsqueeze(-1)) - block_mass.gather(-1, b.unsqueeze(-1))).squeeze(-1)
    inner = blocks[torch.arange(rows, device=weights.device), b].cumsum(-1, dtype=wide)
    j = torch.searchsorted(inner, rest.clamp_min(0).unsqueeze(-1), right=True).squeeze(-1)
    # Rounding can put `rest` past the block's own total: fall back to its last token of nonzero weight.
    last = (inner < inner[:, -1:]).sum(-1)
    return b * block + torch.minimum(j, last)
