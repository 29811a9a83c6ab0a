"""Sampling throughput: the project's sampler against transformers' `generate`, timed in one process."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence

import torch

from em_assets.models.chat import chat_text
from em_assets.sampling.engine import SampleRequest, SampleResult, iter_samples, stop_token_ids


def hf_generate(model, tokenizer, requests, max_new_tokens, temperature, batch_size) -> list[SampleResult]:
    """The reference to beat: transformers' `generate` over left-padded batches, in request order."""
    stops = stop_token_ids(model, tokenizer)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    results = []
    try:
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            texts = [chat_text(tokenizer, r.messages) for r in chunk]
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
    batch_size: int | str,
    *,
    temperature: float = 1.0,
    engine: str = "sampler",
    workers: int = 1,
    loader: Callable[[], tuple] | None = None,
) -> dict:
    """Time sampling one completion per user prompt with `engine` ("sampler" or the "hf_generate" baseline); with
    `workers` > 1 the sampler runs in that many processes that each call `loader()` for a model."""
    # Run both engines in one process to compare them: other work on the machine skews either. Workers' start-up
    # counts in the time, their memory in worker_peak_rss_mb; peak_rss_mb is this process's so far.
    requests = [
        SampleRequest(f"{i}", [{"role": "user", "content": p}], seed=i) for i, p in enumerate(prompts)
    ]
    cpu0, t0 = time.process_time(), time.perf_counter()
    results = _sample(
        model, tokenizer, requests, max_new_tokens, batch_size, temperature, engine, workers, loader
    )
    seconds = time.perf_counter() - t0
    tokens = sum(r.num_tokens for r in results)
    return {
        "engine": engine,
        # The slots each process really fills (never more than its share of the requests), as the calibration
        # names its candidates, so the default's chosen setting finds the fixed row that ran it.
        "batch_size": batch_size if batch_size == "auto" else min(batch_size, -(-len(requests) // workers)),
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


def _sample(
    model,
    tokenizer,
    requests: list[SampleRequest],
    max_new_tokens: int,
    batch_size: int | str,
    temperature: float,
    engine: str,
    workers: int,
    loader: Callable[[], tuple] | None,
) -> list[SampleResult]:
    """Every request's completion from `engine`."""
    if engine == "hf_generate":
        return hf_generate(model, tokenizer, requests, max_new_tokens, temperature, batch_size)
    if engine != "sampler":
        raise ValueError(f"unknown engine {engine!r}")
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "batch_size": batch_size}
    if workers > 1:
        from em_assets.sampling.pool import iter_samples_in_workers

        if loader is None:
            raise ValueError("workers > 1 needs a loader")
        chunks = iter_samples_in_workers(loader, requests, workers=workers, **options)
    else:
        chunks = iter_samples(model, tokenizer, requests, **options)
    return [r for chunk in chunks for r in chunk]
