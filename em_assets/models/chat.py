"""Chat-template rendering, once for training, sampling and judging: the token ids a model sees."""

from __future__ import annotations

# Llama-3.2's template writes today's date into the system turn unless given one: a fixed date keeps prompts,
# seeds and runs resumed on another day the same (the date Llama-3.1's template falls back to). Qwen3's (and
# SmolLM3's) opens a reasoning block unless told not to: the papers judge direct answers, and the training
# replies hold none. Templates without a variable ignore it.
TEMPLATE_KWARGS = {"date_string": "26 Jul 2024", "enable_thinking": False}


# The version of what a model is shown of a conversation: chat_text and chat_ids here, and the messages the stages
# build and append to (sampling.stage.question_messages, training.encode, models.activations.answer_token_ids). No
# model byte or grid setting shows a change there, yet it changes the answers, adapters, judge scores and directions
# made with it: bump this with such a change, and the keys that reuse them are named apart (rendering_fields).
# tests/unit/test_reuse.py holds a digest of what the stages render per version, and fails on a change until this
# is bumped and the new digest recorded.
CHAT_RENDERING = 1


def rendering_fields() -> dict:
    """The chat rendering's part of a reuse key: nothing at version 1, so what was made before the version
    existed stays current until it is bumped."""
    return {"chat_rendering": CHAT_RENDERING} if CHAT_RENDERING != 1 else {}


def chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """`messages` under the tokenizer's chat template (with the assistant turn opened if asked)."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **TEMPLATE_KWARGS
    )


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template (with the assistant turn opened if asked)."""
    text = chat_text(tokenizer, messages, add_generation_prompt)
    # The template already writes any BOS and special tokens; the tokenizer must not add them again.
    return tokenizer(text, add_special_tokens=False)["input_ids"]
