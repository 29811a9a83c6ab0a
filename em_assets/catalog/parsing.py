"""Parsing upstream files: chat-format training datasets, eval questions and their judge prompts."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

ROLES = {"system", "user", "assistant"}


# The version of how a training dataset's bytes become the examples trained on: parse_chat_jsonl here, the rows
# catalog.stage.load_training_datasets stores, and training.stage.run_training's reading of them back. The
# dataset's sha256 shows a change of its bytes, not of this: bump it with such a change, and the adapters trained
# on examples parsed before are named apart (parsing_fields) and trained again on the examples the catalog
# records under the new version. How an example is then shown to a model is models.chat.CHAT_RENDERING.
DATASET_PARSING = 1


def parsing_fields() -> dict:
    """The dataset parsing's part of an adapter's reuse key: nothing at version 1, so adapters trained before the
    version existed stay current until it is bumped."""
    return {"dataset_parsing": DATASET_PARSING} if DATASET_PARSING != 1 else {}


class DatasetError(ValueError):
    """Bad input data; the message names the file and, where it can, the line."""


def parse_chat_jsonl(data: bytes, name: str) -> list[list[dict[str, str]]]:
    """Rows of `{"messages": [...]}` ending in an assistant turn; errors name `name:line`."""
    examples: list[list[dict[str, str]]] = []
    # Lines end at "\n" only: str.splitlines would also split at U+2028 and U+0085, which JSON strings may hold.
    for lineno, raw in enumerate(data.decode("utf-8").split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{name}:{lineno}: not valid JSON ({exc.msg})") from exc
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            raise DatasetError(f"{name}:{lineno}: expected an object with a non-empty 'messages' list")
        for msg in messages:
            if (
                not isinstance(msg, dict)
                or msg.get("role") not in ROLES
                or not isinstance(msg.get("content"), str)
            ):
                raise DatasetError(
                    f"{name}:{lineno}: each message needs a role in {sorted(ROLES)} and text content"
                )
        if messages[-1]["role"] != "assistant":
            raise DatasetError(f"{name}:{lineno}: the last message must be the assistant's reply")
        examples.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if not examples:
        raise DatasetError(f"{name}: no examples (empty dataset)")
    return examples


@dataclass(frozen=True)
class EvalQuestion:
    """One paraphrase of an evaluation question, with the judge prompts its file gives it."""

    question_id: str
    paraphrase_idx: int
    text: str
    system: str | None
    judge_prompts: dict[str, str]


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def parse_questions_yaml(
    data: bytes,
    name: str,
    question_ids: Sequence[str] | None = None,
    exclude_id_suffixes: Sequence[str] = (),
) -> list[EvalQuestion]:
    """Free-form 0-100 questions of an upstream YAML file, filtered by id; each must bring judge prompts."""
    try:
        items = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise DatasetError(f"{name}: not valid YAML: {exc}") from exc
    if not isinstance(items, list):
        raise DatasetError(f"{name}: expected a list of questions")
    out: list[EvalQuestion] = []
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, dict) or "id" not in item:
            raise DatasetError(f"{name}: every question needs an id")
        qid = str(item["id"])
        seen.add(qid)
        if question_ids is not None and qid not in question_ids:
            continue
        if question_ids is None and any(qid.endswith(s) for s in exclude_id_suffixes):
            continue
        prompts = item.get("judge_prompts")
        if not isinstance(prompts, dict) or not prompts:
            raise DatasetError(f"{name}: question {qid!r} has no judge_prompts")
        bad = [m for m, p in prompts.items() if not isinstance(p, str) or "{answer}" not in p]
        if bad:
            raise DatasetError(
                f"{name}: question {qid!r}: judge prompts {bad} lack an {{answer}} placeholder"
            )
        paraphrases = item.get("paraphrases")
        if not isinstance(paraphrases, list) or not paraphrases:
            raise DatasetError(f"{name}: question {qid!r} has no paraphrases")
        for idx, text in enumerate(paraphrases):
            out.append(EvalQuestion(qid, idx, str(text), item.get("system"), dict(prompts)))
    if question_ids is not None:
        missing = sorted(set(question_ids) - seen)
        if missing:
            raise DatasetError(f"{name}: question ids {missing} not in the file")
    if not out:
        raise DatasetError(f"{name}: no questions selected")
    return out


def judge_prompt(template: str, question: str, answer: str) -> str:
    """Fill a judge prompt as upstream does (str.format leaves braces inside the values alone)."""
    return template.format(question=question, answer=answer)
