"""Where a causal LM keeps its decoder blocks, whose outputs are the residual stream (no torch import)."""


def decoder_layers(model):
    """The decoder blocks whose outputs are the residual stream after each layer (Llama, Qwen, Gemma, ...)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder.layers
