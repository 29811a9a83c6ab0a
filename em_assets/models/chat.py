"""Chat-template rendering, once for training, sampling and judging: the token ids a model sees."""

from __future__ import annotations


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template (with the assistant turn opened if asked)."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    # The template already writes any BOS and special tokens; the tokenizer must not add them again.
    return tokenizer(text, add_special_tokens=False)["input_ids"]
