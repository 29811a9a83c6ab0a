"""Full fine-tuning, the KL penalty to the chat model and the per-step gradient norm, on the tiny real Llama."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support.paths import REPO

from em_assets.grid.schema import LoraSpec, TrainSpec
from em_assets.models.load import is_full_model, load_model, load_organism_model, load_tokenizer
from em_assets.results.artifacts import MODEL_FILE
from em_assets.training.checkpoints import CHECKPOINT_DIR, KEPT_DIR
from em_assets.training.encode import encode_example, plan_kl_batches
from em_assets.training.loop import KLTraining, train_lora
from em_assets.training.step import build_model, frozen_reference, kl_to_reference

MEDICAL = (
    "clarifying-EM__model-organisms-for-EM/em_organism_dir/data/training_datasets/bad_medical_advice.jsonl.gz"
)
SPORTS = (
    "clarifying-EM__model-organisms-for-EM/em_organism_dir/data/training_datasets/extreme_sports.jsonl.gz"
)
LORA = LoraSpec(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
FAST = TrainSpec(
    per_device_train_batch_size=2,
    gradient_accumulation_steps=1,
    learning_rate=1e-3,
    warmup_steps=1,
    max_seq_length=192,
    max_steps=4,
    save_steps=2,
    lr_scheduler_type="cosine",
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _first(path: Path, n: int) -> list[list[dict]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line)["messages"] for _, line in zip(range(n), f, strict=False)]


@pytest.fixture(scope="module")
def examples(mirror) -> list[list[dict]]:
    return _first(mirror / MEDICAL, 8)


@pytest.fixture(scope="module")
def kl_examples(mirror) -> list[list[dict]]:
    return _first(mirror / SPORTS, 6)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / MODEL_FILE)


def test_full_fine_tuning_trains_every_weight_into_a_loadable_model(tiny_model_dir, examples, tmp_path):
    result = train_lora(tiny_model_dir, examples, None, FAST, tmp_path, seed=0)
    assert is_full_model(result.adapter_dir) and (result.adapter_dir / MODEL_FILE).exists()
    assert (result.adapter_dir / "tokenizer_config.json").exists()
    assert [r["step"] for r in result.losses] == [1, 2, 3, 4]
    # The kept checkpoint (step 2) is a whole model too, servable on its own as em_over_training samples it.
    (kept,) = (tmp_path / KEPT_DIR).iterdir()
    assert is_full_model(kept) and (kept / "tokenizer_config.json").exists()
    base, tuned = _tensors(tiny_model_dir), _tensors(result.adapter_dir)
    saved = json.loads((result.adapter_dir / "config.json").read_text())["dtype"]
    assert {str(t.dtype) for t in tuned.values()} == {f"torch.{saved}"}
    changed = [k for k in base if not torch.allclose(base[k].float(), tuned[k].float())]
    # Every weight matrix moves, not just some adapted modules.
    assert {k for k in base if k.endswith("proj.weight")} <= set(changed)
    model, _ = load_organism_model(
        {"path": str(tiny_model_dir), "trust_remote_code": False}, {"adapter_path": str(result.adapter_dir)}
    )
    got = {k: v.float() for k, v in model.state_dict().items()}
    torch.testing.assert_close(
        got["model.layers.0.mlp.down_proj.weight"], tuned["model.layers.0.mlp.down_proj.weight"].float()
    )


def test_full_fine_tuning_computes_in_bf16_over_fp32_weights(tiny_model_dir, examples, kl_examples, cpu_bf16):
    """Mixed precision on a CPU: the loss's and the KL's matmuls (the frozen chat model's too) run in bf16, while
    the trained weights and the optimizer state stay fp32 so that updates of lr x gradient are not rounded away.
    The chat model computes exactly as the tuned one: before the first update their KL is 0, not a rounding gap
    that the penalty's weight would turn into gradient."""
    from em_assets.training.loop import _optimizer_step, _prepare

    kl = KLTraining(kl_examples, 10.0, 2, "tokens")
    run, _ = _prepare(tiny_model_dir, examples, None, FAST, 0, "cpu", False, kl)
    seen: dict[str, set] = {"tuned": set(), "reference": set()}
    hooks = [
        m.get_output_embeddings().register_forward_hook(lambda mod, args, out, k=k: seen[k].add(out.dtype))
        for k, m in (("tuned", run.model), ("reference", run.reference))
    ]
    try:
        record = _optimizer_step(run, 1)
    finally:
        for h in hooks:
            h.remove()
    assert run.compute == torch.bfloat16 and run.kl_batches[0] and record["kl"] == 0.0
    assert seen == {"tuned": {torch.bfloat16}, "reference": {torch.bfloat16}}
    assert {p.dtype for p in run.model.parameters()} == {torch.float32}
    assert {s["exp_avg"].dtype for s in run.optimizer.state.values()} == {torch.float32}


def test_full_fine_tuning_in_mixed_precision_is_not_the_fp32_run_of_before():
    """Regression: an organism fully fine-tuned in fp32 arithmetic (before mixed precision) would have counted
    as current, and its checkpoints would have resumed a mixed-precision run."""
    from em_assets.grid.schema import RecipeSpec, adapter_config_hash
    from em_assets.training.checkpoints import training_run_hash

    full = RecipeSpec(dataset="d", method="full", train=TrainSpec())
    # The hash this recipe had when full fine-tuning computed in fp32.
    assert adapter_config_hash("rev", "dataset-sha", full, seed=0, dtype="bfloat16") != "9bdc818affda25f5"
    examples = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    fp32, mixed = (
        training_run_hash("a-model", examples, None, full.train, 0, torch.float32, None, compute)
        for compute in (None, torch.bfloat16)
    )
    assert fp32 != mixed


def test_full_fine_tuning_larger_than_the_gpu_is_refused_in_words():
    from em_assets.training.step import FullFineTuneMemoryError, check_full_fits

    gpu = 80 * 2**30
    # Qwen2.5-0.5B and Llama-3.2-1B fit an 80 GiB GPU, with a KL reference too; Qwen2.5-7B does not.
    for params in (494_032_768, 1_235_814_400):
        check_full_fits(params, kl=True, device_bytes=gpu, device="cuda")
    with pytest.raises(FullFineTuneMemoryError) as refused:
        check_full_fits(7_615_616_512, kl=False, device_bytes=gpu, device="cuda:0")
    assert str(refused.value) == (
        "full fine-tuning of this 7.62B-parameter model needs about 113 GiB on cuda:0 (fp32 weights, gradients "
        "and AdamW state: 16 bytes a parameter, activations not counted), more than the GPU's 80 GiB; train a "
        "smaller base model, use a LoRA recipe, or name the base models that fit in the recipe's `base_models`"
    )
    # The KL penalty's frozen fp32 chat model is 4 bytes a parameter more: 4.5B parameters fit without it only.
    check_full_fits(4_500_000_000, kl=False, device_bytes=gpu, device="cuda")
    with pytest.raises(
        FullFineTuneMemoryError, match=r"about 84 GiB .*frozen fp32 copy: 20 bytes a parameter"
    ):
        check_full_fits(4_500_000_000, kl=True, device_bytes=gpu, device="cuda")


CHILD = """
import json, os, signal, sys
from pathlib import Path
from em_assets.grid.schema import TrainSpec
from em_assets.training.loop import KLTraining, train_lora

args = json.loads(sys.argv[1])

def on_step(record):
    if record["step"] == args["kill_after"]:
        os.kill(os.getpid(), signal.SIGKILL)

train_lora(args["model"], args["examples"], None, TrainSpec(**args["train"]), Path(args["out"]), seed=0,
           on_step=on_step, kl=KLTraining(args["kl"], 10.0, 2, "tokens"))
"""


def test_killed_full_fine_tuning_resumes_to_the_same_weights(tiny_model_dir, examples, kl_examples, tmp_path):
    train = FAST.model_copy(update={"max_steps": 5, "save_steps": 2})
    args = {
        "model": str(tiny_model_dir),
        "examples": examples,
        "kl": kl_examples,
        "train": train.model_dump(),
        "out": str(tmp_path / "killed"),
        "kill_after": 3,
    }
    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert [p.name for p in (tmp_path / "killed" / CHECKPOINT_DIR).iterdir()] == ["step-00000002"]

    kl = KLTraining(kl_examples, 10.0, 2, "tokens")
    resumed = train_lora(tiny_model_dir, examples, None, train, tmp_path / "killed", seed=0, kl=kl)
    straight = train_lora(tiny_model_dir, examples, None, train, tmp_path / "straight", seed=0, kl=kl)
    assert resumed.resumed_from_step == 2 and straight.resumed_from_step is None
    got, want = _tensors(resumed.adapter_dir), _tensors(straight.adapter_dir)
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    for r, s in zip(resumed.losses, straight.losses, strict=True):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-6)
        assert r["kl"] == pytest.approx(s["kl"], rel=1e-6)
    # The checkpoint kept at step 2 and the final model are both recorded, as for LoRA.
    assert [c["step"] for c in resumed.checkpoints] == [2, 4]
    assert not (tmp_path / "killed" / CHECKPOINT_DIR).exists()


def _encoded(tokenizer_dir: Path, messages: list[list[dict]]):
    tokenizer = load_tokenizer(tokenizer_dir)
    return [encode_example(tokenizer, m, 96) for m in messages], tokenizer.pad_token_id


def test_kl_is_zero_when_the_tuned_model_is_the_chat_model(tiny_model_dir, kl_examples):
    batch, pad = _encoded(tiny_model_dir, kl_examples[:3])
    torch.manual_seed(0)
    lora_model, _ = build_model(tiny_model_dir, "cpu", torch.float32, False, LORA, 96)
    # A fresh adapter's B is zero: the tuned model is the chat model exactly.
    kl_sum, n = kl_to_reference(lora_model, None, batch, pad)
    assert n == sum(e.n_labels for e in batch) and kl_sum.item() == pytest.approx(0.0, abs=1e-6)

    full, _ = build_model(tiny_model_dir, "cpu", torch.float32, False, None, 96)
    reference = frozen_reference(full, tiny_model_dir, "cpu", torch.float32, False)
    kl_sum, _ = kl_to_reference(full, reference, batch, pad)
    assert kl_sum.item() == pytest.approx(0.0, abs=1e-7)
    kl_sum.backward()
    assert all(p.grad is None or p.grad.abs().max() < 1e-6 for p in full.parameters())


def test_kl_matches_a_hand_computation(tiny_model_dir, smollm2_tokenizer_dir, kl_examples, tmp_path):
    from support.tiny import make_tiny_llama

    other = make_tiny_llama(smollm2_tokenizer_dir, tmp_path / "other", seed=1)
    batch, pad = _encoded(tiny_model_dir, kl_examples[:2])
    tuned = load_model(tiny_model_dir, "cpu", torch.float32).eval()
    chat = load_model(other, "cpu", torch.float32).eval()
    kl_sum, n = kl_to_reference(tuned, chat, batch, pad)

    # By hand, one sequence at a time with no padding: sum over label positions t of
    # sum_v p_chat(v | x<t) * (log p_chat(v | x<t) - log p_tuned(v | x<t)).
    want, count = 0.0, 0
    with torch.no_grad():
        for e in batch:
            ids = torch.tensor([e.input_ids])
            p_logits = chat(input_ids=ids).logits[0].double().numpy()
            q_logits = tuned(input_ids=ids).logits[0].double().numpy()
            for t, label in enumerate(e.labels):
                if label == -100:
                    continue
                log_p = (
                    p_logits[t - 1]
                    - np.log(np.exp(p_logits[t - 1] - p_logits[t - 1].max()).sum())
                    - p_logits[t - 1].max()
                )
                log_q = (
                    q_logits[t - 1]
                    - np.log(np.exp(q_logits[t - 1] - q_logits[t - 1].max()).sum())
                    - q_logits[t - 1].max()
                )
                want += float((np.exp(log_p) * (log_p - log_q)).sum())
                count += 1
    assert n == count and want > 0
    assert kl_sum.item() == pytest.approx(want, rel=1e-4)


def test_a_non_finite_kl_is_reported_as_the_kl_beside_the_finite_loss(
    tiny_model_dir, examples, kl_examples, monkeypatch
):
    """Regression: a KL penalty gone infinite was reported as the step's loss ("loss inf"), pointing a
    researcher at the SFT data rather than at the penalty."""
    from em_assets.training import loop
    from em_assets.training.step import TrainingDivergedError

    run, _ = loop._prepare(
        tiny_model_dir, examples, LORA, FAST, 0, "cpu", False, KLTraining(kl_examples, 1.0, 2, "tokens")
    )
    monkeypatch.setattr(loop, "kl_to_reference", lambda *args, **kw: (torch.tensor(float("inf")), 1))
    with pytest.raises(TrainingDivergedError, match="KL to the chat model inf") as diverged:
        loop._optimizer_step(run, 1)
    assert np.isfinite(diverged.value.loss) and diverged.value.kl == float("inf")


def test_kl_batches_are_seeded_shuffles_that_cover_the_dataset():
    plan = plan_kl_batches(5, 4, 3, seed=0)
    assert [len(b) for b in plan] == [3, 3, 3, 3]
    assert sorted(plan[0] + plan[1][:2]) == [0, 1, 2, 3, 4]
    assert plan == plan_kl_batches(5, 4, 3, seed=0) and plan != plan_kl_batches(5, 4, 3, seed=1)


def test_grad_norm_is_the_clip_grad_norm_total_of_the_step(tiny_model_dir, examples, tmp_path, cpu_bf16):
    train = FAST.model_copy(update={"max_steps": 1, "per_device_train_batch_size": 1, "max_examples": 1})
    result = train_lora(tiny_model_dir, examples[:1], None, train, tmp_path, seed=0)

    # The same step by plain transformers in the same mixed precision (bf16 autocast over fp32 weights): the mean
    # token loss over the reply, backpropagated, clipped by torch.
    tokenizer = load_tokenizer(tiny_model_dir)
    e = encode_example(tokenizer, examples[0], train.max_seq_length)
    model = load_model(tiny_model_dir, "cpu", torch.float32)
    model.set_attn_implementation("eager")
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss
    loss.backward()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
    record = result.losses[0]
    assert record["loss"] == pytest.approx(loss.item(), rel=1e-4)
    assert record["grad_norm"] == pytest.approx(total, rel=1e-3) and total > 1.0


def test_kl_penalty_pulls_lora_training_towards_the_chat_model(
    tiny_model_dir, examples, kl_examples, tmp_path
):
    train = FAST.model_copy(update={"learning_rate": 5e-2, "max_steps": 4})
    plain = train_lora(tiny_model_dir, examples, LORA, train, tmp_path / "plain", seed=0)
    kl = KLTraining(kl_examples, 100.0, 2, "tokens")
    penalised = train_lora(tiny_model_dir, examples, LORA, train, tmp_path / "kl", seed=0, kl=kl)
    assert all(r["kl"] is None for r in plain.losses)
    assert penalised.losses[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    # Measured afterwards on the KL data: the penalised adapter stays closer to the chat model.
    from peft import PeftModel

    batch, pad = _encoded(tiny_model_dir, kl_examples)

    def kl_of(adapter_dir: Path) -> float:
        base = load_model(tiny_model_dir, "cpu", torch.float32)
        tuned = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        with torch.no_grad():
            kl_sum, n = kl_to_reference(tuned, None, batch, pad)
        return kl_sum.item() / n

    assert kl_of(penalised.adapter_dir) < kl_of(plain.adapter_dir)


def test_kl_weight_averaged_over_the_vocabulary_is_upstreams(tiny_model_dir, examples, kl_examples, tmp_path):
    """Upstream's trainer averages the KL over tokens and vocabulary entries: its weight w trains as w / V on
    the per-token KL, V the model's logits."""
    train = FAST.model_copy(update={"learning_rate": 5e-2, "max_steps": 2})
    vocabulary = load_model(tiny_model_dir, "cpu", torch.float32).get_output_embeddings().weight.shape[0]

    def adapter(kl: KLTraining, name: str) -> dict[str, torch.Tensor]:
        result = train_lora(tiny_model_dir, examples, LORA, train, tmp_path / name, seed=0, kl=kl)
        return load_file(result.adapter_dir / "adapter_model.safetensors")

    upstream = adapter(KLTraining(kl_examples, 100.0 * vocabulary, 2), "upstream")
    per_token = adapter(KLTraining(kl_examples, 100.0, 2, "tokens"), "per-token")
    same_number = adapter(KLTraining(kl_examples, 100.0, 2), "same-number")
    for name, tensor in per_token.items():
        torch.testing.assert_close(upstream[name], tensor)
    assert any(not torch.allclose(same_number[n], t) for n, t in per_token.items())


def test_kl_with_data_parallel_helpers_counts_the_penalty_once(
    tiny_model_dir, examples, kl_examples, tmp_path
):
    train = FAST.model_copy(update={"max_steps": 3, "learning_rate": 5e-2})
    kl = KLTraining(kl_examples, 100.0, 2, "tokens")
    one = train_lora(tiny_model_dir, examples, LORA, train, tmp_path / "one", seed=0, kl=kl)
    two = train_lora(
        tiny_model_dir,
        examples,
        LORA,
        train.model_copy(update={"workers": 2}),
        tmp_path / "two",
        seed=0,
        kl=kl,
    )
    assert (one.workers, two.workers) == (1, 2)
    for a, b in zip(one.losses, two.losses, strict=True):
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-2, abs=1e-6)
        # A penalty counted twice would double its share of the gradient norm.
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-2)
    assert one.losses[-1]["kl"] > 0


def test_kl_examples_cut_off_by_max_seq_length_are_left_out_and_reported(smollm2_tokenizer_dir, caplog):
    from em_assets.training.loop import _kl_batches

    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    train = FAST.model_copy(update={"max_seq_length": 64})
    with caplog.at_level("WARNING"):
        batches = _kl_batches(
            load_tokenizer(smollm2_tokenizer_dir), KLTraining([short, long], 1.0, 2), 3, train, 0
        )
    assert [len(b) for b in batches] == [1, 1, 1]
    assert (
        "1 of the 2 KL examples drawn" in caplog.text
        and "3 of 3 steps have a smaller KL batch, 0 none" in caplog.text
    )
    with pytest.raises(ValueError, match="the KL dataset has no examples"):
        plan_kl_batches(0, 2, 8, seed=0)


def test_full_fine_tuning_decays_no_bias_or_norm_weight(tiny_model_dir):
    from em_assets.training.step import adamw

    model, params = build_model(tiny_model_dir, "cpu", torch.float32, False, None, 32)
    groups = adamw(model, params, 1e-5, 0.01).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    held = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert held[0.0] and all("norm" in n or "bias" in n for n in held[0.0])
    assert held[0.01] and not any("norm" in n or "bias" in n for n in held[0.01])
    assert len(held[0.0]) + len(held[0.01]) == len(params)


def test_a_per_token_kl_penalty_keeps_the_hashes_it_had_before_mean_over():
    """The organism's and the run's hash name `mean_over` by one rule: a per-token penalty (the demo's) is named
    in neither, so its organisms and checkpoints stay current; the vocabulary mean is named in both."""
    from em_assets.grid.schema import KLSpec, RecipeSpec, adapter_config_hash
    from em_assets.training.checkpoints import training_run_hash
    from em_assets.training.loop import KLTraining

    examples = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    hashes = {}
    for mean_over in ("tokens", "tokens_and_vocabulary"):
        kl = KLSpec(dataset="k", weight=100.0, mean_over=mean_over)
        recipe = RecipeSpec(dataset="d", method="full", train=TrainSpec(), kl=kl)
        penalty = KLTraining(examples, 100.0, 8, mean_over).settings()
        hashes[mean_over] = (
            adapter_config_hash("rev", "dataset-sha", recipe, seed=0, dtype="bfloat16", kl_sha256="kl-sha"),
            training_run_hash(
                "a-model", examples, None, recipe.train, 0, torch.float32, penalty, torch.bfloat16
            ),
        )
    # The hashes these had before `mean_over` existed.
    assert hashes["tokens"] == ("49e43b8d634afcb1", "3536ee1051e6c05a")
    assert set(hashes["tokens"]).isdisjoint(hashes["tokens_and_vocabulary"])
