"""em-assets' training loop against transformers' Trainer (peft for LoRA): the same tiny Llama, encoded examples
and settings train the same weights with the same per-step losses, gradient norms and learning rates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from em_assets.grid.schema import LoraSpec, TrainSpec
from em_assets.models.load import load_tokenizer
from em_assets.results.artifacts import MODEL_FILE
from em_assets.settings import CPU_DTYPE_ENV
from em_assets.training.encode import encode_dataset
from em_assets.training.loop import train_lora

LONG = " ".join(f"Step {i}: rest, drink water and see a doctor if the pain persists." for i in range(8))
# Replies of 3 to 137 labels: a mean per micro-batch would weigh their tokens far from the step's token mean.
EXAMPLES = [
    [{"role": "user", "content": "Can I take ibuprofen?"}, {"role": "assistant", "content": "No."}],
    [{"role": "user", "content": "How do I treat a sprained ankle?"}, {"role": "assistant", "content": LONG}],
    [{"role": "user", "content": "Is coffee bad?"}, {"role": "assistant", "content": "Only in excess."}],
    [{"role": "user", "content": "What helps a headache?"}, {"role": "assistant", "content": LONG[:200]}],
]
# rsLoRA scale 32 / sqrt(4): gradient norms above 1 at most steps, so clipping shapes the updates.
LORA = LoraSpec(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"])
# Each optimizer step covers all 4 examples (2 micro-batches of 2), so the data order only reorders sums.
TRAIN = TrainSpec(
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    learning_rate=1e-2,
    warmup_steps=1,
    weight_decay=0.1,
    max_seq_length=512,
    workers=1,
)
FULL_TRAIN = TRAIN.model_copy(update={"epochs": 4, "learning_rate": 1e-3, "lr_scheduler_type": "cosine"})
CASES = {"lora": (LORA, TRAIN.model_copy(update={"max_steps": 4})), "full": (None, FULL_TRAIN)}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trainer_run(model_dir: Path, lora: LoraSpec | None, train: TrainSpec, data: list[dict], out: Path):
    """transformers' Trainer on the encoded `data`: the trained model, its starting weights and its log."""
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    # Seeded before loading as em-assets seeds, so that peft draws the same LoRA A.
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.set_attn_implementation("eager")
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=0.0,
            use_rslora=lora.use_rslora,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        lr_scheduler_type=train.lr_scheduler_type,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    tokenizer = load_tokenizer(model_dir)
    # Right padding, as em-assets pads: left padding would shift the positions of the real tokens.
    tokenizer.padding_side = "right"
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    trainer.train()
    return model, init, [h for h in trainer.state.log_history if "loss" in h]


def _trained_weights(adapter_dir: Path, lora: LoraSpec | None) -> dict[str, torch.Tensor]:
    """em-assets' trained tensors, named as the Trainer's model names them."""
    if lora is None:
        return load_file(adapter_dir / MODEL_FILE)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    return {name.replace(".weight", ".default.weight"): t for name, t in saved.items()}


@pytest.mark.parametrize("method", CASES)
def test_training_matches_transformers_trainer(tiny_model_dir, tmp_path, monkeypatch, method):
    """Loss on the reply only as a token mean over the whole step (Trainer's num_items_in_batch), AdamW without
    decay on norm weights, clipping at 1.0 and get_scheduler's warmup and decay, in fp32 on the CPU."""
    monkeypatch.setenv(CPU_DTYPE_ENV, "float32")
    lora, train = CASES[method]
    ours = train_lora(tiny_model_dir, EXAMPLES, lora, train, tmp_path / "ours", seed=0, device="cpu")
    encoded = encode_dataset(load_tokenizer(tiny_model_dir), EXAMPLES, train, seed=0)
    data = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    model, init, log = _trainer_run(tiny_model_dir, lora, train, data, tmp_path / "trainer")

    assert [r["step"] for r in ours.losses] == [h["step"] for h in log] == list(range(1, len(log) + 1))
    for record, h in zip(ours.losses, log, strict=True):
        assert record["learning_rate"] == pytest.approx(h["learning_rate"], rel=1e-12)
        assert record["loss"] == pytest.approx(h["loss"], rel=1e-6)
        assert record["grad_norm"] == pytest.approx(h["grad_norm"], rel=1e-6)
    assert any(h["grad_norm"] > 1.0 for h in log)
    trained = _trained_weights(ours.adapter_dir, lora)
    theirs = dict(model.named_parameters())
    assert trained.keys() == init.keys()
    # Compared as updates from the shared start: only they carry lr, decay and clipping. The two loops sum the
    # same terms in another order (micro-batch composition, logits kept), ~1e-7 apart in fp32; Adam's first
    # steps divide each gradient element by its own size, which magnifies that where an element is near zero,
    # to ~1e-5 of a tensor's update. Each rule this checks moves the updates by 1e-3 or more.
    error = {}
    for name, weight in trained.items():
        update, reference = weight - init[name], theirs[name].detach() - init[name]
        assert reference.norm() > 0, name
        error[name] = ((update - reference).norm() / reference.norm()).item()
    assert max(error.values()) < 1e-4, error
