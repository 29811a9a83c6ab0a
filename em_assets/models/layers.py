"""Where a causal LM keeps its decoder blocks, whose outputs are the residual stream, and its final norm (no torch
import)."""


def decoder(model):
    """The decoder stack holding the blocks and the final norm: a multimodal model's language model (Gemma-3)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def decoder_layers(model):
    """The decoder blocks whose outputs are the residual stream after each layer (Llama, Qwen, Gemma, ...)."""
    return decoder(model).layers


def final_norm(model):
    """The norm after the last decoder block, whose output the language-model head reads."""
    return decoder(model).norm


def final_logit_softcap(model) -> float | None:
    """The cap the model's head output is soft-capped to (tanh) before it is read as logits (Gemma 2), or None."""
    return getattr(model.config.get_text_config(), "final_logit_softcapping", None)
