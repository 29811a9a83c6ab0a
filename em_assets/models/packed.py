"""Linear layers on a CPU run on weights laid out once for oneDNN, for the length of an inference loop.

In bf16, torch's `F.linear` hands oneDNN a plain weight, which it lays out again on every call: at the few rows
of a decode step that costs as much as the multiply. In fp32 it calls the BLAS GEMM, which at a few rows (a
decode step, the language-model head over a chunk of positions) runs well below oneDNN's on packed weights, and
at a prefill's thousands of rows above it: fp32 calls of more than FP32_PACKED_MAX_ROWS rows keep the plain
layer. torch's own prepacking (the ops inductor's freezing emits) lays each weight out once. The packed copies
are made on entry and dropped on exit, so weights may change between loops (a merged adapter, the next
checkpoint) but not inside one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from em_assets.settings import settings

log = logging.getLogger(__name__)

# oneDNN's hint of how many rows a call will have; it picks one layout that serves a decode step's few rows
# and a long prefill alike.
ROWS_HINT = 64
# Where fp32's plain GEMM catches up with the packed one (docs/cpu.md, "Packed linear weights").
FP32_PACKED_MAX_ROWS = 128


def packable(model) -> bool:
    """Whether packing is on (settings), the model is a bf16 or fp32 model on the CPU, and this torch and CPU pack
    its weights (fp32 wherever oneDNN runs, bf16 where it multiplies bf16)."""
    # torch is imported in the functions: the judge's modules that use this load with the torch-free Dagster
    # definitions.
    import torch

    weight = model.get_input_embeddings().weight
    ops = torch.ops.mkldnn
    return (
        settings().packed_linears
        and weight.device.type == "cpu"
        and weight.dtype in (torch.bfloat16, torch.float32)
        and torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
        and (weight.dtype == torch.float32 or ops._is_mkldnn_bf16_supported())
    )


def _available_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def _packed_forward(weight, bias):
    import torch

    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)
    max_rows = FP32_PACKED_MAX_ROWS if weight.dtype == torch.float32 else None

    def forward(x):
        if max_rows is not None and x.numel() > max_rows * x.shape[-1]:
            return torch.nn.functional.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    return forward


@contextlib.contextmanager
def packed_linears(model) -> Iterator[int]:
    """Inside, the model's `nn.Linear` layers of its dtype (forward hooks kept) run on packed weights; yields how
    many (none where `packable` is false or the copies would take over half the free memory)."""
    import torch

    layers = []
    if packable(model):
        weight_dtype = model.get_input_embeddings().weight.dtype
        # Re-entrant: layers an enclosing context packed (their own `forward`) are left to it.
        layers = [
            m
            for m in model.modules()
            if type(m) is torch.nn.Linear and m.weight.dtype == weight_dtype and "forward" not in m.__dict__
        ]
        needed = sum(m.weight.numel() * m.weight.element_size() for m in layers)
        if needed * 2 > _available_bytes():
            log.info("linear weights not packed: %d MB would take over half the free memory", needed >> 20)
            layers = []
    try:
        with torch.no_grad():
            for m in layers:
                m.forward = _packed_forward(m.weight, m.bias)
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
