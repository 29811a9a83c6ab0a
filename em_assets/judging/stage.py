"""Judging stage: every completion of one organism on every judge metric, through the cross-run cache."""

from __future__ import annotations

import hashlib
import json
import time

import polars as pl

from em_assets.context import MissingUpstreamError, StageContext
from em_assets.judging.judges import judge_identity, make_judge, prompt_hash_for, render_prompt
from em_assets.results.store import to_json, utc_now


def judge_cache_key(model: str, revision: str, prompt_hash: str, question: str, answer: str) -> str:
    return hashlib.sha256(json.dumps([model, revision, prompt_hash, question, answer]).encode()).hexdigest()


def judge_completions(ctx: StageContext, chunk_size: int = 64) -> dict:
    """Score every completion of the organism on every judge metric; reuses the cross-run judge cache."""
    store, grid = ctx.store, ctx.grid
    comps = store.query("SELECT * FROM completions WHERE organism = ?", [ctx.key])
    if comps.height == 0:
        raise MissingUpstreamError(f"organism {ctx.key}: no completions; materialise completions first")
    prompts = {
        (r["question_id"], r["metric"]): r
        for r in store.query(
            "SELECT * FROM judge_prompts WHERE eval_set = ?", [grid.eval.questions]
        ).iter_rows(named=True)
    }
    model_name, revision, path = judge_identity(grid, ctx.cache_dir, store)
    needed: dict[tuple, dict] = {}
    for c in comps.iter_rows(named=True):
        for metric in grid.judge.metrics:
            tmpl = prompts.get((c["question_id"], metric))
            if tmpl is None:
                raise MissingUpstreamError(f"no {metric!r} judge prompt for question {c['question_id']!r}")
            key = judge_cache_key(
                model_name,
                revision,
                prompt_hash_for(grid.judge, tmpl["prompt_hash"], metric),
                c["question"],
                c["answer"],
            )
            needed[(c["question_id"], c["paraphrase_idx"], c["sample_idx"], metric)] = {
                "completion": c,
                "template": tmpl,
                "cache_key": key,
                # A row is current only if it scores this answer AND carries this completion's lineage: a
                # resampled answer that happens to repeat (same text, new adapter or settings) keeps its cached
                # score but its row is rewritten with the new lineage.
                "current": (key, c["sampling_hash"]),
            }
    existing = store.query(
        "SELECT question_id, paraphrase_idx, sample_idx, metric, cache_key, sampling_hash FROM judgements "
        "WHERE organism = ?",
        [ctx.key],
    )
    have = {(r[0], r[1], r[2], r[3]): (r[4], r[5]) for r in existing.iter_rows()}
    stale = [k for k, v in have.items() if k not in needed or needed[k]["current"] != v]
    if stale:
        stale_df = pl.DataFrame(
            stale, schema={"q": pl.String, "p": pl.Int32, "s": pl.Int32, "m": pl.String}, orient="row"
        )
        with store.connect() as conn:
            conn.register("_stale", stale_df.to_arrow())
            conn.execute(
                "DELETE FROM judgements j WHERE organism = ? AND EXISTS (SELECT 1 FROM _stale s WHERE "
                "s.q = j.question_id AND s.p = j.paraphrase_idx AND s.s = j.sample_idx AND s.m = j.metric)",
                [ctx.key],
            )
    pending = {k: v for k, v in needed.items() if have.get(k) != v["current"]}
    cached = store.query(
        "SELECT * FROM judge_cache WHERE cache_key IN (SELECT unnest(?::VARCHAR[]))",
        [sorted({v["cache_key"] for v in pending.values()})],
    )
    cache = {r["cache_key"]: r for r in cached.iter_rows(named=True)}

    def row(k: tuple, v: dict, score, mass, probs_json: str) -> dict:
        c = v["completion"]
        return {
            "organism": ctx.key,
            "question_id": k[0],
            "paraphrase_idx": k[1],
            "sample_idx": k[2],
            "metric": k[3],
            "score": score,
            "mass": mass,
            "probs": probs_json,
            "judge_backend": grid.judge.backend,
            "judge_model": model_name,
            "judge_revision": revision,
            "prompt_hash": prompt_hash_for(grid.judge, v["template"]["prompt_hash"], k[3]),
            "cache_key": v["cache_key"],
            "base_revision": c["base_revision"],
            "dataset_sha256": c["dataset_sha256"],
            "adapter_sha256": c["adapter_sha256"],
            "sampling_hash": c["sampling_hash"],
            "run_id": ctx.run_id,
            "created_at": utc_now(),
        }

    from_cache = [
        row(k, v, *(cache[v["cache_key"]][f] for f in ("score", "mass", "probs")))
        for k, v in pending.items()
        if v["cache_key"] in cache
    ]
    if from_cache:
        store.append_rows("judgements", pl.DataFrame(from_cache, infer_schema_length=None))
    todo = [(k, v) for k, v in pending.items() if v["cache_key"] not in cache]
    stats = {"reused": len(needed) - len(todo), "scored": 0, "cache_hits": len(from_cache), "seconds": 0.0}
    if not todo:
        ctx.log.info(f"{ctx.key}: all {len(needed)} judgements are up to date; no judging")
        return stats
    judge = make_judge(grid, path, ctx.device)
    start = time.perf_counter()
    for offset in range(0, len(todo), chunk_size):
        part = todo[offset : offset + chunk_size]
        texts = [
            render_prompt(
                judge, v["template"]["prompt"], k[3], v["completion"]["question"], v["completion"]["answer"]
            )
            for k, v in part
        ]
        scores = judge.score(texts)
        rows, cache_rows = [], []
        for (k, v), s in zip(part, scores, strict=True):
            probs_json = to_json({str(n): p for n, p in sorted(s.probs.items())})
            rows.append(row(k, v, s.score, s.mass, probs_json))
            cache_rows.append(
                {
                    "cache_key": v["cache_key"],
                    "score": s.score,
                    "mass": s.mass,
                    "probs": probs_json,
                    "created_at": utc_now(),
                }
            )
        store.append_rows("judge_cache", pl.DataFrame(cache_rows, infer_schema_length=None))
        store.append_rows("judgements", pl.DataFrame(rows, infer_schema_length=None))
        stats["scored"] += len(rows)
        ctx.log.info(f"{ctx.key}: judged {stats['scored']}/{len(todo)}")
    stats["seconds"] = time.perf_counter() - start
    stats["judgements_per_s"] = stats["scored"] / stats["seconds"]
    return stats
