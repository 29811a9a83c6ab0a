"""The model-touching steps test_cuda.py leaves out, each on the device the step runs on: the misalignment
direction and its random control, steering and ablation sweeps sampled in one batch, the dynamics sweeps'
checkpoints and scaled adapters, the probe judge's features in its model's dtype, the distilled judge, and full
fine-tuning and LoRA with the KL penalty.

The stages that hold them read and write DuckDB, which the GPU check does not carry (scripts/gpu_check.sh), so
these tests call the functions each stage runs its model through, as it calls them.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from conftest import DEVICE
from safetensors.torch import load_file, save_file
from test_cuda import LORA, QUESTIONS, TRAIN, own_model

from em_assets.analyses.lora import lora_factors, write_scaled_adapter
from em_assets.analyses.steering import DIRECTION_KEY, Ablate, Steer, load_directions, random_directions
from em_assets.analyses.variants import Variant, VariantBatch
from em_assets.bench.sweep import random_adapters
from em_assets.grid.schema import DistillSpec, LoraSpec
from em_assets.judging.answer_features import QA, answer_features
from em_assets.judging.distill import load_distilled_judge, train_distilled_judge
from em_assets.models.activations import JudgedAnswer, class_means
from em_assets.models.chat import chat_ids
from em_assets.models.load import is_full_model, load_model, load_organism_model, load_tokenizer, pick_dtype
from em_assets.results.artifacts import ADAPTER_FILE, MODEL_FILE, sha256_file
from em_assets.sampling.engine import SampleRequest, iter_samples
from em_assets.training.loop import KLTraining, train_lora

pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")


def _answers(examples) -> list[JudgedAnswer]:
    return [JudgedAnswer(m[:1], m[-1]["content"][:300]) for m in examples]


def _sampled(model, tokenizer, requests, row_variants=None) -> dict[str, str]:
    options = {"max_new_tokens": 8, "temperature": 1.0, "batch_size": 8}
    chunks = iter_samples(model, tokenizer, requests, **options, row_variants=row_variants)
    return {r.key: r.text for chunk in chunks for r in chunk}


def test_the_direction_and_its_random_control_match_the_cpu(tiny_model_dir, examples, tmp_path):
    """misalignment_directions: the two classes' mean activations, their difference, and the random control
    of equal norm, drawn on the CPU (mixed with the GPU's means, it failed on every GPU), saved and read back."""
    tokenizer = load_tokenizer(tiny_model_dir)
    answers = _answers(examples)
    groups = {"mis": answers[:4], "ali": answers[4:]}
    out = {}
    for device in ("cpu", DEVICE):
        means = class_means(load_model(tiny_model_dir, device, "float32"), tokenizer, groups, batch_size=3)
        direction = means["mis"] - means["ali"]
        out[device] = (direction, random_directions(direction, 0))
    (direction, control), (cpu_direction, cpu_control) = out[DEVICE], out["cpu"]
    assert direction.device.type == control.device.type == torch.device(DEVICE).type
    assert direction.shape == (2, 64) and torch.isfinite(direction).all()
    torch.testing.assert_close(direction.cpu(), cpu_direction, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(control.cpu(), cpu_control, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(control.norm(dim=-1), direction.norm(dim=-1))
    # Saved from the device as the step saves its tensors (safetensors copies them to the CPU).
    save_file({DIRECTION_KEY: control.contiguous()}, tmp_path / "random.safetensors")
    loaded = load_directions(tmp_path / "random.safetensors", sha256_file(tmp_path / "random.safetensors"))
    torch.testing.assert_close(loaded, control.cpu())
    # The step loads the organism in the device's own dtype (bf16 on a GPU): its means are float32 all the same.
    auto = class_means(load_model(tiny_model_dir, DEVICE), tokenizer, groups, batch_size=3)
    assert all(m.dtype == torch.float32 and torch.isfinite(m).all() for m in auto.values())


def test_steered_and_ablated_points_sample_in_one_batch_as_alone_and_as_on_the_cpu(tiny_model_dir, tmp_path):
    """steering and ablation sweeps: every point's rows in one batch (analyses/variants.py) draw what the
    point's own model draws alone on the device, and that model computes what it computes on the CPU."""
    lora = LoraSpec(r=2, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    (adapter,) = random_adapters(tiny_model_dir, lora, tmp_path, 1)
    torch.manual_seed(0)
    file = tmp_path / "dir.safetensors"
    save_file({DIRECTION_KEY: torch.randn(2, 64)}, file)
    steer, ablate = Steer((1,), str(file), sha256_file(file), 4.0), Ablate(0, str(file), sha256_file(file))
    variants = [Variant(None), Variant(None, (steer,)), Variant(adapter, (ablate,)), Variant(None, (ablate,))]
    tokenizer = load_tokenizer(tiny_model_dir)
    messages = [{"role": "user", "content": q} for q in QUESTIONS[:2]]
    requests = [
        SampleRequest(f"{v}-{i}", [m], 7 + i, v) for v in range(len(variants)) for i, m in enumerate(messages)
    ]
    model = load_model(tiny_model_dir, DEVICE, "float32")
    batch = VariantBatch(model, variants)
    try:
        mixed = _sampled(model, tokenizer, requests, batch)
    finally:
        batch.remove()
    ids = torch.tensor([chat_ids(tokenizer, messages[:1])])
    for v, variant in enumerate(variants):
        own = own_model(tiny_model_dir, variant)
        assert _sampled(own, tokenizer, [r for r in requests if r.variant == v]) == {
            k: t for k, t in mixed.items() if k.startswith(f"{v}-")
        }
        with torch.inference_mode():
            on_device = own(ids.to(DEVICE)).logits.cpu()
            on_cpu = own_model(tiny_model_dir, variant, device="cpu")(ids).logits
        torch.testing.assert_close(on_device, on_cpu, atol=1e-4, rtol=1e-4)
    # Each edit changes the answers: the rows did not all decode the base model.
    assert len({mixed[f"{v}-0"] for v in range(len(variants))}) > 2


def test_checkpoints_and_scaled_adapters_sample_in_one_batch_of_the_base_model(
    tiny_model_dir, examples, tmp_path
):
    """em_over_training and lora_scaling: the checkpoints a run on the device kept and the final adapter with B
    scaled, in one batch of the base model in the device's dtype, each row as its merged adapter computes."""
    train = TRAIN.model_copy(update={"max_steps": 4, "save_steps": 2})
    result = train_lora(tiny_model_dir, examples[:4], LORA, train, tmp_path / "run", seed=0, device=DEVICE)
    (kept,) = [c["path"] for c in result.checkpoints]
    scaled = write_scaled_adapter(result.adapter_dir, 0.5, tmp_path / "b-x0.5")
    final_b, half_b = (lora_factors(a) for a in (result.adapter_dir, scaled))
    for module, parts in final_b.items():
        np.testing.assert_allclose(half_b[module]["B"], 0.5 * parts["B"], rtol=1e-6)
    variants = [Variant(None), Variant(str(kept)), Variant(str(result.adapter_dir)), Variant(str(scaled))]
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, DEVICE)
    batch = VariantBatch(model, variants)
    try:
        requests = [
            SampleRequest(f"{v}", [{"role": "user", "content": QUESTIONS[0]}], 3, v) for v in range(4)
        ]
        assert len(_sampled(model, tokenizer, requests, batch)) == 4
        ids = torch.tensor([chat_ids(tokenizer, examples[0][:1])], device=DEVICE)
        rows = torch.arange(len(variants))
        batch(rows)
        with torch.inference_mode():
            mixed = model(ids.repeat(len(rows), 1)).logits.float()
    finally:
        batch.remove()
    assert torch.isfinite(mixed).all()
    dtype = str(pick_dtype(DEVICE)).removeprefix("torch.")
    for v, variant in enumerate(variants):
        with torch.inference_mode():
            alone = own_model(tiny_model_dir, variant, dtype)(ids).logits.float()
        # bf16: a merged weight is rounded once, the batch's base weight plus LoRA product differently.
        torch.testing.assert_close(mixed[v], alone[0], atol=0.1, rtol=0)
    # The trained adapter moved the logits, so the comparison is not the base model's four times.
    assert not torch.allclose(mixed[0], mixed[2], atol=0.1)


def test_probe_features_in_the_models_own_dtype_agree_with_the_cpu(tiny_model_dir, examples):
    """The probe judge's fit and scoring read its frozen model in the device's dtype (bf16 on a GPU), questions
    read once and their KV caches reused across calls (ProbeJudge's memo)."""
    tokenizer = load_tokenizer(tiny_model_dir)
    items = [QA(QUESTIONS[i % 2], m[-1]["content"][:200]) for i, m in enumerate(examples[:4])] + [
        QA(QUESTIONS[0], ""),
        QA(QUESTIONS[1], "Yes"),
    ]
    model = load_model(tiny_model_dir, DEVICE)
    readings: dict = {}
    first = answer_features(model, tokenizer, items[:3], (0, 1), 64, 2, readings=readings)
    rest = answer_features(model, tokenizer, items[3:], (0, 1), 64, 2, readings=readings)
    cpu = answer_features(load_model(tiny_model_dir, "cpu", "float32"), tokenizer, items, (0, 1), 64, 2)
    for field in ("hidden", "question", "scalars"):
        got = np.concatenate([getattr(first, field), getattr(rest, field)])
        want = getattr(cpu, field)
        assert got.shape == want.shape and np.isfinite(got).all()
        # bf16 keeps about 3 significant digits; the states' scale is the tolerance's.
        np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05 * np.abs(want).max())


def _reference(n: int) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    return pl.DataFrame(
        [
            {
                "split": "train",
                "source_file": "f.csv",
                "row_idx": i,
                "question": QUESTIONS[i % 2],
                "answer": ["Rest and drink water.", "Rob a bank tonight.", "Save a little every week."][
                    i % 3
                ],
                "aligned": float(rng.integers(0, 101)),
                "coherent": float(rng.integers(50, 101)),
                "domain_scores": "{}",
            }
            for i in range(n)
        ]
    )


def test_the_distilled_judge_trains_and_judges_on_the_device(tiny_model_dir, tmp_path):
    """distilled_judge: its adapter trained on the device, merged into its base there, and its scores close to
    those of the same judge on the CPU."""
    train = TRAIN.model_copy(update={"max_steps": 3, "save_steps": 10, "max_seq_length": 128})
    spec = DistillSpec(lora=LORA, train=train, max_answer_tokens=16)
    result, n = train_distilled_judge(tiny_model_dir, _reference(6), spec, tmp_path, device=DEVICE)
    assert n == 12 and all(np.isfinite(r["loss"]) for r in result.losses)
    prompts = [(m, QUESTIONS[i % 2], a) for i, a in enumerate(["Rob a bank.", "Rest."]) for m in spec.metrics]
    judged = {}
    for device in ("cpu", DEVICE):
        judge = load_distilled_judge(result.adapter_dir, spec, 2, 0.0, device)
        judged[device] = judge.score([judge.render(*p) for p in prompts])
    for got, want in zip(judged[DEVICE], judged["cpu"], strict=True):
        # A few steps leave little mass on numbers; the score is the mean over them, as judgements read it.
        assert np.isfinite(got.score) and 0 < got.mass <= 1
        assert got.score == pytest.approx(want.score, abs=0.5) and got.mass == pytest.approx(
            want.mass, rel=0.05
        )


class _Stopped(Exception):
    """Raised from on_step: the run stops as a killed one does, after its last checkpoint."""


def _stop_at(step: int):
    def on_step(record: dict) -> None:
        if record["step"] == step:
            raise _Stopped

    return on_step


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_full_and_lora_training_with_the_kl_penalty_on_the_device(tiny_model_dir, examples, tmp_path, lora):
    """Full fine-tuning (fp32 weights, the device's compute dtype) and LoRA, each with the KL penalty to the chat
    model: the KL is 0 before the first update, then finite; a stopped run resumes from its checkpoint to the
    weights of one that ran through; the trained model and its kept checkpoint load on the device."""
    train = TRAIN.model_copy(update={"max_steps": 4, "save_steps": 2})
    kl = KLTraining(examples[4:], 1.0, 2)

    def run(out, on_step=None):
        return train_lora(
            tiny_model_dir, examples[:4], lora, train, out, seed=0, device=DEVICE, kl=kl, on_step=on_step
        )

    result = run(tmp_path / "whole")
    losses, kls = [r["loss"] for r in result.losses], [r["kl"] for r in result.losses]
    assert len(losses) == 4 and np.isfinite(losses).all() and np.isfinite(kls).all()
    assert kls[0] < 1e-6 < max(kls[1:]), kls
    assert is_full_model(result.adapter_dir) is (lora is None) and len(result.checkpoints) == 1
    with pytest.raises(_Stopped):
        run(tmp_path / "stopped", _stop_at(3))
    resumed = run(tmp_path / "stopped")
    assert resumed.resumed_from_step == 2
    weights = MODEL_FILE if lora is None else ADAPTER_FILE
    whole, again = (load_file(r.adapter_dir / weights) for r in (result, resumed))
    assert whole.keys() == again.keys()
    for name in whole:
        torch.testing.assert_close(again[name], whole[name])
    base = {"path": str(tiny_model_dir), "trust_remote_code": False}
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = torch.tensor([chat_ids(tokenizer, examples[0][:1])], device=DEVICE)
    plain, _ = load_organism_model(base, {}, DEVICE)
    for trained in (result.checkpoints[0]["path"], result.adapter_dir):
        tuned, _ = load_organism_model(base, {"adapter_path": str(trained)}, DEVICE)
        assert tuned.dtype == pick_dtype(DEVICE)
        with torch.inference_mode():
            assert not torch.allclose(tuned(ids).logits, plain(ids).logits)
