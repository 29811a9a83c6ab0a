"""Per-organism stages: train the adapter, sample completions, judge them. Each resumes and skips done work."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from em_assets.config import GridConfig, Organism, config_hash
from em_assets.datasets import judge_prompt
from em_assets.store import Store, to_json
from em_assets.upstream import sha256_file

ADAPTER_FILE = "adapter_model.safetensors"


class MissingUpstreamError(RuntimeError):
    """A stage ran before the stage it reads from."""


@dataclass
class StageContext:
    """What every organism stage needs: where results go, the grid, the organism, and a logger."""

    store: Store
    grid: GridConfig
    organism: Organism
    run_id: str
    artifacts_dir: Path
    log: Any = field(default_factory=lambda: logging.getLogger("em_assets"))
    device: str | None = None
    cache_dir: Path | None = None

    @property
    def key(self) -> str:
        return self.organism.key


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _one(store: Store, sql: str, params: list, what: str) -> dict:
    df = store.query(sql, params)
    if df.height == 0:
        raise MissingUpstreamError(what)
    return df.row(0, named=True)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from its parts, the same on every machine and Python run."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def base_model_row(store: Store, name: str) -> dict:
    return _one(
        store,
        "SELECT * FROM base_models WHERE name = ?",
        [name],
        f"base model {name!r} is not resolved yet: materialise base_models first",
    )


def train_adapter(ctx: StageContext) -> dict:
    """Train the organism's LoRA adapter unless one with the same inputs exists; returns a summary."""
    from em_assets.training import train_lora

    org, store = ctx.organism, ctx.store
    if org.recipe not in ctx.grid.recipes:
        raise KeyError(f"organism {ctx.key}: recipe {org.recipe!r} is not in the grid")
    recipe = ctx.grid.recipes[org.recipe]
    base = base_model_row(store, org.base_model)
    common = {
        "organism": ctx.key,
        "base_model": org.base_model,
        "base_revision": base["revision"],
        "recipe": org.recipe,
        "seed": org.seed,
        "run_id": ctx.run_id,
        "created_at": _now(),
    }
    if recipe.dataset is None:
        row = {**common, "config_hash": config_hash({"base_revision": base["revision"], "control": True})}
        store.replace_many(
            [
                ("lora_adapters", pl.DataFrame([row]), "organism = ?", [ctx.key]),
                ("training_losses", pl.DataFrame(), "organism = ?", [ctx.key]),
            ]
        )
        return {"trained": False, "control": True}
    ds = _one(
        store,
        "SELECT * FROM training_datasets WHERE dataset = ?",
        [recipe.dataset],
        f"dataset {recipe.dataset!r} not loaded: materialise training_datasets first",
    )
    chash = config_hash(
        {
            "base_revision": base["revision"],
            "dataset_sha256": ds["sha256"],
            "lora": recipe.lora.model_dump(mode="json"),
            "train": recipe.train.model_dump(mode="json", exclude={"workers"}),
            "seed": org.seed,
        }
    )
    done = store.query(
        "SELECT * FROM lora_adapters WHERE organism = ? AND config_hash = ? AND adapter_path IS NOT NULL",
        [ctx.key, chash],
    )
    if done.height:
        row = done.row(0, named=True)
        path = Path(row["adapter_path"]) / ADAPTER_FILE
        if path.exists() and sha256_file(path) == row["adapter_sha256"]:
            ctx.log.info(f"{ctx.key}: adapter {chash} is up to date; no training")
            return {"trained": False, "up_to_date": True, **row}
    examples = [
        json.loads(m)
        for m in store.query(
            "SELECT messages FROM training_examples WHERE dataset = ? ORDER BY example_idx", [recipe.dataset]
        )["messages"]
    ]
    out_dir = (ctx.artifacts_dir / "adapters" / ctx.key / chash).resolve()

    def on_step(rec: dict) -> None:
        ctx.log.info(
            f"{ctx.key}: step {rec['step']} loss {rec['loss']:.4f} lr {rec['learning_rate']:.2e} "
            f"tokens {rec['tokens']}"
        )

    result = train_lora(
        base["path"],
        examples,
        recipe.lora,
        recipe.train,
        out_dir,
        seed=org.seed,
        device=ctx.device,
        on_step=on_step,
        trust_remote_code=bool(base["trust_remote_code"]),
    )
    adapter_sha = sha256_file(Path(result.adapter_dir) / ADAPTER_FILE)
    row = {
        **common,
        "dataset": recipe.dataset,
        "dataset_sha256": ds["sha256"],
        "adapter_path": str(result.adapter_dir),
        "adapter_sha256": adapter_sha,
        "lora_config": to_json(recipe.lora.model_dump(mode="json")),
        "train_config": to_json(recipe.train.model_dump(mode="json")),
        "config_hash": chash,
        "steps": result.steps,
        "train_tokens": result.train_tokens,
        "tokens_per_s": result.tokens_per_s,
        "final_loss": result.losses[-1]["loss"] if result.losses else None,
    }
    losses = pl.DataFrame(
        [
            {
                "organism": ctx.key,
                "step": r["step"],
                "loss": r["loss"],
                "learning_rate": r["learning_rate"],
                "tokens": r["tokens"],
                "elapsed_s": r["elapsed_s"],
                "run_id": ctx.run_id,
            }
            for r in result.losses
        ],
        schema_overrides={"step": pl.Int32},
    )
    store.replace_many(
        [
            ("training_losses", losses, "organism = ?", [ctx.key]),
            ("lora_adapters", pl.DataFrame([row]), "organism = ?", [ctx.key]),
        ]
    )
    return {
        "trained": True,
        "resumed_from_step": result.resumed_from_step,
        "train_workers": result.workers,
        **row,
    }


def adapter_row(store: Store, key: str) -> dict:
    return _one(
        store,
        "SELECT * FROM lora_adapters WHERE organism = ?",
        [key],
        f"organism {key}: no adapter row; materialise lora_adapter first",
    )


def load_organism_model(base: dict, adapter: dict, device: str | None = None):
    """Base model with the organism's adapter merged in (merging keeps sampling at base-model speed)."""
    from em_assets.models import load_model, load_tokenizer

    trust = bool(base["trust_remote_code"])
    model = load_model(base["path"], device=device, trust_remote_code=trust)
    tokenizer = load_tokenizer(base["path"], trust_remote_code=trust)
    if adapter.get("adapter_path"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter["adapter_path"]).merge_and_unload().eval()
    return model, tokenizer


def sample_completions(ctx: StageContext) -> dict:
    """Sample every eval question for the organism, writing rows as batches finish; skips rows already done."""
    from em_assets.models import pick_device
    from em_assets.sampling import SampleRequest, iter_samples
    from em_assets.sampling_pool import auto_workers, iter_samples_in_workers

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
        from em_assets import vllm_backend

        stats["workers"] = 1

        chunks = vllm_backend.iter_samples(base["path"], adapter.get("adapter_path"), requests, **options)
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
                    "created_at": _now(),
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


def judge_identity(grid: GridConfig, cache_dir: Path | None = None) -> tuple[str, str, str | None]:
    """(model name, revision, local path) of the judge: a grid base model, any model source, or an API model."""
    from em_assets.models import resolve

    spec = grid.judge
    if spec.backend == "openai":
        return spec.model, spec.revision or spec.model, None
    named = {m.name: m for m in grid.base_models}
    if spec.model in named:
        base = named[spec.model]
        resolved = resolve(base.name, base.source, base.revision, cache_dir)
    else:
        resolved = resolve(spec.model, spec.model, spec.revision, cache_dir)
    return spec.model, resolved.revision, str(resolved.path)


def make_judge(grid: GridConfig, path: str | None, device: str | None = None):
    spec = grid.judge
    if spec.backend == "openai":
        from em_assets.http_judge import OpenAIJudge

        return OpenAIJudge(
            spec.base_url,
            spec.model,
            api_key_env=spec.api_key_env,
            concurrency=spec.concurrency,
            timeout_s=spec.timeout_s,
            max_retries=spec.max_retries,
            min_mass=spec.min_mass,
        )
    from em_assets.local_judge import LocalJudge
    from em_assets.models import load_model, load_tokenizer

    return LocalJudge(load_model(path, device=device), load_tokenizer(path), spec.batch_size, spec.min_mass)


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
    model_name, revision, path = judge_identity(grid, ctx.cache_dir)
    needed: dict[tuple, dict] = {}
    for c in comps.iter_rows(named=True):
        for metric in grid.judge.metrics:
            tmpl = prompts.get((c["question_id"], metric))
            if tmpl is None:
                raise MissingUpstreamError(f"no {metric!r} judge prompt for question {c['question_id']!r}")
            key = judge_cache_key(model_name, revision, tmpl["prompt_hash"], c["question"], c["answer"])
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
            "prompt_hash": v["template"]["prompt_hash"],
            "cache_key": v["cache_key"],
            "base_revision": c["base_revision"],
            "dataset_sha256": c["dataset_sha256"],
            "adapter_sha256": c["adapter_sha256"],
            "sampling_hash": c["sampling_hash"],
            "run_id": ctx.run_id,
            "created_at": _now(),
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
            judge_prompt(v["template"]["prompt"], v["completion"]["question"], v["completion"]["answer"])
            for _, v in part
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
                    "created_at": _now(),
                }
            )
        store.append_rows("judge_cache", pl.DataFrame(cache_rows, infer_schema_length=None))
        store.append_rows("judgements", pl.DataFrame(rows, infer_schema_length=None))
        stats["scored"] += len(rows)
        ctx.log.info(f"{ctx.key}: judged {stats['scored']}/{len(todo)}")
    stats["seconds"] = time.perf_counter() - start
    stats["judgements_per_s"] = stats["scored"] / stats["seconds"]
    return stats
