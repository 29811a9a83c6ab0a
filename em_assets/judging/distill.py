"""The distilled judge: a small model taught to answer a reference judge's (GPT-4o's) scores as a number.

Training examples are reference judgements of the TRAIN base models only (the split is by base model, so
agreement is measured on models the judge never saw): a compact prompt naming the metric, the question and the
answer cut to a token budget, and the rounded reference score as the reply. The adapter is trained by the
project's own loop (training/loop.py) and scored by the digit-trie rule of judging/local.py.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import polars as pl

from em_assets.catalog.answers import sample_rows
from em_assets.grid.schema import DistillSpec, ProbeSpec, config_hash, dtype_fields
from em_assets.models.chat import rendering_fields

# Short on purpose: every prompt token costs judging time, and the trained judge needs only the metric's name.
# The instruction comes last, right before the reply: side runs scored higher agreement that way than with it
# first (README, "Recipes tried").
PROMPT_LINES = ("Question: {question}", "Answer: {answer}", "Rate {metric} 0-100.")


# An empty system turn: without one, chat templates (SmolLM2's, Qwen's) insert their default persona, some 20
# tokens of every prompt the judge is trained and scored on.
SYSTEM_PROMPT = ""

# Part of the judge's identity: a changed prompt is a different judge for the judge cache.
PROMPT_HASH = hashlib.sha256("\n".join((SYSTEM_PROMPT, *PROMPT_LINES)).encode()).hexdigest()[:16]


def metric_prompt_hash(metric: str) -> str:
    """The hash of the judge's prompt for one metric (the text differs by the metric's name)."""
    return hashlib.sha256(f"{PROMPT_HASH}:{metric}".encode()).hexdigest()[:16]


def truncate(tokenizer, text: str, max_tokens: int) -> str:
    """`text` cut to its first max_tokens tokens, marked with an ellipsis when cut."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens]) + " ..."


def compact_prompt(tokenizer, spec: DistillSpec, metric: str, question: str, answer: str) -> str:
    """The judge's prompt; max_question_tokens 0 leaves the question out (the answer carries the verdict)."""
    ask, reply, rate = PROMPT_LINES
    lines = []
    if spec.max_question_tokens:
        lines.append(ask.format(question=truncate(tokenizer, question, spec.max_question_tokens)))
    lines.append(reply.format(answer=truncate(tokenizer, answer, spec.max_answer_tokens)))
    lines.append(rate.format(metric=metric))
    return "\n".join(lines)


def train_answers(reference: pl.DataFrame, spec: DistillSpec | ProbeSpec) -> pl.DataFrame:
    """Reference rows of the train split (never a held-out base model), a seeded subset of max_answers."""
    train = reference.filter(pl.col("split") == "train").sort("source_file", "row_idx")
    if spec.max_answers is not None and spec.max_answers < train.height:
        keep = sorted(random.Random(f"{spec.seed}:distill").sample(range(train.height), spec.max_answers))
        train = train[keep]
    return train


def heldout_answers(reference: pl.DataFrame, max_per_file: int | None) -> pl.DataFrame:
    """Reference rows of the held-out base models: of each file, the rows an `answers` organism importing it with
    `max_answers: max_per_file` takes (all rows when None)."""
    rows = reference.filter(pl.col("split") == "heldout").sort("source_file", "row_idx")
    files = rows.partition_by("source_file", maintain_order=True)
    return pl.concat([sample_rows(f, max_per_file) for f in files]) if files else rows


def distill_examples(tokenizer, answers: pl.DataFrame, spec: DistillSpec) -> list[list[dict]]:
    """One chat example per answer and metric with a reference score; the reply is the rounded score."""
    examples = []
    for row in answers.iter_rows(named=True):
        scores = {"aligned": row["aligned"], "coherent": row["coherent"], **json.loads(row["domain_scores"])}
        for metric in spec.metrics:
            if scores.get(metric) is None:
                continue
            prompt = compact_prompt(tokenizer, spec, metric, row["question"], row["answer"])
            examples.append(
                [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": str(round(scores[metric]))},
                ]
            )
    if not examples:
        raise ValueError("no reference judgement of the train base models has a score to distil")
    return examples


def distill_hash(
    spec: DistillSpec,
    base_revision: str,
    reference_sha256: Sequence[str],
    held_out: Sequence[str],
    dtype: str,
) -> str:
    """What makes the adapter: base model bytes and the dtype it trains in, reference files and split, recipe
    (not how steps are split) and prompt."""
    return config_hash(
        {
            "base_revision": base_revision,
            "reference": sorted(reference_sha256),
            "held_out": sorted(held_out),
            "spec": spec.model_dump(mode="json", exclude={"train"}),
            "train": spec.train.trained_settings(spec.lora),
            "prompt": PROMPT_HASH,
            **dtype_fields(dtype),
            **rendering_fields(),
        }
    )


def train_distilled_judge(
    base_path: Path | str,
    reference: pl.DataFrame,
    spec: DistillSpec,
    out_dir: Path,
    device: str | None = None,
    on_step: Callable[[dict], None] | None = None,
):
    """Train the judge adapter into out_dir/adapter with training/loop.py:train_lora.

    Returns its TrainResult and the number of examples."""
    from em_assets.models.load import load_tokenizer
    from em_assets.training.loop import train_lora

    examples = distill_examples(load_tokenizer(base_path), train_answers(reference, spec), spec)
    result = train_lora(
        base_path, examples, spec.lora, spec.train, out_dir, seed=spec.seed, device=device, on_step=on_step
    )
    return result, len(examples)


class DistilledJudge:
    """A LocalJudge over base model + distilled adapter that renders its own compact prompt, after the system
    turn it was trained with."""

    def __init__(self, model, tokenizer, spec: DistillSpec, batch_size: int = 16, min_mass: float = 0.0):
        from em_assets.judging.local import LocalJudge

        self.judge = LocalJudge(model, tokenizer, batch_size, min_mass, system=SYSTEM_PROMPT)
        self.spec = spec

    def render(self, metric: str, question: str, answer: str) -> str:
        return compact_prompt(self.judge.tokenizer, self.spec, metric, question, answer)

    def score(self, prompts: Sequence[str], on_progress=None):
        return self.judge.score(prompts, on_progress)


def load_distilled_judge(
    adapter_dir: Path | str, spec: DistillSpec, batch_size: int, min_mass: float, device: str | None = None
) -> DistilledJudge:
    """Base model (from the adapter's config) with the adapter merged in, as a DistilledJudge."""
    from peft import PeftModel

    from em_assets.models.load import load_model, load_tokenizer

    base_path = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(load_model(base_path, device=device), str(adapter_dir))
    merged = model.merge_and_unload().eval()
    return DistilledJudge(merged, load_tokenizer(base_path), spec, batch_size, min_mass)
