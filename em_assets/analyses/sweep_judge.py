"""Judging a sweep's answers: aligned and coherent through the judge cache, rows written as chunks finish."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from em_assets.context import StageContext
from em_assets.judging.judges import (
    fixed_score,
    judge_identity,
    make_judge,
    prompt_hash_for,
    render_prompt,
)
from em_assets.judging.stage import judge_cache_key, refusal_named, score_chunks, warn_refused
from em_assets.results.errors import MissingUpstreamError
from em_assets.results.queries import cached_scores, judge_prompts
from em_assets.results.store import utc_now
from em_assets.results.sweeps import SweepTables

# The EM rate needs these two; a sweep does not pay for the grid's domain judges.
SWEEP_METRICS = ("aligned", "coherent")


JUDGE_CHUNK = 64


JUDGEMENT_KEY = ("sweep", "setting", "question_id", "paraphrase_idx", "sample_idx", "metric")


def judge_sweep(
    ctx: StageContext, tables: SweepTables, points: Sequence, on_progress: Callable | None = None
) -> dict[tuple, int]:
    """Judge every current answer of the points on SWEEP_METRICS through the judge cache; returns counts."""
    metrics = [m for m in SWEEP_METRICS if m in ctx.grid.judge.metrics]
    if len(metrics) < len(SWEEP_METRICS):
        raise ValueError(
            f"{ctx.key}: sweeps need judge metrics {list(SWEEP_METRICS)}, the grid has {metrics}"
        )
    model_name, revision, path = judge_identity(ctx.grid, ctx.cache_dir, ctx.store, device=ctx.device)
    needed = _needed_judgements(ctx, tables, points, metrics, model_name, revision)
    pending = _pending(tables, points, needed)
    cache = cached_scores(ctx.store, {needed[k]["cache_key"] for k in pending})

    def row(k: tuple, score, mass, probs: str) -> dict:
        return _row(ctx, needed[k], k, model_name, revision, score, mass, probs)

    hits = [k for k in pending if needed[k]["cache_key"] in cache]
    fields = ("score", "mass", "probs")
    tables.append_judgements([row(k, *(cache[needed[k]["cache_key"]][f] for f in fields)) for k in hits])
    todo = [k for k in pending if needed[k]["cache_key"] not in cache]
    if not todo:
        return {}
    judge = make_judge(ctx.grid, path, ctx.device)
    return _score_todo(ctx, tables, judge, needed, todo, row, {p.pair: p for p in points}, on_progress)


def _pending(tables: SweepTables, points: Sequence, needed: dict[tuple, dict]) -> list[tuple]:
    """The needed judgements not stored as they stand now; stored ones not needed as they stand are dropped."""
    # A judgement the judge's server refused has no state: it is dropped and its answer asked again.
    have = {
        r[:6]: None if r[8] else r[6:8] for r in tables.judgement_keys([p.pair for p in points]).iter_rows()
    }

    def current(k: tuple) -> tuple:
        return (needed[k]["cache_key"], needed[k]["completion"]["setting_hash"])

    tables.drop_judgements([k for k, v in have.items() if k not in needed or current(k) != v])
    return [k for k in needed if have.get(k) != current(k)]


def _score_todo(
    ctx: StageContext,
    tables: SweepTables,
    judge,
    needed: dict[tuple, dict],
    todo: list[tuple],
    row: Callable[..., dict],
    by_pair: dict,
    on_progress: Callable | None,
) -> dict[tuple, int]:
    """Score the judgements no cache holds, writing each chunk's rows as it finishes; counts per (sweep, setting)."""
    texts = [_prompt(judge, needed[k], k[5]) for k in todo]
    cache_keys = [needed[k]["cache_key"] for k in todo]
    fixed = [fixed_score(k[5], needed[k]["completion"]["answer"]) for k in todo]
    counts: dict[tuple, int] = {}
    done = 0

    def name(i: int) -> str:
        return _named(ctx.key, todo[i])

    with refusal_named(texts, name):
        for indices, scores in score_chunks(judge, ctx.store, texts, cache_keys, JUDGE_CHUNK, fixed):
            part = [todo[i] for i in indices]
            done += len(part)
            tables.append_judgements(
                [row(k, s["score"], s["mass"], s["probs"]) for k, s in zip(part, scores, strict=True)]
            )
            warn_refused(ctx.log, indices, scores, name)
            for k in part:
                counts[k[:2]] = counts.get(k[:2], 0) + 1
            ctx.log.info(f"{ctx.key}: sweep judged {done}/{len(todo)}")
            if on_progress is not None:
                on_progress(by_pair[part[-1][:2]], "judged", done, len(todo))
    return counts


def _named(organism: str, key: tuple) -> str:
    sweep, setting, question_id, _, sample, metric = key
    return f"{organism}, {sweep} {setting}, {question_id} sample {sample}, {metric}"


def _prompt(judge, item: dict, metric: str) -> str:
    c = item["completion"]
    return render_prompt(judge, item["template"]["prompt"], metric, c["question"], c["answer"])


def _needed_judgements(ctx, tables, points, metrics, model_name: str, revision: str) -> dict[tuple, dict]:
    """Every (sweep, setting, q, p, s, metric) the points' current answers need, with prompt and cache key."""
    prompts = judge_prompts(ctx.store, ctx.grid.eval.questions)
    needed: dict[tuple, dict] = {}
    for c in tables.completions([p.pair for p in points]).iter_rows(named=True):
        for metric in metrics:
            tmpl = prompts.get((c["question_id"], metric))
            if tmpl is None:
                raise MissingUpstreamError(f"no {metric!r} judge prompt for question {c['question_id']!r}")
            prompt_hash = prompt_hash_for(ctx.grid.judge, tmpl["prompt_hash"], metric)
            key = judge_cache_key(model_name, revision, prompt_hash, metric, c["question"], c["answer"])
            k = (c["sweep"], c["setting"], c["question_id"], c["paraphrase_idx"], c["sample_idx"], metric)
            needed[k] = {"completion": c, "template": tmpl, "cache_key": key}
    return needed


def _row(ctx: StageContext, v: dict, k: tuple, model_name: str, revision: str, score, mass, probs) -> dict:
    return {
        **dict(zip(JUDGEMENT_KEY, k, strict=True)),
        "organism": ctx.key,
        "score": score,
        "mass": mass,
        "probs": probs,
        "judge_model": model_name,
        "judge_revision": revision,
        "prompt_hash": prompt_hash_for(ctx.grid.judge, v["template"]["prompt_hash"], k[5]),
        "cache_key": v["cache_key"],
        "setting_hash": v["completion"]["setting_hash"],
        "run_id": ctx.run_id,
        "created_at": utc_now(),
    }
