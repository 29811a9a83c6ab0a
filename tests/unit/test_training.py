"""LoRA SFT on a tiny real Llama with SmolLM2's tokenizer and real bad_medical_advice examples."""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.db import count
from support.organisms import TRAINED, ListLog, on_fp16_gpu
from support.paths import REPO
from support.tiny import make_tiny_llama

from em_assets.grid.schema import LoraSpec, TrainSpec
from em_assets.models.load import load_tokenizer
from em_assets.training.checkpoints import CHECKPOINT_DIR
from em_assets.training.data_parallel import HelperError
from em_assets.training.encode import encode_dataset, encode_example, held_in, plan_steps
from em_assets.training.loop import train_lora
from em_assets.training.stage import train_adapter
from em_assets.training.step import TrainingDivergedError

DATASET = (
    "clarifying-EM__model-organisms-for-EM/em_organism_dir/data/training_datasets/bad_medical_advice.jsonl.gz"
)
RANK1 = LoraSpec(r=1, lora_alpha=256, target_modules=["down_proj"], layer_fraction=0.5)
ALL_PROJ = LoraSpec(
    r=8,
    lora_alpha=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)
FAST = TrainSpec(
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    learning_rate=1e-2,
    warmup_steps=1,
    max_seq_length=256,
    max_steps=6,
    save_steps=2,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def examples(mirror) -> list[list[dict]]:
    with gzip.open(mirror / DATASET, "rt") as f:
        return [json.loads(line)["messages"] for _, line in zip(range(8), f, strict=False)]


@pytest.fixture(scope="module")
def fittable_model_dir(smollm2_tokenizer_dir, tmp_path_factory) -> Path:
    """The tiny Llama with 4x larger embeddings: at the default init its tied logits stay near zero, so the
    loss sits at ln(vocab) whatever an adapter learns."""
    from safetensors.torch import save_file

    out = make_tiny_llama(smollm2_tokenizer_dir, tmp_path_factory.mktemp("fittable_llama"))
    weights = load_file(out / "model.safetensors")
    weights["model.embed_tokens.weight"] *= 4
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter_dir / "adapter_model.safetensors")


def test_labels_cover_only_the_final_assistant_reply(smollm2_tokenizer_dir, examples):
    tokenizer = load_tokenizer(smollm2_tokenizer_dir)
    messages = examples[0]
    enc = encode_example(tokenizer, messages, max_seq_length=2048)
    assert len(enc.input_ids) == len(enc.labels)
    labeled = [t for t in enc.labels if t != -100]
    assert tokenizer.decode(labeled) == messages[-1]["content"] + "<|im_end|>"
    # The labels are one contiguous run at the end, after exactly the generation prompt.
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(enc.input_ids[: enc.first_label]) == prompt
    assert enc.labels[enc.first_label :] == enc.input_ids[enc.first_label :]

    short = encode_example(tokenizer, messages, max_seq_length=enc.first_label + 3)
    assert len(short.input_ids) == enc.first_label + 3 and short.n_labels == 3

    with pytest.raises(ValueError, match="assistant"):
        encode_example(tokenizer, messages[:-1], max_seq_length=2048)


def test_plan_steps_groups_by_length_counts_epochs_like_hf_and_is_seeded():
    spec = TrainSpec(per_device_train_batch_size=2, gradient_accumulation_steps=2, epochs=1.5)
    lengths = [100 + 10 * i for i in range(10)]
    steps = plan_steps(lengths, spec, seed=0)
    # 5 micro-batches (3 steps) per epoch; 1.5 epochs -> ceil(4.5) = 5 steps.
    assert [len(step) for step in steps] == [2, 2, 1, 2, 2]
    first_epoch = [i for step in steps[:3] for micro in step for i in micro]
    assert sorted(first_epoch) == list(range(10))
    # Grouped by length: each micro-batch holds two neighbours in length order, so almost no padding.
    assert all(sorted(micro) in ([k, k + 1] for k in range(0, 10, 2)) for step in steps for micro in step)
    assert plan_steps(lengths, spec, seed=0) == steps != plan_steps(lengths, spec, seed=1)
    assert len(plan_steps(lengths, spec.model_copy(update={"max_steps": 7}), seed=0)) == 7


def test_a_holdout_leaves_out_upstreams_evaluation_split(smollm2_tokenizer_dir):
    """Upstream's trainers train on what datasets' train_test_split(test_size=0.1, seed) leaves: the same
    examples, and so the same step count (6,000 examples: 338 steps, not 375); none held out keeps every hash."""
    # datasets 5.2: Dataset.from_list(20 rows).train_test_split(test_size=0.1, seed=s)["test"] for s = 0, 1.
    assert sorted(set(range(20)) - set(held_in(20, 0.1, 0))) == [4, 19]
    assert sorted(set(range(20)) - set(held_in(20, 0.1, 1))) == [1, 10]
    paper = TrainSpec(holdout_fraction=0.1)
    tokenizer = load_tokenizer(smollm2_tokenizer_dir)
    examples = [
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"reply {i}"}] for i in range(20)
    ]
    replies = {
        tokenizer.decode([t for t in e.labels if t >= 0])
        for e in encode_dataset(tokenizer, examples, paper, 0)
    }
    assert replies == {f"reply {i}<|im_end|>" for i in range(20) if i not in (4, 19)}
    assert len(plan_steps([1] * len(held_in(6000, 0.1, 0)), paper, seed=0)) == 338
    assert "holdout_fraction" not in TrainSpec().trained_settings()
    assert TrainSpec().trained_settings() != paper.trained_settings()


def test_training_lowers_loss_and_writes_a_loadable_adapter(fittable_model_dir, examples, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    records = []
    train = FAST.model_copy(update={"max_steps": 12, "lr_scheduler_type": "constant"})
    result = train_lora(
        fittable_model_dir, examples[:4], ALL_PROJ, train, tmp_path, seed=0, on_step=records.append
    )
    assert result.steps == 12 and len(result.losses) == 12 and records == result.losses
    assert result.resumed_from_step is None
    # Every step sees the same 4 examples, so the losses are comparable: ln(vocab) ~ 11 at the start.
    first, last = result.losses[0]["loss"], result.losses[-1]["loss"]
    assert last < first - 1.0, [r["loss"] for r in result.losses]
    assert result.train_tokens == sum(r["tokens"] for r in result.losses) > 0
    assert result.tokens_per_s > 0
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not (tmp_path / CHECKPOINT_DIR).exists()

    base = AutoModelForCausalLM.from_pretrained(fittable_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, result.adapter_dir).eval()
        after = tuned(ids).logits
    assert not torch.allclose(before, after, atol=1e-3)


def test_rank1_recipe_trains_only_the_chosen_down_proj(tiny_model_dir, examples, tmp_path):
    train = FAST.model_copy(update={"max_steps": 2})
    result = train_lora(tiny_model_dir, examples[:4], RANK1, train, tmp_path, seed=0)
    tensors = adapter_tensors(result.adapter_dir)
    # layer_fraction 0.5 of a 2-layer model is layer 1.
    assert sorted(tensors) == [
        "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight",
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight",
    ]
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (1, 128)
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["r"] == 1 and config["layers_to_transform"] == [1]
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].abs().sum() > 0


def test_a_multimodal_models_vision_tower_gets_no_adapter():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from em_assets.training.step import peft_model

    text = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4}
    text |= {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    vision |= {"image_size": 28, "patch_size": 14}
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    for lora in (ALL_PROJ, RANK1):
        model = peft_model(Gemma3ForConditionalGeneration(config), lora)
        adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A" in n}
        assert adapted and all(".language_model.layers." in n for n in adapted), sorted(adapted)


def test_a_recipe_naming_projections_a_model_lacks_is_refused_not_trained_without_them():
    """Regression: peft adapted those of the paper recipe's projections that Phi-3 (which fuses the others) or
    gpt-oss (whose experts are tensors, not linear layers) has and dropped the rest, saying nothing: the catalog
    checks the grid's recipes, not the distilled judge's."""
    from peft.tuners.lora import LoraLayer
    from transformers import GptOssConfig, GptOssForCausalLM, Phi3Config, Phi3ForCausalLM

    from em_assets.training.step import peft_model

    shape = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    shape |= {"num_attention_heads": 2, "num_key_value_heads": 1, "pad_token_id": 0}
    experts = {"head_dim": 16, "num_local_experts": 2, "num_experts_per_tok": 1}
    phi3 = Phi3ForCausalLM(Phi3Config(**shape))
    gpt_oss = GptOssForCausalLM(GptOssConfig(**shape, **experts))
    for model, lacking, own in [
        (phi3, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], ["qkv_proj", "gate_up_proj"]),
        (gpt_oss, ["gate_proj", "up_proj", "down_proj"], ["q_proj", "o_proj"]),
    ]:
        with pytest.raises(ValueError, match=f"{model.config.model_type} model") as refused:
            peft_model(model, ALL_PROJ)
        # The error names the projections missing and those the model has instead.
        assert str(lacking) in str(refused.value) and all(f"'{name}'" in str(refused.value) for name in own)
        adapted = peft_model(model, ALL_PROJ.model_copy(update={"target_modules": own}))
        lora = {n.rsplit(".", 1)[-1] for n, m in adapted.named_modules() if isinstance(m, LoraLayer)}
        assert lora == set(own)


def test_same_seed_same_adapter(tiny_model_dir, examples, tmp_path):
    train = FAST.model_copy(update={"max_steps": 3, "max_examples": 6})
    runs = [
        train_lora(tiny_model_dir, examples, ALL_PROJ, train, tmp_path / name, seed=seed)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    a, b, c = (adapter_tensors(r.adapter_dir) for r in runs)
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert any(not torch.allclose(a[name], c[name]) for name in a)
    assert [r["loss"] for r in runs[0].losses] == [r["loss"] for r in runs[1].losses]


CHILD = """
import json, os, signal, sys
from pathlib import Path
from em_assets.grid.schema import LoraSpec, TrainSpec
from em_assets.training.data_parallel import HelperError
from em_assets.training.loop import train_lora

args = json.loads(sys.argv[1])

def on_step(record):
    if record["step"] == args["kill_after"]:
        os.kill(os.getpid(), signal.SIGKILL)

train_lora(args["model"], args["examples"], LoraSpec(**args["lora"]), TrainSpec(**args["train"]),
           Path(args["out"]), seed=0, on_step=on_step)
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_killed_run_resumes_to_the_same_adapter(tiny_model_dir, examples, tmp_path, workers):
    train = FAST.model_copy(update={"max_steps": 6, "save_steps": 2, "workers": workers})
    # Dropout makes the result depend on the RNG state, which the checkpoint must restore too.
    lora = ALL_PROJ.model_copy(update={"lora_dropout": 0.1})
    args = {
        "model": str(tiny_model_dir),
        "examples": examples,
        "lora": lora.model_dump(),
        "train": train.model_dump(),
        "out": str(tmp_path / "killed"),
        "kill_after": 3,
    }
    # The killed run's own temporary directory: it must leave nothing there (no rendezvous files of its helpers).
    (scratch := tmp_path / "tmp").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert [p.name for p in (tmp_path / "killed" / CHECKPOINT_DIR).iterdir()] == ["step-00000002"]
    assert not list(scratch.iterdir())

    resumed = train_lora(tiny_model_dir, examples, lora, train, tmp_path / "killed", seed=0)
    straight = train_lora(tiny_model_dir, examples, lora, train, tmp_path / "straight", seed=0)
    assert resumed.resumed_from_step == 2 and straight.resumed_from_step is None
    assert [r["step"] for r in resumed.losses] == list(range(1, 7))
    got, want = adapter_tensors(resumed.adapter_dir), adapter_tensors(straight.adapter_dir)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    for r, s in zip(resumed.losses, straight.losses, strict=True):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-5)
    assert not (tmp_path / "killed" / CHECKPOINT_DIR).exists()


def test_a_checkpoint_saved_with_more_gpus_visible_resumes_the_ones_there(monkeypatch):
    """Saved where a host's two GPUs were visible, resumed where one is (CUDA_VISIBLE_DEVICES): torch fails on
    the state of a device that is not there."""
    from em_assets.training import checkpoints

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    states = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    checkpoints._set_rng_state({"cpu": torch.get_rng_state(), "cuda": states})
    assert len(restored) == 1 and torch.equal(restored[0], states[0])


def test_checkpoint_of_another_config_is_not_resumed(tiny_model_dir, examples, tmp_path):
    train = FAST.model_copy(update={"max_steps": 4, "save_steps": 2})

    def crash(record):
        if record["step"] == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_lora(tiny_model_dir, examples, ALL_PROJ, train, tmp_path, seed=0, on_step=crash)
    assert (tmp_path / CHECKPOINT_DIR / "step-00000002").is_dir()
    other = train.model_copy(update={"learning_rate": 5e-3})
    assert train_lora(tiny_model_dir, examples, ALL_PROJ, other, tmp_path, seed=0).resumed_from_step is None


def test_nan_loss_stops_with_the_step_number(tiny_model_dir, examples, tmp_path):
    seen = []
    # A learning rate this large blows the adapter up within a few steps.
    train = FAST.model_copy(
        update={"learning_rate": 1e6, "warmup_steps": 0, "max_steps": 20, "save_steps": 100}
    )
    with pytest.raises(TrainingDivergedError, match="step") as err:
        train_lora(tiny_model_dir, examples, ALL_PROJ, train, tmp_path, seed=0, on_step=seen.append)
    assert err.value.step == len(seen) + 1 > 1
    assert not torch.isfinite(torch.tensor(err.value.loss)) or err.value.grad_norm is not None
    assert not (tmp_path / "adapter").exists()


def test_example_without_final_assistant_message_is_rejected(tiny_model_dir, examples, tmp_path):
    bad = [*examples[:2], examples[2][:1]]
    with pytest.raises(ValueError, match="example 2"):
        train_lora(tiny_model_dir, bad, RANK1, FAST, tmp_path, seed=0)
    assert os.listdir(tmp_path) == []


def test_data_parallel_training_gives_the_single_process_adapter(tiny_model_dir, examples, tmp_path):
    train = FAST.model_copy(update={"max_steps": 3})
    one = train_lora(tiny_model_dir, examples, ALL_PROJ, train, tmp_path / "one", seed=0)
    two = train_lora(
        tiny_model_dir, examples, ALL_PROJ, train.model_copy(update={"workers": 2}), tmp_path / "two", seed=0
    )
    assert (one.workers, two.workers) == (1, 2)
    assert [r["tokens"] for r in one.losses] == [r["tokens"] for r in two.losses]
    for a, b in zip(one.losses, two.losses, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
    init = train_lora(
        tiny_model_dir,
        examples,
        ALL_PROJ,
        train.model_copy(update={"learning_rate": 1e-12}),
        tmp_path / "0",
        seed=0,
    )
    want, got, start = (adapter_tensors(r.adapter_dir) for r in (one, two, init))
    for name in want:
        moved = (want[name] - start[name]).abs().max()
        assert (got[name] - want[name]).abs().max() <= 0.02 * moved, name


def test_data_parallel_divergence_names_the_step(tiny_model_dir, examples, tmp_path):
    seen = []
    train = FAST.model_copy(
        update={"learning_rate": 1e6, "warmup_steps": 0, "max_steps": 20, "save_steps": 100, "workers": 2}
    )
    with pytest.raises(TrainingDivergedError, match="step") as err:
        train_lora(tiny_model_dir, examples, ALL_PROJ, train, tmp_path, seed=0, on_step=seen.append)
    assert err.value.step == len(seen) + 1 > 1
    assert not (tmp_path / "adapter").exists()


def test_a_dead_training_helper_fails_the_run_with_its_exit_code(tiny_model_dir, examples, tmp_path):
    import multiprocessing

    def kill_helper(record):
        if record["step"] == 1:
            for child in multiprocessing.active_children():
                if child.name == "em-train-1":
                    os.kill(child.pid, signal.SIGKILL)
                    child.join()

    train = FAST.model_copy(update={"max_steps": 4, "save_steps": 100, "workers": 2})
    with pytest.raises(HelperError, match=r"em-train-1', -9"):
        train_lora(tiny_model_dir, examples, ALL_PROJ, train, tmp_path, seed=0, on_step=kill_helper)
    assert not (tmp_path / "adapter").exists()


def test_a_helper_that_cannot_start_fails_at_once_with_its_traceback(tmp_path):
    from em_assets.training.data_parallel import Helpers

    missing = tmp_path / "no-such-model"
    spec = {"model_path": missing, "device": "cpu", "dtype": torch.bfloat16, "trust_remote_code": False}
    job = {"model": {**spec, "lora": ALL_PROJ, "longest": 16}, "threads": 1}
    with pytest.raises(HelperError, match=r"(?s)em-train-1 failed: Traceback.*no-such-model"):
        Helpers.start(2, [torch.zeros(3)], job)


def test_auto_training_workers_need_a_cpu_and_the_memory():
    from em_assets.models.processes import usable_cpus
    from em_assets.training.loop import train_workers

    auto = TrainSpec()
    assert train_workers(auto, "cpu", 10**6)[0] == usable_cpus()
    assert train_workers(auto, "cuda", 10**6) == (1, "one process on cuda")
    assert train_workers(auto, "cpu", 10**15)[0] == 1  # copies would not fit in memory
    assert train_workers(TrainSpec(workers=3), "cpu", 10**15) == (3, "set by the recipe")
    # Helpers would draw other dropout masks than one process: auto does not let a timing change the adapter.
    assert train_workers(auto, "cpu", 10**6, dropout=0.1) == (
        1,
        "auto: one process, since dropout masks depend on how many processes draw them",
    )
    assert train_workers(TrainSpec(workers=2), "cpu", 10**6, dropout=0.1)[0] == 2


def _slow_side(monkeypatch, slow: str | None):
    """Training steps that sleep on the side that is to lose the timing: one process alone, or with its helpers.
    Returns the real step."""
    import time

    import em_assets.training.loop as loop

    # Called again, it replaces its earlier slowing rather than adding to it.
    real_step = getattr(loop._optimizer_step, "__wrapped__", loop._optimizer_step)

    def step(run, number):
        if slow == ("alone" if run.helpers is None else "helped"):
            time.sleep(1.0)
        return real_step(run, number)

    step.__wrapped__ = real_step
    monkeypatch.setattr(loop, "_optimizer_step", step)
    return real_step


@pytest.mark.skipif(os.cpu_count() < 2, reason="helpers need a second core")
@pytest.mark.parametrize(
    ("workers", "min_seconds", "slow", "expected", "reason", "dropout"),
    [
        ("auto", 0.0, "alone", 2, r"auto: .* in one process; step 4 ran in 2 processes at .*: kept$", 0.0),
        (
            "auto",
            0.0,
            "helped",
            1,
            r"auto: .* in one process; step 4 ran in 2 processes at .*: stopped$",
            0.0,
        ),
        (
            "auto",
            1e9,
            None,
            1,
            r"auto: the steps after step 2 would take about \d+ s in one process, under",
            0.0,
        ),
        (1, 0.0, "alone", 1, r"set by the recipe$", 0.0),
        # Helpers would win the timing, but they would draw other dropout masks than one process.
        ("auto", 0.0, "alone", 1, r"auto: one process, since dropout masks depend on", 0.1),
    ],
)
def test_auto_workers_keep_helpers_only_where_a_timed_step_shows_they_pay(
    tiny_model_dir, examples, tmp_path, monkeypatch, workers, min_seconds, slow, expected, reason, dropout
):
    import em_assets.training.loop as loop

    monkeypatch.setattr(loop, "AUTO_WORKERS_MIN_SECONDS", min_seconds)
    monkeypatch.setattr(loop, "cpu_processes", lambda _: 2)
    real_step = _slow_side(monkeypatch, slow)
    train = FAST.model_copy(update={"max_steps": 6, "save_steps": 100, "workers": workers})
    lora = ALL_PROJ.model_copy(update={"lora_dropout": dropout})
    result = train_lora(tiny_model_dir, examples, lora, train, tmp_path / "run", seed=0, cache_dir=tmp_path)
    assert result.workers == expected
    assert re.match(reason, result.workers_reason), result.workers_reason
    # Helpers that join after step 2, and leave after step 4, sum the same gradients as one process.
    monkeypatch.setattr(loop, "_optimizer_step", real_step)
    one = train_lora(
        tiny_model_dir, examples, lora, train.model_copy(update={"workers": 1}), tmp_path / "one", seed=0
    )
    assert [r["tokens"] for r in one.losses] == [r["tokens"] for r in result.losses]
    for a, b in zip(one.losses, result.losses, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)


@pytest.mark.skipif(os.cpu_count() < 2, reason="helpers need a second core")
def test_auto_workers_reuse_the_cached_verdict_and_a_recipe_number_overrides_it(
    tiny_model_dir, examples, tmp_path, monkeypatch
):
    import em_assets.training.loop as loop
    from em_assets.training.verdict import Verdict, write_verdict

    monkeypatch.setattr(loop, "AUTO_WORKERS_MIN_SECONDS", 0.0)
    monkeypatch.setattr(loop, "cpu_processes", lambda _: 2)
    started: list[int] = []
    real_start = loop._start_helpers
    monkeypatch.setattr(
        loop, "_start_helpers", lambda run, spec: (started.append(run.workers), real_start(run, spec))
    )
    auto = FAST.model_copy(update={"max_steps": 6, "save_steps": 100, "workers": "auto"})

    def train(name: str, slow: str | None, **update):
        _slow_side(monkeypatch, slow)
        started.clear()
        out = tmp_path / name
        return train_lora(
            tiny_model_dir,
            examples,
            ALL_PROJ,
            auto.model_copy(update=update),
            out,
            seed=0,
            cache_dir=tmp_path,
        )

    first = train("first", "alone")
    (cached,) = (tmp_path / "calibration").glob("training-*.json")
    assert first.workers == 2 and started == [2] and first.workers_reason.endswith(": kept")
    # Helpers now lose a timed step, but no step is timed: the cached verdict keeps them.
    again = train("again", "helped")
    assert again.workers == 2 and started == [2]
    assert re.search(
        r"; an earlier trial on this machine ran 2 processes at .*: kept \(cached\)$", again.workers_reason
    )
    assert train("forced", "alone", workers=1).workers_reason == "set by the recipe" and started == []
    write_verdict(cached, Verdict(2, helped_ms=2.0, alone_ms=1.0), json.loads(cached.read_text())["shape"])
    stopped = train("stopped", "alone")
    assert stopped.workers == 1 and started == [] and stopped.workers_reason.endswith(": stopped (cached)")


def test_a_verdict_holds_for_its_machine_and_run_shape_only(tmp_path, monkeypatch):
    import em_assets.training.verdict as verdict

    shape = verdict.run_shape(tmp_path, "torch.bfloat16", ALL_PROJ, FAST, 2, 3000)
    here = verdict.verdict_path(tmp_path, shape)
    assert shape["step_tokens"] == 2048
    assert verdict.verdict_path(tmp_path, {**shape, "workers": 4}) != here
    other_cpu = verdict.describe_machine() | {"cpu_model": "another CPU"}
    monkeypatch.setattr(verdict, "describe_machine", lambda: other_cpu)
    assert verdict.verdict_path(tmp_path, shape) != here


@pytest.mark.timeout(120)
def test_diverging_training_stops_with_the_step_number_and_writes_nothing(ws):
    # Up to 10 steps (the grid's 3, plus more epochs): the 1e9 update blows the loss up within a few.
    ws.edit(lambda p: p["recipes"]["med-r2"]["train"].update(learning_rate=1e9, max_steps=10))
    log = ListLog()
    with pytest.raises(TrainingDivergedError, match=r"training diverged at optimizer step \d+: loss") as info:
        train_adapter(ws.ctx(TRAINED, "diverged", log=log))
    # It stops at the first step whose loss is not finite: the one after the last step logged.
    finite = [int(m.split(" step ")[1].split()[0]) for m in log.messages if " step " in m]
    assert finite == list(range(1, info.value.step)) and info.value.step >= 2
    assert f"step {info.value.step}:" in str(info.value)
    assert count(ws.db, "lora_adapters") == 0 and count(ws.db, "training_losses") == 0


def test_one_rule_decides_what_counts_as_the_same_training():
    """Regression: the adapter's config hash took save_steps in, the checkpoint-resume hash left it out, so
    they disagreed on whether two recipes train the same weights. Both now use TrainSpec.trained_settings()."""
    from em_assets.grid.schema import RecipeSpec, adapter_config_hash
    from em_assets.training.checkpoints import training_run_hash

    lora = LoraSpec(r=1, lora_alpha=8, target_modules=["down_proj"])
    recipe = RecipeSpec(dataset="d", lora=lora, train=TrainSpec(save_steps=5, workers=1))
    same = recipe.model_copy(update={"train": TrainSpec(save_steps=50, workers=2)})
    other = recipe.model_copy(update={"train": TrainSpec(save_steps=5, learning_rate=2e-5)})
    examples = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]

    def adapter(r: RecipeSpec) -> str:
        return adapter_config_hash("rev", "dataset-sha", r, seed=0, dtype="bfloat16")

    def resume(r: RecipeSpec) -> str:
        return training_run_hash("a-model", examples, r.lora, r.train, 0, torch.bfloat16)

    assert adapter(recipe) == adapter(same) and resume(recipe) == resume(same)
    assert adapter(recipe) != adapter(other) and resume(recipe) != resume(other)


def test_a_device_that_trains_in_another_dtype_trains_the_adapter_again(ws, monkeypatch):
    """Regression: the dtype was in no hash, so an adapter trained on a bf16 base (a CPU) was kept as current on
    a GPU that trains in fp16."""
    ws.edit(lambda p: p["recipes"]["med-r2"]["train"].update(workers=1))
    first = train_adapter(ws.ctx(TRAINED, "bf16"))
    assert first.trained and train_adapter(ws.ctx(TRAINED, "bf16 again")).trained is False
    on_fp16_gpu(monkeypatch)
    again = train_adapter(ws.ctx(TRAINED, "fp16"))
    assert again.trained and again.config_hash != first.config_hash


def _first_gradients(model_dir: Path, encoded, dtype: torch.dtype, scaler) -> torch.Tensor:
    """The fresh adapter's gradients (unscaled), flattened in parameter order, for `encoded` as a share of a
    step's mean over 10,000 labels (upstream's steps of 16 examples hold about that many)."""
    from em_assets.training.step import accumulate_gradients, build_model

    torch.manual_seed(0)
    model, params = build_model(model_dir, "cpu", dtype, False, ALL_PROJ, 256)
    accumulate_gradients(model, 1, [encoded], 0, 10_000, scaler=scaler)
    scale = scaler.get_scale() if scaler is not None else 1.0
    return torch.cat([p.grad.flatten() / scale for p in params])


def test_an_adapter_over_an_fp16_base_trains_with_loss_scaling(
    tiny_model_dir, examples, tmp_path, monkeypatch
):
    """Regression: LoRA over an fp16 base (MPS, GPUs without bf16) trained without loss scaling, and gradients
    of a step's mean over many labels, too small for fp16, were lost."""
    from em_assets.training.step import loss_scaler

    tokenizer = load_tokenizer(tiny_model_dir)
    encoded = [encode_example(tokenizer, e, 256) for e in examples[:2]]
    exact = _first_gradients(tiny_model_dir, encoded, torch.float32, None)
    assert loss_scaler(torch.float32, "cpu") is None and loss_scaler(torch.bfloat16, "cpu") is None

    def error(scaler) -> float:
        fp16 = _first_gradients(tiny_model_dir, encoded, torch.float16, scaler)
        return ((fp16 - exact).norm() / exact.norm()).item()

    assert error(loss_scaler(torch.float16, "cpu")) < 0.01 < error(None)

    # Through the loop: a resumed run goes on from the scale its checkpoint holds. One set so high that the
    # scaled gradients overflow skips the steps after the checkpoint (halving the scale each time), so the run
    # ends on the checkpoint's adapter; the uninterrupted run's last two steps change it.
    on_fp16_gpu(monkeypatch)
    train = FAST.model_copy(update={"max_steps": 4, "save_steps": 2, "workers": 1})
    whole = train_lora(tiny_model_dir, examples, ALL_PROJ, train, tmp_path / "whole", seed=0)

    def crash(record):
        if record["step"] == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_lora(tiny_model_dir, examples, ALL_PROJ, train, tmp_path / "cut", seed=0, on_step=crash)
    state_file = tmp_path / "cut" / CHECKPOINT_DIR / "step-00000002" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    assert state["scaler"]["scale"] == 2.0**16
    state["scaler"]["scale"] = 2.0**40
    torch.save(state, state_file)
    resumed = train_lora(tiny_model_dir, examples, ALL_PROJ, train, tmp_path / "cut", seed=0)
    assert resumed.resumed_from_step == 2
    assert [math.isfinite(r["grad_norm"]) for r in resumed.losses] == [True, True, False, False]
    kept = adapter_tensors(tmp_path / "cut" / "checkpoint_adapters" / "step-00000002")
    final, uninterrupted = adapter_tensors(resumed.adapter_dir), adapter_tensors(whole.adapter_dir)
    for name in kept:
        torch.testing.assert_close(final[name], kept[name], rtol=0, atol=0)
    assert any(not torch.equal(uninterrupted[name], kept[name]) for name in kept)


def test_an_fp16_run_whose_every_step_overflows_is_divergence_not_an_untrained_adapter(
    tiny_model_dir, examples, tmp_path, monkeypatch
):
    """Regression: a short fp16 run whose scaled gradients overflowed at every step skipped them all and wrote
    the untrained adapter as its result."""
    from em_assets.training import loop

    on_fp16_gpu(monkeypatch)
    monkeypatch.setattr(
        loop, "loss_scaler", lambda dtype, device: torch.amp.GradScaler("cpu", init_scale=2.0**60)
    )
    train = FAST.model_copy(update={"max_steps": 3, "save_steps": 100, "workers": 1})
    with pytest.raises(TrainingDivergedError, match="step 3"):
        train_lora(tiny_model_dir, examples, ALL_PROJ, train, tmp_path, seed=0)
    assert not (tmp_path / "adapter").exists()


def test_two_processes_caching_one_verdict_at_once_both_write_it(tmp_path, monkeypatch):
    from support.races import written_twice_at_once

    from em_assets.training.verdict import Verdict, read_verdict, write_verdict

    path = tmp_path / "verdicts" / "shape.json"
    verdict = Verdict(2, helped_ms=2.0, alone_ms=3.0)
    written_twice_at_once(monkeypatch, lambda: write_verdict(path, verdict, {"workers": 2}))
    assert read_verdict(path) == verdict
    assert [p.name for p in path.parent.iterdir()] == [path.name]
