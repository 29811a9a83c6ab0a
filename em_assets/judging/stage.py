"""Judging stage: every completion of one organism on every judge metric, through the cross-run cache."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import polars as pl

from em_assets.context import StageContext
from em_assets.grid.schema import config_hash
from em_assets.judging.http import JudgeAuthError, JudgeRequestError
from em_assets.judging.judges import (
    fixed_score,
    judge_identity,
    make_judge,
    prompt_hash_for,
    render_prompt,
)
from em_assets.judging.scoring import JudgeScore
from em_assets.results import queries
from em_assets.results.errors import MissingUpstreamError
from em_assets.results.store import Store, to_json, utc_now

JudgementKey = tuple[str, int, int, str]  # (question_id, paraphrase_idx, sample_idx, metric)


@dataclass(frozen=True)
class Pending:
    """One judgement to have: the completion it scores, its judge prompt template and its cache key."""

    completion: dict
    template: dict
    cache_key: str

    @property
    def current(self) -> tuple[str, str]:
        # A row is current only if it scores this answer AND carries this completion's lineage: a resampled
        # answer that happens to repeat (same text, new adapter or settings) keeps its cached score but its
        # row is rewritten with the new lineage.
        return self.cache_key, self.completion["sampling_hash"]


@dataclass(frozen=True)
class JudgeIdentity:
    backend: str
    model: str
    revision: str
    path: str | None


@dataclass(frozen=True)
class JudgingResult:
    scored: int
    reused: int
    cache_hits: int
    seconds: float
    # Left unscored because the judge's server refused them (judge.refusals: unscored).
    refused: int = 0
    # What the organism's judgements are: each one's judgement key, cache key and answer lineage, hashed.
    version: str = ""

    @property
    def judgements_per_s(self) -> float | None:
        return self.scored / self.seconds if self.seconds else None


def judge_cache_key(
    model: str, revision: str, prompt_hash: str, metric: str, question: str, answer: str
) -> str:
    """The judge cache's key of one score: the judge, its prompt, the question and answer, and a rule's score."""
    parts: list = [model, revision, prompt_hash, question, answer]
    fixed = fixed_score(metric, answer)
    # A store judged before the rule holds the judge's own score under the plain key: keyed apart, that score is
    # never read, and judgements rows that carry its key are out of date, so they are rewritten by the rule.
    if fixed is not None:
        parts += ["fixed", fixed.score]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def imported_recipes(ctx: StageContext) -> set[str]:
    return {name for name, r in ctx.grid.recipes.items() if r.kind == "answers"}


def first_prompts(prompts: dict[tuple[str, str], dict]) -> dict[str, dict]:
    """The template of the first question (by id) for each metric."""
    first: dict[str, dict] = {}
    for (_, metric), tmpl in sorted(prompts.items()):
        first.setdefault(metric, tmpl)
    return first


def needed_judgements(ctx: StageContext, judge: JudgeIdentity) -> dict[JudgementKey, Pending]:
    """Every (completion, metric) the organism should have a score for."""
    comps = queries.completions(ctx.store, ctx.key)
    if comps.height == 0:
        raise MissingUpstreamError(f"organism {ctx.key}: no completions; materialise completions first")
    prompts = {s: queries.judge_prompts(ctx.store, s) for s in set(comps["eval_set"])}
    # Imported answers (eval set `file:<name>`) are judged with their question's prompt in the grid's eval set,
    # and a question outside it with the eval set's first prompt per metric.
    imported = ctx.organism.recipe in imported_recipes(ctx)
    in_eval_set = queries.judge_prompts(ctx.store, ctx.grid.eval.questions) if imported else {}
    fallback = first_prompts(in_eval_set)
    needed = {}
    for c in comps.iter_rows(named=True):
        for metric in ctx.grid.judge.metrics:
            asked = (c["question_id"], metric)
            tmpl = prompts[c["eval_set"]].get(asked) or in_eval_set.get(asked) or fallback.get(metric)
            if tmpl is None:
                raise MissingUpstreamError(f"no {metric!r} judge prompt for question {c['question_id']!r}")
            prompt_hash = prompt_hash_for(ctx.grid.judge, tmpl["prompt_hash"], metric)
            key = judge_cache_key(
                judge.model, judge.revision, prompt_hash, metric, c["question"], c["answer"]
            )
            needed[(c["question_id"], c["paraphrase_idx"], c["sample_idx"], metric)] = Pending(c, tmpl, key)
    return needed


def judgement_row(ctx: StageContext, judge: JudgeIdentity, key: JudgementKey, item: Pending, score) -> dict:
    c = item.completion
    return {
        "organism": ctx.key,
        "question_id": key[0],
        "paraphrase_idx": key[1],
        "sample_idx": key[2],
        "metric": key[3],
        "score": score["score"],
        "mass": score["mass"],
        "probs": score["probs"],
        "judge_backend": judge.backend,
        "judge_model": judge.model,
        "judge_revision": judge.revision,
        "prompt_hash": prompt_hash_for(ctx.grid.judge, item.template["prompt_hash"], key[3]),
        "cache_key": item.cache_key,
        "base_revision": c["base_revision"],
        "dataset_sha256": c["dataset_sha256"],
        "adapter_sha256": c["adapter_sha256"],
        "sampling_hash": c["sampling_hash"],
        "run_id": ctx.run_id,
        "created_at": utc_now(),
    }


def score_and_cache(
    scorer,
    store: Store,
    prompts: Sequence[str],
    cache_keys: Sequence[str],
    fixed: Sequence[JudgeScore | None] | None = None,
) -> list[dict]:
    """Score one chunk of judge prompts and add the scores to the judge cache: {score, mass, probs JSON, refused}.
    Prompts with a `fixed` score (an empty answer's coherence) take it and are not sent to the judge; a refused
    prompt's missing score is not cached, so judging it again asks the server again."""
    fixed = fixed if fixed is not None else [None] * len(prompts)
    got = {i: f for i, f in enumerate(fixed) if f is not None}
    asked = [i for i in range(len(prompts)) if i not in got]
    try:
        for j, verdict in _iter_scores(scorer, [prompts[i] for i in asked]):
            got[asked[j]] = verdict
    finally:
        # A request that fails for good (a prompt the server rejects) fails the chunk, but the scores already
        # paid for are cached first, so a rerun asks the judge only for those still missing.
        rows = [
            {"cache_key": cache_keys[i], **_stored(s), "created_at": utc_now()}
            for i, s in got.items()
            if not s.refused
        ]
        store.append_rows("judge_cache", pl.DataFrame(rows, infer_schema_length=None))
    return [{**_stored(got[i]), "refused": got[i].refused} for i in range(len(prompts))]


def _stored(s: JudgeScore) -> dict:
    return {
        "score": s.score,
        "mass": s.mass,
        "probs": to_json({str(n): p for n, p in sorted(s.probs.items())}),
    }


def _iter_scores(scorer, prompts: list[str]) -> Iterator[tuple[int, JudgeScore]]:
    """(index, score) as the judge gets them: an HTTP judge's as each request completes, others' all at once."""
    if not prompts:
        return iter(())
    own = getattr(scorer, "iter_scores", None)
    return own(prompts) if own is not None else enumerate(scorer.score(prompts))


def score_chunks(
    scorer,
    store: Store,
    prompts: Sequence[str],
    cache_keys: Sequence[str],
    chunk_size: int,
    fixed: Sequence[JudgeScore | None] | None = None,
) -> Iterator[tuple[list[int], list[dict]]]:
    """Score prompts chunk by chunk through the judge cache, yielding (prompt indices, scores) as each chunk ends;
    prompts of one cache key are scored once and each copy takes that score."""
    # One cache key, several prompts: one answer sampled twice for a question.
    copies: dict[str, list[int]] = {}
    for i, key in enumerate(cache_keys):
        copies.setdefault(key, []).append(i)
    unique = [same[0] for same in copies.values()]
    # A judge with an `order` (the probe judge's: answers by length) chooses which prompts share a chunk.
    order = getattr(scorer, "order", None)
    ranks = order([prompts[i] for i in unique]) if order is not None else range(len(unique))
    indices = [unique[r] for r in ranks]
    for start in range(0, len(indices), chunk_size):
        part = indices[start : start + chunk_size]
        chunk_fixed = None if fixed is None else [fixed[i] for i in part]
        scores = score_and_cache(
            scorer, store, [prompts[i] for i in part], [cache_keys[i] for i in part], chunk_fixed
        )
        same = [copies[cache_keys[i]] for i in part]
        # Yielded as each chunk ends, so callers write their rows before the next starts: a killed run loses one
        # chunk at most.
        yield [i for c in same for i in c], [s for c, s in zip(same, scores, strict=True) for _ in c]


@contextmanager
def refusal_named(prompts: Sequence[str], name: Callable[[int], str]) -> Iterator[None]:
    """A judge request refused for good (a content filter's) re-raised naming its answer: `name(i)` for the
    refused prompt's index. A refused key is about every prompt and goes on as it is."""
    try:
        yield
    except JudgeRequestError as exc:
        if isinstance(exc, JudgeAuthError) or exc.prompt not in prompts:
            raise
        raise JudgeRequestError(f"{name(prompts.index(exc.prompt))}: {exc}") from exc


def warn_refused(
    log, indices: Sequence[int], scores: Sequence[dict], name: Callable[[int], str]
) -> list[int]:
    """Log each answer of a scored chunk the judge's server refused and left unscored (judge.refusals:
    unscored), by `name(i)` of its prompt's index; those indices."""
    refused = [i for i, s in zip(indices, scores, strict=True) if s["refused"]]
    for i in refused:
        log.warning(f"{name(i)}: refused by the judge's server for its content; left unscored")
    return refused


def score_pending(
    ctx: StageContext, judge: JudgeIdentity, todo: list, chunk_size: int
) -> tuple[int, list[JudgementKey]]:
    """Score `todo` with the grid's judge in chunks, writing judgements and cache rows as each chunk ends: how
    many were scored and the keys of those the judge's server refused (left unscored)."""
    scorer = make_judge(ctx.grid, judge.path, ctx.device)
    texts = [
        render_prompt(scorer, v.template["prompt"], k[3], v.completion["question"], v.completion["answer"])
        for k, v in todo
    ]
    keys = [v.cache_key for _, v in todo]
    fixed = [fixed_score(k[3], v.completion["answer"]) for k, v in todo]
    scored, refused = 0, []

    def name(i: int) -> str:
        question_id, _, sample, metric = todo[i][0]
        return f"{ctx.key}, {question_id} sample {sample}, {metric}"

    with refusal_named(texts, name):
        for indices, scores in score_chunks(scorer, ctx.store, texts, keys, chunk_size, fixed):
            part = [todo[i] for i in indices]
            rows = [judgement_row(ctx, judge, k, v, s) for (k, v), s in zip(part, scores, strict=True)]
            ctx.store.append_rows("judgements", pl.DataFrame(rows, infer_schema_length=None))
            scored += len(rows)
            refused += [todo[i][0] for i in warn_refused(ctx.log, indices, scores, name)]
            ctx.log.info(f"{ctx.key}: judged {scored}/{len(todo)}")
    return scored, refused


def judge_completions(ctx: StageContext, chunk_size: int = 64) -> JudgingResult:
    """Score every completion of the organism on every judge metric; reuses the cross-run judge cache."""
    identity = judge_identity(ctx.grid, ctx.cache_dir, ctx.store, device=ctx.device)
    judge = JudgeIdentity(ctx.grid.judge.backend, *identity)
    needed = needed_judgements(ctx, judge)
    have = queries.judgement_states(ctx.store, ctx.key)
    # A key held twice has no state: both copies go, and it is written again (from the judge cache); so has a
    # refused one, whose answer the server is asked again.
    stale = [k for k, v in have.items() if k not in needed or needed[k].current != v]
    if stale:
        queries.delete_judgements(ctx.store, ctx.key, stale)
    pending = {k: v for k, v in needed.items() if have.get(k) != v.current}
    cache = queries.cached_scores(ctx.store, {v.cache_key for v in pending.values()})
    from_cache = [
        judgement_row(ctx, judge, k, v, cache[v.cache_key])
        for k, v in pending.items()
        if v.cache_key in cache
    ]
    if from_cache:
        ctx.store.append_rows("judgements", pl.DataFrame(from_cache, infer_schema_length=None))
    todo = [(k, v) for k, v in pending.items() if v.cache_key not in cache]
    if not todo:
        ctx.log.info(f"{ctx.key}: all {len(needed)} judgements are up to date; no judging")
        return JudgingResult(0, len(needed), len(from_cache), 0.0, version=judgements_version(needed))
    start = time.perf_counter()
    scored, refused = score_pending(ctx, judge, todo, chunk_size)
    seconds = time.perf_counter() - start
    version = judgements_version(needed, set(refused))
    return JudgingResult(scored, len(needed) - len(todo), len(from_cache), seconds, len(refused), version)


def judgements_version(needed: dict[JudgementKey, Pending], refused: set[JudgementKey] | None = None) -> str:
    """Each judgement's key, cache key and answer lineage, hashed; a refused one is marked, so its answer scored
    on a later run changes the version."""
    refused = refused or set()
    return config_hash(
        sorted([*k, *v.current, *(["refused"] if k in refused else [])] for k, v in needed.items())
    )
