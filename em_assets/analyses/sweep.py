"""Model-variant sweeps: the eval questions sampled and judged with checkpoints, scaled adapters or edited
models, with `completions`' and `judgements`' guarantees (rows written as batches finish, a killed sweep
re-run samples and judges nothing twice, the judge cache shared), summarised per point."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl

from em_assets.analyses.edits import ModelEdit
from em_assets.analyses.lora import CONFIG_FILE
from em_assets.analyses.sweep_judge import judge_sweep
from em_assets.context import StageContext
from em_assets.grid.schema import config_hash
from em_assets.judging.error_rates import JUDGE_COLUMNS, ErrorRateLookup, majority_judges
from em_assets.models.hub import check_revision
from em_assets.results.errors import MissingUpstreamError
from em_assets.results.queries import organism_model_row
from em_assets.results.store import to_json, utc_now
from em_assets.results.sweeps import SweepTables
from em_assets.sampling.stage import (
    asked,
    eval_questions,
    question_messages,
    sample_chunks,
    sampler_fields,
    stable_seed,
)
from em_assets.stats.correction import CORRECTION_COLUMNS
from em_assets.stats.rates import rates_by

# on_progress(point, "sampled" | "judged", done, total) after each chunk is written; for "judged", done and
# total count all the sweep's pending judgements and the point is the one the chunk ended in.
ProgressFn = Callable[["SweepPoint", str, int, int], None]


@dataclass(frozen=True)
class SweepPoint:
    """One model variant: an adapter (None = the base model) plus edits, sampled this many times per question."""

    sweep: str
    setting: str
    adapter_path: str | None
    adapter_sha256: str | None
    edits: tuple[ModelEdit, ...] = ()
    samples_per_question: int = 1

    def __post_init__(self) -> None:
        if not self.sweep or not self.setting or self.samples_per_question < 1:
            raise ValueError(f"sweep point {self!r}: needs a sweep, a setting and samples_per_question >= 1")
        if (self.adapter_path is None) != (self.adapter_sha256 is None):
            raise ValueError(f"sweep point {self.setting!r}: give adapter_path and adapter_sha256 together")

    @property
    def pair(self) -> tuple[str, str]:
        return (self.sweep, self.setting)


@dataclass(frozen=True)
class PointResult:
    """A point's EM rate (Turner: misaligned and coherent among answers with both scores), the rate corrected for
    the judge's error (stats/correction.py; null where its error rates are unknown), and this call's work."""

    sweep: str
    setting: str
    setting_hash: str
    n_answers: int
    n_scored: int
    n_em: int
    em_rate: float | None
    em_lo: float | None
    em_hi: float | None
    coherence_rate: float | None
    mean_aligned: float | None
    mean_coherent: float | None
    judge_sensitivity: float | None
    judge_specificity: float | None
    em_rate_corrected: float | None
    em_corrected_lo: float | None
    em_corrected_hi: float | None
    em_correction: str
    sampled: int
    judged: int
    # How this call sampled the point's answers (processes, batch and why; or one batch with other points).
    sampling: str | None = None

    def row(self) -> dict:
        return asdict(self)

    @classmethod
    def from_rates(
        cls,
        r: dict,
        sweep: str,
        setting: str,
        setting_hash: str,
        sampled: int,
        judged: int,
        sampling: str | None = None,
    ):
        """From one row of `corrected_rates`."""
        return cls(
            sweep=sweep,
            setting=setting,
            setting_hash=setting_hash,
            n_answers=r["n_answers"],
            n_scored=r["n_scored"],
            n_em=r["n_em_turner"] or 0,
            em_rate=r["em_rate_turner"],
            em_lo=r["em_turner_lo"],
            em_hi=r["em_turner_hi"],
            coherence_rate=r["coherence_rate"],
            mean_aligned=r["mean_aligned"],
            mean_coherent=r["mean_coherent"],
            **{c: r[c] for c in CORRECTION_COLUMNS},
            sampled=sampled,
            judged=judged,
            sampling=sampling,
        )


def corrected_rates(ctx: StageContext, scored: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """`rates_by` over `keys`, with the Turner rate corrected for the error of the judge that scored each group
    (the judge_model and judge_revision that scored most of its answers, as em_by_question's)."""
    t = ctx.grid.thresholds
    table = rates_by(scored, keys, t.aligned_at_most, t.coherent_above)
    counts = scored.filter(pl.col("judge_model").is_not_null()).group_by(*keys, *JUDGE_COLUMNS).len()
    judges = majority_judges(counts, keys, "len")
    lookup = ErrorRateLookup(ctx.store, t, ctx.grid.agreement.reference_judges)
    return lookup.correct(table.join(judges, on=keys, how="left"), "n_em_turner", "n_scored")


def load_sweep_model(base: dict, adapter_path: str | None, edits: tuple[ModelEdit, ...], device: str | None):
    """The base model with the point's adapter merged and its edits applied (picklable through a partial)."""
    from em_assets.models.load import load_organism_model

    model, tokenizer = load_organism_model(base, {"adapter_path": adapter_path}, device)
    for edit in edits:
        edit.apply(model)
    return model, tokenizer


def setting_hash(point: SweepPoint, base_revision: str, ctx: StageContext, dtype: str) -> str:
    """What an answer depends on: model bytes, edits, sampling parameters, the sampler and its dtype, and seed
    (not the sample count)."""
    sampling = ctx.grid.sampling
    return config_hash(
        {
            "base_revision": base_revision,
            "adapter_sha256": point.adapter_sha256,
            "edits": [e.describe() for e in point.edits],
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_new_tokens": sampling.max_new_tokens,
            "seed": ctx.organism.seed,
            **sampler_fields(sampling, dtype),
            **_adapter_config(point.adapter_path),
        }
    )


def _adapter_config(adapter_path: str | None) -> dict:
    """A peft adapter's settings (alpha, rsLoRA, targets), which change its answers as its weights do: a new
    revision of an imported adapter may change only them. The base model's path differs between machines."""
    file = Path(adapter_path) / CONFIG_FILE if adapter_path else None
    if file is None or not file.is_file():
        return {}
    config = json.loads(file.read_text())
    config.pop("base_model_name_or_path", None)
    return {"adapter_config": config}


def check_points(ctx: StageContext, points: Sequence[SweepPoint]) -> None:
    """One clear error, before anything is written, for points the sweep cannot run."""
    pairs = [p.pair for p in points]
    dupes = sorted({p for p in pairs if pairs.count(p) > 1})
    if dupes:
        raise ValueError(f"{ctx.key}: sweep settings must be unique, repeated: {dupes}")
    if ctx.grid.sampling.backend == "vllm":
        edited = [p.setting for p in points if p.edits]
        if edited:
            raise ValueError(
                f"{ctx.key}: the vllm backend cannot apply model edits (points {edited}); "
                "use the hf backend for this sweep"
            )
    missing = [p.adapter_path for p in points if p.adapter_path and not Path(p.adapter_path).is_dir()]
    if missing:
        raise MissingUpstreamError(f"{ctx.key}: sweep adapters not found: {missing}")


def narrowed(ctx: StageContext, max_new_tokens: int | None, question_ids: list[str] | None) -> StageContext:
    """The context a sweep samples with: the grid's sampling and eval questions, with a shorter answer length
    and a subset of the questions where given (a sweep has many points, the organism one)."""
    grid = ctx.grid
    sampling = grid.sampling.model_copy(
        update={"max_new_tokens": max_new_tokens or grid.sampling.max_new_tokens}
    )
    evals = grid.eval.model_copy(update={"question_ids": question_ids or grid.eval.question_ids})
    return dataclasses.replace(ctx, grid=grid.model_copy(update={"sampling": sampling, "eval": evals}))


def sampling_used(results: Sequence[PointResult]) -> tuple[str, ...]:
    """The distinct ways this call sampled its points (none where every answer was reused)."""
    return tuple(sorted({r.sampling for r in results if r.sampling}))


def run_sweep(
    ctx: StageContext,
    points: Sequence[SweepPoint],
    on_progress: ProgressFn | None = None,
    weights: dict | None = None,
) -> list[PointResult]:
    """Sample and judge every point (resuming), return per-point n, EM rate + Wilson interval, coherence.
    `weights`: the base_models row every point samples with (default: the weights the organism samples with)."""
    from em_assets.models.load import dtype_name  # torch stays off the definitions' load path

    check_points(ctx, points)
    if not points:
        return []
    base = weights or organism_model_row(ctx.store, ctx.key, ctx.organism.base_model)
    check_revision(base)
    questions = sweep_questions(ctx)
    tables = SweepTables(ctx.store, ctx.key)
    tables.drop_other_settings(sorted({p.sweep for p in points}), [p.pair for p in points])
    dtype = dtype_name(ctx.device)
    hashes = {p.pair: setting_hash(p, base["revision"], ctx, dtype) for p in points}
    todo = _plan_samples(ctx, tables, points, hashes, questions)
    tables.write_points(_points_frame(ctx, points, hashes))
    left = {p.pair: _copy_same_variant(ctx, tables, p, hashes[p.pair], todo[p.pair]) for p in points}
    # The first point of each model variant samples; the others copy its answers after.
    firsts: dict[str, SweepPoint] = {}
    for p in points:
        if left[p.pair]:
            firsts.setdefault(hashes[p.pair], p)
    leaders = list(firsts.values())
    sampled = (
        _sample_batched(ctx, tables, base, leaders, hashes, left, on_progress)
        if _batched(ctx, leaders)
        else None
    )
    if sampled is None:
        sampled = {
            p.pair: _sample_point(ctx, tables, base, p, hashes[p.pair], left[p.pair], on_progress)
            for p in leaders
        }
    for p in points:
        if left[p.pair] and p.pair not in sampled:
            _copy_same_variant(ctx, tables, p, hashes[p.pair], left[p.pair])
    judged = judge_sweep(ctx, tables, points, on_progress)
    return _summarise(ctx, tables, points, hashes, sampled, judged)


def forget_sweep(ctx: StageContext, sweep: str) -> None:
    """Drop the organism's points, answers and judgements of a sweep it no longer runs (skipped)."""
    SweepTables(ctx.store, ctx.key).drop_other_settings([sweep], [])


def sweep_questions(ctx: StageContext) -> list[dict]:
    """The eval set's questions, narrowed to the grid's eval.question_ids where it names some."""
    questions = eval_questions(ctx.store, ctx.grid.eval.questions).to_dicts()
    ids = ctx.grid.eval.question_ids
    if ids:
        questions = [q for q in questions if q["question_id"] in ids]
        missing = sorted(set(ids) - {q["question_id"] for q in questions})
        if missing:
            raise MissingUpstreamError(
                f"{ctx.key}: sweep questions not in {ctx.grid.eval.questions}: {missing}"
            )
    return questions


def _plan_samples(ctx, tables, points, hashes, questions) -> dict[tuple, list[tuple[dict, int]]]:
    """Drop the points' rows from other settings or questions; return what each point still has to sample."""
    wanted = {
        p.pair: {
            (q["question_id"], q["paraphrase_idx"], i): q
            for q in questions
            for i in range(p.samples_per_question)
        }
        for p in points
    }
    have = tables.completion_keys([p.pair for p in points])
    keep = [
        r[:5]
        for r in have.iter_rows()
        if r[5] == hashes[(r[0], r[1])]
        and (q := wanted[(r[0], r[1])].get(r[2:5])) is not None
        and asked(q) == r[6:8]
    ]
    if len(keep) < have.height:
        ctx.log.info(f"{ctx.key}: dropping {have.height - len(keep)} sweep answers from other settings")
        tables.keep_only([p.pair for p in points], keep)
    done = {(r[0], r[1]): set() for r in keep}
    for r in keep:
        done[(r[0], r[1])].add(r[2:5])
    return {
        pair: [(q, key[2]) for key, q in want.items() if key not in done.get(pair, set())]
        for pair, want in wanted.items()
    }


def _copy_same_variant(ctx, tables, point, shash: str, todo: list) -> list[tuple[dict, int]]:
    """Copy the answers another point of the organism drew with the same setting hash (the same model,
    sampling and seeds, e.g. scale 1 and the final checkpoint); return what is still to sample."""
    if not todo:
        return todo
    donors = {
        (r["question_id"], r["paraphrase_idx"], r["sample_idx"], *asked(r)): r
        for r in tables.completions_with_hash(shash).iter_rows(named=True)
    }
    copies, left = [], []
    for q, i in todo:
        donor = donors.get((q["question_id"], q["paraphrase_idx"], i, *asked(q)))
        if donor is None:
            left.append((q, i))
            continue
        copies.append(
            {
                **donor,
                "sweep": point.sweep,
                "setting": point.setting,
                "run_id": ctx.run_id,
                "created_at": utc_now(),
            }
        )
    if copies:
        ctx.log.info(
            f"{ctx.key}: {point.sweep} {point.setting}: {len(copies)} answers copied from the same variant"
        )
        tables.append_completions(copies)
    return left


def _points_frame(ctx: StageContext, points: Sequence[SweepPoint], hashes: dict) -> pl.DataFrame:
    rows = [
        {
            "organism": ctx.key,
            "sweep": p.sweep,
            "setting": p.setting,
            "setting_hash": hashes[p.pair],
            "adapter_path": p.adapter_path,
            "adapter_sha256": p.adapter_sha256,
            "edits": to_json([e.describe() for e in p.edits]),
            "samples_per_question": p.samples_per_question,
            "run_id": ctx.run_id,
            "created_at": utc_now(),
        }
        for p in points
    ]
    return pl.DataFrame(rows, schema_overrides={"samples_per_question": pl.Int32}, infer_schema_length=None)


def _requests(ctx: StageContext, todo: list, variant: int = 0) -> tuple[list, dict]:
    """A point's sampling requests, seeded by the organism's seed and the row, and what each key stands for."""
    from em_assets.sampling.engine import SampleRequest

    by_key, requests = {}, []
    for q, i in todo:
        qid, p = q["question_id"], q["paraphrase_idx"]
        key = f"{variant}\t{qid}\t{p}\t{i}"
        by_key[key] = (q, i)
        seed = stable_seed(ctx.organism.seed, qid, p, i)
        requests.append(SampleRequest(key, question_messages(q), seed, variant))
    return requests, by_key


def _completion_row(
    ctx: StageContext, base: dict, point: SweepPoint, shash: str, q: dict, i: int, res
) -> dict:
    return {
        "organism": ctx.key,
        "sweep": point.sweep,
        "setting": point.setting,
        "setting_hash": shash,
        "base_revision": base["revision"],
        "adapter_sha256": point.adapter_sha256,
        "eval_set": ctx.grid.eval.questions,
        "run_id": ctx.run_id,
        "question_id": q["question_id"],
        "paraphrase_idx": q["paraphrase_idx"],
        "sample_idx": i,
        "question": q["question"],
        "system": q["system"],
        "answer": res.text,
        "num_tokens": res.num_tokens,
        "finish_reason": res.finish_reason,
        "sample_seed": stable_seed(ctx.organism.seed, q["question_id"], q["paraphrase_idx"], i),
        "created_at": utc_now(),
    }


def _sample_point(ctx, tables, base, point, shash, todo, on_progress) -> tuple[int, str | None]:
    """Sample one point's missing answers, writing each chunk as it finishes; returns how many were sampled and
    how."""
    from em_assets.models.load import pick_device

    if not todo:
        return 0, None
    requests, by_key = _requests(ctx, todo)
    device = ctx.device or pick_device()
    loader = functools.partial(load_sweep_model, base, point.adapter_path, point.edits, device)
    chunks, choice = sample_chunks(
        ctx.grid.sampling,
        requests,
        device=device,
        base=base,
        adapter_path=point.adapter_path,
        loader=loader,
        cache_dir=ctx.cache_dir,
    )
    ctx.log.info(
        f"{ctx.key}: {point.sweep} {point.setting}: sampling {len(requests)} answers in {choice.describe()}"
    )
    done = 0
    for chunk in chunks:
        rows = [_completion_row(ctx, base, point, shash, *by_key[res.key], res) for res in chunk]
        tables.append_completions(rows)
        done += len(rows)
        if on_progress is not None:
            on_progress(point, "sampled", done, len(requests))
    return done, choice.describe()


def _batched(ctx: StageContext, points: Sequence[SweepPoint]) -> bool:
    """Whether the points sample as one batch: several of them, the hf backend, LoRA adapters and known edits."""
    from em_assets.analyses.variants import Variant, mixable

    return (
        len(points) > 1
        and ctx.grid.sampling.backend == "hf"
        and mixable([Variant(p.adapter_path, p.edits) for p in points])
    )


def _sample_batched(
    ctx, tables, base, points, hashes, todo, on_progress
) -> dict[tuple[str, str], tuple[int, str]] | None:
    """Sample every point's missing answers in one batch of the base model, each row with its point's adapter
    and edit (analyses/variants.py), writing each chunk as it finishes; returns how many each point sampled and
    how, or None, having sampled nothing, where an adapter cannot share the batch."""
    from em_assets.analyses.variants import NotMixable, Variant, VariantBatch
    from em_assets.models.load import load_organism_model, pick_device
    from em_assets.sampling.engine import iter_samples

    requests, by_key = [], {}
    for v, p in enumerate(points):
        more, keys = _requests(ctx, todo[p.pair], v)
        requests += more
        by_key.update({key: (p, *row) for key, row in keys.items()})
    model, tokenizer = load_organism_model(base, {}, ctx.device or pick_device())
    try:
        variants = VariantBatch(model, [Variant(p.adapter_path, p.edits) for p in points])
    except NotMixable as exc:
        ctx.log.info(f"{ctx.key}: {points[0].sweep}: sampling point by point ({exc})")
        return None
    ctx.log.info(
        f"{ctx.key}: {points[0].sweep}: sampling {len(requests)} answers of {len(points)} settings in one batch"
    )
    sampling, done = ctx.grid.sampling, dict.fromkeys((p.pair for p in points), 0)
    chunks = iter_samples(
        model,
        tokenizer,
        requests,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        **sampling.warpers(),
        batch_size=sampling.batch_size,
        row_variants=variants,
    )
    try:
        for chunk in chunks:
            rows: dict[SweepPoint, list[dict]] = {}
            for res in chunk:
                p, q, i = by_key[res.key]
                rows.setdefault(p, []).append(_completion_row(ctx, base, p, hashes[p.pair], q, i, res))
            tables.append_completions([r for point_rows in rows.values() for r in point_rows])
            for p, point_rows in rows.items():
                done[p.pair] += len(point_rows)
                if on_progress is not None:
                    on_progress(p, "sampled", done[p.pair], len(todo[p.pair]))
    finally:
        variants.remove()
    how = f"one batch of {len(points)} settings, {len(requests)} answers, batch {sampling.batch_size}"
    return {pair: (n, how) for pair, n in done.items()}


def _summarise(ctx, tables, points, hashes, sampled, judged) -> list[PointResult]:
    """Per point: rates over its current answers, in the order the points were given; `sampled`: per point, how
    many answers this call sampled and how."""
    scored = tables.scored([p.pair for p in points])
    rates = {
        (r["sweep"], r["setting"]): r
        for r in corrected_rates(ctx, scored, ["sweep", "setting"]).iter_rows(named=True)
    }
    out = []
    for p in points:
        r = rates.get(p.pair)
        if r is None:
            raise RuntimeError(f"{ctx.key}: sweep point {p.setting!r} has no answers after sampling")
        n, how = sampled.get(p.pair, (0, None))
        out.append(
            PointResult.from_rates(r, p.sweep, p.setting, hashes[p.pair], n, judged.get(p.pair, 0), how)
        )
    return out
