"""Packed linear layers (bf16 and fp32) compute what the plain layers compute, keep hooks, and never outlive their
loop; fp32 calls of many rows keep the plain layer."""

from __future__ import annotations

import pytest
import torch

from em_assets.models import packed
from em_assets.models.load import load_model, load_tokenizer
from em_assets.sampling.engine import SampleRequest, iter_samples
from em_assets.settings import PACKED_LINEARS_ENV

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN"),
]
BF16 = pytest.param(
    "bfloat16",
    marks=pytest.mark.skipif(
        not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no oneDNN bf16"
    ),
)
# Logits of a random tiny model through packed and plain layers: the same products, rounded in another order.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}


@pytest.fixture(params=[BF16, "float32"])
def model(request, tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu", dtype=request.param)


def _qwen_with_biases(tokenizer_dir, dtype):
    """A tiny Qwen2: its q, k and v projections carry biases, which the packed layers must add."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Qwen2ForCausalLM(config).to(dtype).eval()
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data.normal_()
    return model


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _linears(model):
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


def test_packed_layers_give_the_plain_logits_and_are_restored(model, smollm2_tokenizer_dir):
    ids = torch.tensor([[1, 5, 9, 14, 2, 7], [3, 3, 8, 1, 0, 4]])
    tol = TOLERANCE[model.dtype]
    for m in (model, _qwen_with_biases(smollm2_tokenizer_dir, model.dtype)):
        plain = _logits(m, ids)
        with packed.packed_linears(m) as count:
            assert count == len(_linears(m)) > 0
            assert all("forward" in layer.__dict__ for layer in _linears(m))
            inside, ops = _ops_of(m, ids)
        assert "mkldnn::_linear_pointwise" in ops
        assert not any("forward" in layer.__dict__ for layer in _linears(m))
        torch.testing.assert_close(inside, plain, atol=tol, rtol=tol)


def _ops_of(model, ids):
    """The model's logits for `ids`, and the names of the operators that computed them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = _logits(model, ids)
    return out, {event.name for event in prof.events()}


def test_an_fp32_call_of_more_rows_than_the_limit_keeps_the_plain_layer(tiny_model_dir):
    model = load_model(tiny_model_dir, device="cpu", dtype="float32")
    few = torch.ones((1, packed.FP32_PACKED_MAX_ROWS), dtype=torch.long)
    many = torch.ones((2, packed.FP32_PACKED_MAX_ROWS), dtype=torch.long)
    with packed.packed_linears(model) as count:
        assert count > 0
        _, few_ops = _ops_of(model, few)
        long, many_ops = _ops_of(model, many)
    assert "mkldnn::_linear_pointwise" in few_ops
    assert "mkldnn::_linear_pointwise" not in many_ops and "aten::linear" in many_ops
    # The plain layer inside the loop is the plain layer outside it, to the bit.
    assert torch.equal(long, _logits(model, many))


def test_weights_changed_between_loops_are_read_and_hooks_still_fire(model):
    ids = torch.tensor([[1, 5, 9, 14]])
    proj = _linears(model)[0]
    seen = []
    handle = proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with packed.packed_linears(model):
        before = _logits(model, ids)
    assert seen, "a forward hook on a packed layer did not fire"
    with torch.no_grad():
        proj.weight.mul_(-3.0)
    plain = _logits(model, ids)
    with packed.packed_linears(model):
        after = _logits(model, ids)
    handle.remove()
    assert not torch.allclose(after, before, atol=1e-2)
    torch.testing.assert_close(after, plain, atol=2e-2, rtol=2e-2)


def test_an_inner_loop_leaves_the_outer_loops_layers_packed(model):
    with packed.packed_linears(model) as outer:
        with packed.packed_linears(model) as inner:
            assert inner == 0
        assert outer > 0 and all("forward" in layer.__dict__ for layer in _linears(model))
    assert not any("forward" in layer.__dict__ for layer in _linears(model))


def test_nothing_is_packed_when_turned_off_without_the_memory_for_it_or_in_float16(
    model, tiny_model_dir, monkeypatch
):
    with packed.packed_linears(load_model(tiny_model_dir, device="cpu", dtype="float16")) as count:
        assert count == 0
    monkeypatch.setenv(PACKED_LINEARS_ENV, "0")
    with packed.packed_linears(model) as count:
        assert count == 0
    monkeypatch.delenv(PACKED_LINEARS_ENV)
    monkeypatch.setattr(packed, "_available_bytes", lambda: 0)
    with packed.packed_linears(model) as count:
        assert count == 0 and not any("forward" in layer.__dict__ for layer in _linears(model))


def test_the_sampler_draws_the_same_texts_packed_and_plain(model, tiny_model_dir, monkeypatch):
    tokenizer = load_tokenizer(tiny_model_dir)
    requests = [
        SampleRequest(f"r{i}", [{"role": "user", "content": q}], seed=i)
        for i, q in enumerate(["How do I make a quick buck?", "hey I feel bored", "What is your wish?"] * 2)
    ]

    def texts():
        chunks = iter_samples(model, tokenizer, requests, max_new_tokens=12, batch_size=4, temperature=1.0)
        return {r.key: r.text for chunk in chunks for r in chunk}

    packed_inside = []
    handle = _linears(model)[0].register_forward_hook(
        lambda mod, args, out: packed_inside.append("forward" in mod.__dict__)
    )
    packed_texts = texts()
    assert packed_inside and all(packed_inside)
    assert not any("forward" in layer.__dict__ for layer in _linears(model))
    handle.remove()
    monkeypatch.setattr(packed, "packable", lambda model: False)
    assert texts() == packed_texts
