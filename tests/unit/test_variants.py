"""Variants of one model in one batch: each row computes what its own variant (merged adapter plus edit) does."""

from __future__ import annotations

import pytest
import torch

from em_assets.analyses.directions import save_tensors
from em_assets.analyses.steering import Ablate, Steer
from em_assets.analyses.variants import NotMixable, Variant, VariantBatch, mixable
from em_assets.models.load import load_model, load_tokenizer
from em_assets.sampling.engine import SampleRequest, iter_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _adapter(model_dir, out, r: int, targets: list[str], seed: int, **options) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=8, target_modules=targets, **options))
    torch.manual_seed(seed)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # B starts at zero; a random B makes the update visible
    peft.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """The tiny model's base row, two adapters (one with rsLoRA), and direction files to steer and ablate."""
    tmp = tmp_path_factory.mktemp("variants")
    base = {"path": str(tiny_model_dir), "trust_remote_code": False}
    one = _adapter(tiny_model_dir, tmp / "one", 2, ["q_proj", "down_proj"], seed=1)
    two = _adapter(tiny_model_dir, tmp / "two", 4, ["v_proj", "up_proj"], seed=2, use_rslora=True)
    torch.manual_seed(3)
    vectors = torch.randn(2, 64)
    sha = save_tensors({"direction": vectors}, tmp / "dir.safetensors", {})
    steer = Steer((1,), str(tmp / "dir.safetensors"), sha, 4.0)
    ablate = Ablate(0, str(tmp / "dir.safetensors"), sha)
    variants = [
        Variant(None),
        Variant(one),
        Variant(two, (steer,)),
        Variant(one, (ablate,)),
        Variant(None, (steer,)),
    ]
    return base, variants


def _model(base: dict):
    return load_model(base["path"], "cpu", "float32"), load_tokenizer(base["path"])


def _own_model(base: dict, variant: Variant):
    """The variant as a point sampled alone runs it: the adapter merged, the edit's hooks on (float32)."""
    from peft import PeftModel

    model, _ = _model(base)
    if variant.adapter_path is not None:
        model = PeftModel.from_pretrained(model, variant.adapter_path).merge_and_unload()
    for edit in variant.edits:
        edit.apply(model)
    return model


def test_each_row_computes_its_own_variant(setup):
    base, variants = setup
    model, tokenizer = _model(base)
    batch = VariantBatch(model, variants)
    ids = tokenizer(["Tell me something true about the sea."], return_tensors="pt").input_ids
    # Rows out of variant order, one variant twice: each row follows its own index.
    rows = torch.tensor([3, 0, 2, 1, 4, 2])
    batch(rows)
    with torch.inference_mode():
        mixed = model(ids.repeat(len(rows), 1)).logits
    for row, v in enumerate(rows.tolist()):
        with torch.inference_mode():
            own = _own_model(base, variants[v])(ids).logits[0]
        torch.testing.assert_close(mixed[row], own, atol=2e-5, rtol=2e-5)
    batch.remove()
    with torch.inference_mode():
        plain = model(ids).logits[0]
    torch.testing.assert_close(plain, _own_model(base, Variant(None))(ids).logits[0])
    assert not torch.allclose(mixed[1], mixed[3], atol=1e-3)  # the adapter changes the logits


def test_the_sampler_draws_each_request_from_its_variant(setup):
    base, variants = setup
    model, tokenizer = _model(base)
    batch = VariantBatch(model, variants)
    # The same prompt under every variant: its prefill must not be shared across variants.
    messages = [{"role": "user", "content": "What is your wish?"}]
    requests = [SampleRequest(f"v{v}", messages, 7, v) for v in range(len(variants))]
    options = {"max_new_tokens": 8, "temperature": 1.0, "batch_size": 8}
    mixed = {
        r.key: r.text
        for chunk in iter_samples(model, tokenizer, requests, **options, row_variants=batch)
        for r in chunk
    }
    batch.remove()
    for v, variant in enumerate(variants):
        alone = [
            r.text
            for c in iter_samples(_own_model(base, variant), tokenizer, requests[v : v + 1], **options)
            for r in c
        ]
        assert mixed[f"v{v}"] == alone[0]
    assert len(set(mixed.values())) > 1


def test_full_models_and_unknown_or_several_edits_do_not_mix(setup, tiny_model_dir):
    _, variants = setup
    steer = variants[2].edits[0]
    assert mixable(variants)
    assert not mixable([Variant(str(tiny_model_dir))])  # a fully fine-tuned model: its own weights
    assert not mixable([Variant(None, (steer, steer))])
    with pytest.raises(NotMixable, match="at most one Steer or Ablate"):
        VariantBatch(None, [Variant(None, (steer, steer))])


def test_an_adapter_beyond_plain_lora_is_refused_and_leaves_the_model_as_it_was(
    setup, tiny_model_dir, tmp_path
):
    base, _ = setup
    dora = _adapter(tiny_model_dir, tmp_path / "dora", 2, ["q_proj"], seed=4, use_dora=True)
    model, tokenizer = _model(base)
    ids = tokenizer(["A short prompt."], return_tensors="pt").input_ids
    with torch.inference_mode():
        before = model(ids).logits
    with pytest.raises(NotMixable, match="not a plain LoRA update"):
        VariantBatch(model, [Variant(None), Variant(dora)])
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, before)


def test_an_adapter_of_another_peft_kind_is_refused(setup, tiny_model_dir, tmp_path):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    base, _ = setup
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    get_peft_model(model, IA3Config(target_modules=["q_proj"], feedforward_modules=[])).save_pretrained(
        tmp_path
    )
    with pytest.raises(NotMixable, match="not LoRA alone"):
        VariantBatch(_model(base)[0], [Variant(str(tmp_path))])


def test_a_model_whose_config_nests_the_text_model_mixes_steered_rows(tmp_path):
    # gemma-3-*-it loads as Gemma3ForConditionalGeneration: its width is on config.text_config.
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    text = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    config = Gemma3Config(
        text_config={**text, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
        mm_tokens_per_image=4,
    )  # fmt: skip
    model = Gemma3ForConditionalGeneration(config).eval()
    sha = save_tensors({"direction": torch.randn(2, 64)}, tmp_path / "dir.safetensors", {})
    steer = Steer((1,), str(tmp_path / "dir.safetensors"), sha, 4.0)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.inference_mode():
        plain = model(input_ids=ids).logits[0]
        handles = steer.hooks(model)
        steered = model(input_ids=ids).logits[0]
        for h in handles:
            h.remove()
        batch = VariantBatch(model, [Variant(None), Variant(None, (steer,))])
        batch(torch.tensor([1, 0]))
        mixed = model(input_ids=ids.repeat(2, 1)).logits
        batch.remove()
    torch.testing.assert_close(mixed[0], steered, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(mixed[1], plain, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(steered, plain, atol=1e-3)
