"""Sampling stage: every eval question for one organism, written as batches finish, resumed after a kill."""

from __future__ import annotations

import functools
import hashlib
import time
from typing import Any

import polars as pl

from em_assets.context import MissingUpstreamError, StageContext
from em_assets.grid.schema import config_hash
from em_assets.models.load import load_organism_model
from em_assets.results.queries import adapter_row, base_model_row
from em_assets.results.store import utc_now


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from its parts, the same on every machine and Python run."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def sample_completions(ctx: StageContext) -> dict:
    """Sample every eval question for the organism, writing rows as batches finish; skips rows already done."""
    from em_assets.models.load import pick_device
    from em_assets.sampling.engine import SampleRequest, iter_samples
    from em_assets.sampling.pool import auto_workers, iter_samples_in_workers

    store, grid, sampling = ctx.store, ctx.grid, ctx.grid.sampling
    adapter = adapter_row(store, ctx.key)
    base = base_model_row(store, ctx.organism.base_model)
    questions = store.query(
        "SELECT * FROM eval_questions WHERE eval_set = ? ORDER BY question_id, paraphrase_idx",
        [grid.eval.questions],
    )
    if questions.height == 0:
        raise MissingUpstreamError(
            f"no questions for {grid.eval.questions}: materialise eval_questions first"
        )
    shash = config_hash(
        {
            "base_revision": base["revision"],
            "adapter_sha256": adapter.get("adapter_sha256"),
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_new_tokens": sampling.max_new_tokens,
            "seed": ctx.organism.seed,
        }
    )
    wanted = {
        (q["question_id"], q["paraphrase_idx"], i): q
        for q in questions.iter_rows(named=True)
        for i in range(sampling.samples_per_question)
    }
    existing = store.query(
        "SELECT question_id, paraphrase_idx, sample_idx, sampling_hash FROM completions WHERE organism = ?",
        [ctx.key],
    )
    keep = {
        (r["question_id"], r["paraphrase_idx"], r["sample_idx"])
        for r in existing.iter_rows(named=True)
        if r["sampling_hash"] == shash
    }
    stale = existing.height - len(keep & wanted.keys())
    if stale:
        ctx.log.info(f"{ctx.key}: dropping {stale} completions from other settings or questions")
        keep_df = pl.DataFrame(
            [{"q": k[0], "p": k[1], "s": k[2]} for k in keep & wanted.keys()],
            schema={"q": pl.String, "p": pl.Int32, "s": pl.Int32},
        )
        with store.connect() as conn:
            conn.register("_keep", keep_df.to_arrow())
            # The judgements of dropped answers go with them, in the same transaction: until the judge runs
            # again, no judgement row may score an answer that is no longer there (the judge cache keeps them).
            conn.execute("BEGIN")
            try:
                for table in ("completions", "judgements"):
                    conn.execute(
                        f"DELETE FROM {table} WHERE organism = ? AND NOT EXISTS (SELECT 1 FROM _keep k WHERE "
                        "k.q = question_id AND k.p = paraphrase_idx AND k.s = sample_idx)",
                        [ctx.key],
                    )
                conn.execute("COMMIT")
            except Exception:
                conn.execute("ROLLBACK")
                raise
    todo = [k for k in wanted if k not in keep]
    stats: dict[str, Any] = {"reused": len(wanted) - len(todo), "sampled": 0, "generated_tokens": 0}
    if not todo:
        ctx.log.info(f"{ctx.key}: all {len(wanted)} completions are up to date; no sampling")
        return {**stats, "sampling_hash": shash, "seconds": 0.0}
    requests = []
    for qid, p, i in todo:
        q = wanted[(qid, p, i)]
        messages = ([{"role": "system", "content": q["system"]}] if q["system"] else []) + [
            {"role": "user", "content": q["question"]}
        ]
        requests.append(
            SampleRequest(f"{qid}\t{p}\t{i}", messages, stable_seed(ctx.organism.seed, qid, p, i))
        )
    lineage = {
        "organism": ctx.key,
        "base_model": ctx.organism.base_model,
        "base_revision": base["revision"],
        "recipe": ctx.organism.recipe,
        "seed": ctx.organism.seed,
        "dataset": adapter.get("dataset"),
        "dataset_sha256": adapter.get("dataset_sha256"),
        "adapter_sha256": adapter.get("adapter_sha256"),
        "eval_set": grid.eval.questions,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_new_tokens": sampling.max_new_tokens,
        "sampling_hash": shash,
        "run_id": ctx.run_id,
    }
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            ctx.log.info(f"{ctx.key}: sampled {done}/{total}")

    options = {
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "batch_size": sampling.batch_size,
        "on_progress": progress,
    }
    if sampling.backend == "vllm":
        from em_assets.sampling import vllm_backend

        stats["workers"] = 1

        chunks = vllm_backend.iter_samples(
            base["path"], adapter.get("adapter_path"), requests, **options, vllm=sampling.vllm
        )
    else:
        device = ctx.device or pick_device()
        workers = sampling.workers
        if workers == "auto":
            workers = auto_workers(device, int(base["num_params"] or 0) * 2, len(requests))
        workers = workers if device == "cpu" else 1
        stats["workers"] = workers
        if workers > 1:
            ctx.log.info(f"{ctx.key}: sampling in {workers} worker processes")
            loader = functools.partial(load_organism_model, base, adapter, device)
            chunks = iter_samples_in_workers(loader, requests, workers=workers, **options)
        else:
            model, tokenizer = load_organism_model(base, adapter, device)
            chunks = iter_samples(model, tokenizer, requests, **options)
    for chunk in chunks:
        rows = []
        for res in chunk:
            qid, p, i = res.key.split("\t")
            q = wanted[(qid, int(p), int(i))]
            rows.append(
                {
                    **lineage,
                    "question_id": qid,
                    "paraphrase_idx": int(p),
                    "sample_idx": int(i),
                    "question": q["question"],
                    "system": q["system"],
                    "answer": res.text,
                    "num_tokens": res.num_tokens,
                    "finish_reason": res.finish_reason,
                    "sample_seed": stable_seed(ctx.organism.seed, qid, p, i),
                    "created_at": utc_now(),
                }
            )
        store.append_rows("completions", pl.DataFrame(rows, infer_schema_length=None))
        stats["sampled"] += len(rows)
        stats["generated_tokens"] += sum(r["num_tokens"] for r in rows)
    seconds = time.perf_counter() - start
    return {
        **stats,
        "sampling_hash": shash,
        "seconds": seconds,
        "tokens_per_s": stats["generated_tokens"] / seconds if seconds else None,
    }
