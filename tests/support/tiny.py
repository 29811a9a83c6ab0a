"""The tiny random Llama the tests train, sample and judge with, and grid documents that run on it in seconds."""

from __future__ import annotations

from pathlib import Path


def make_tiny_llama(tokenizer_dir: Path, out: Path, seed: int = 0, layers: int = 2) -> Path:
    # Local: child processes that only build grid documents (tiny_grid) need not load torch.
    import torch
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
                # The judge here is a tiny model or a scripted server: measuring it against GPT-4o would only
                # spend requests; the agreement tests turn it on with a small split.
                "agreement": {"enabled": False},
            }
        }
    }
