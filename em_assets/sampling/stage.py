"""Sampling stage: every eval question for one organism, written as batches finish, resumed after a kill."""

from __future__ import annotations

import functools
import hashlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from em_assets.context import StageContext
from em_assets.grid.schema import SamplingSpec, config_hash, dtype_fields
from em_assets.models.chat import rendering_fields
from em_assets.models.hub import check_revision
from em_assets.results import queries
from em_assets.results.artifacts import check_weights
from em_assets.results.errors import MissingUpstreamError
from em_assets.results.store import Store, utc_now
from em_assets.sampling.calibrate import SamplingChoice, choose_sampling
from em_assets.sampling.imported import import_answers

RowKey = tuple[str, int, int]  # (question_id, paraphrase_idx, sample_idx)


@dataclass(frozen=True)
class SamplingPlan:
    """What the organism's completions should be, which rows are current, and which are still to sample."""

    sampling_hash: str
    wanted: dict[RowKey, dict]
    keep: frozenset[RowKey]
    stale: int

    @property
    def todo(self) -> list[RowKey]:
        return [k for k in self.wanted if k not in self.keep]


@dataclass(frozen=True)
class SamplingResult:
    sampled: int
    reused: int
    generated_tokens: int
    seconds: float
    workers: int
    sampling_hash: str
    choice: SamplingChoice | None = None

    @property
    def tokens_per_s(self) -> float | None:
        return self.generated_tokens / self.seconds if self.seconds else None


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from its parts, the same on every machine and Python run."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def sampler_fields(sampling: SamplingSpec, dtype: str) -> dict:
    """The sampler (vLLM's texts differ from ours at the same seed), the dtype ours computes in, the warpers
    beyond temperature and top-p (SamplingSpec.warpers) and the chat rendering, each named only when not the
    default, so answers sampled before the field existed stay current."""
    if sampling.backend != "hf":
        return {"backend": sampling.backend, **sampling.warpers(), **rendering_fields()}
    # The device picks our sampler's dtype (fp16 on MPS and on GPUs without native bf16), and the texts differ
    # between dtypes. vLLM picks its own dtype from the model's config.
    return {**dtype_fields(dtype), **sampling.warpers(), **rendering_fields()}


def sampling_hash(
    base: dict, adapter: dict, sampling: SamplingSpec, seed: int, dtype: str, imported_adapter: bool = False
) -> str:
    """What makes a completion current: the model bytes, the sampling parameters, the sampler and its dtype
    (sampler_fields) and the organism's seed."""
    fields = {
        "base_revision": base["revision"],
        "adapter_sha256": adapter.get("adapter_sha256"),
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_new_tokens": sampling.max_new_tokens,
        "seed": seed,
        **sampler_fields(sampling, dtype),
    }
    # An imported adapter's config (alpha, rslora, targets) changes its answers as its weights do, and a new
    # commit may change only the config: its source's hash (revision included) says which. A trained adapter's
    # config follows from its recipe, which its weights' hash covers.
    if imported_adapter:
        fields["adapter_source"] = adapter.get("config_hash")
    return config_hash(fields)


def organism_questions(ctx: StageContext) -> pl.DataFrame:
    """The questions of every evaluation set the organism's recipe is asked, each row naming its set."""
    sets = ctx.grid.eval_sets(ctx.organism.recipe)
    questions = pl.concat([eval_questions(ctx.store, s) for s in sets])
    shared = (
        questions.group_by("question_id")
        .agg(pl.col("eval_set").n_unique().alias("n"))
        .filter(pl.col("n") > 1)
    )
    if shared.height:
        raise ValueError(
            f"{ctx.key}: eval sets {sets} share question ids {sorted(shared['question_id'])}; an organism's "
            "answers are keyed by question id, so ask these sets in separate grids or recipes"
        )
    return questions


def plan_sampling(ctx: StageContext, shash: str) -> SamplingPlan:
    grid = ctx.grid
    questions = organism_questions(ctx)
    wanted = {
        (q["question_id"], q["paraphrase_idx"], i): q
        for q in questions.iter_rows(named=True)
        for i in range(grid.sampling.samples_per_question)
    }
    existing = queries.completion_hashes(ctx.store, ctx.key)
    current = {
        key
        for r in existing.iter_rows(named=True)
        if r["sampling_hash"] == shash
        and (key := (r["question_id"], r["paraphrase_idx"], r["sample_idx"])) in wanted
        and wanted[key]["eval_set"] == r["eval_set"]
        and asked(wanted[key]) == asked(r)
    }
    # A DuckLake keeps no keys: two writers racing on one answer can leave it twice. Both copies go, and the
    # answer is sampled again with its own seed.
    keys = ["question_id", "paraphrase_idx", "sample_idx"]
    doubled = set(existing.group_by(keys).len().filter(pl.col("len") > 1).select(keys).rows())
    keep = frozenset((current & wanted.keys()) - doubled)
    return SamplingPlan(shash, wanted, keep, existing.height - len(keep))


def sample_requests(plan: SamplingPlan, seed: int) -> list:
    """One request per row still to sample, seeded by the organism's seed and the row's position."""
    from em_assets.sampling.engine import SampleRequest  # torch stays off the definitions' load path

    requests = []
    for qid, p, i in plan.todo:
        q = plan.wanted[(qid, p, i)]
        requests.append(SampleRequest(f"{qid}\t{p}\t{i}", question_messages(q), stable_seed(seed, qid, p, i)))
    return requests


def asked(row: dict) -> tuple[str, str | None]:
    """What an eval question row, or an answer's row, asks: the question and system prompt. The sampling hash
    does not cover them (a new pin of an eval set, or another parsing of it, keeps its question ids), so an
    answer is current only where they are the question's now."""
    return row["question"], row["system"]


def question_messages(q: dict) -> list[dict]:
    """The chat messages of one eval question row: its system prompt, if any, then the question."""
    system = [{"role": "system", "content": q["system"]}] if q["system"] else []
    return [*system, {"role": "user", "content": q["question"]}]


def eval_questions(store: Store, eval_set: str) -> pl.DataFrame:
    """The eval set's questions in a fixed order; a clear error when the catalog has not loaded them."""
    questions = queries.eval_questions(store, eval_set)
    if questions.height == 0:
        raise MissingUpstreamError(f"no questions for {eval_set}: materialise eval_questions first")
    return questions


def vllm_unusable(device: str) -> str | None:
    """Why the vllm backend cannot sample here on `device` (an EM_DEVICE value), else None: checked by the demo
    before it trains, not first met by the sampling step after."""
    import importlib.util

    if device.startswith("cuda:") and device != "cuda:0":
        # vLLM takes no device: it runs on the first GPU the process sees, which may be busy.
        return (
            f"the vllm backend samples on the first visible GPU, not EM_DEVICE={device}: set "
            f"CUDA_VISIBLE_DEVICES={device.removeprefix('cuda:')} (and EM_DEVICE=cuda) instead"
        )
    # An imported module counts as installed (find_spec refuses one without a spec).
    if "vllm" not in sys.modules and importlib.util.find_spec("vllm") is None:
        return "the vllm backend needs vLLM, which is not installed: pip install 'em-assets[vllm]'"
    return None


def sample_chunks(
    sampling: SamplingSpec,
    requests: list,
    *,
    device: str,
    base: dict,
    adapter_path: str | None,
    loader: Callable[[], tuple[Any, Any]],
    on_progress: Callable[[int, int], None] | None = None,
    cache_dir: Path | None = None,
) -> tuple[Iterator[list], SamplingChoice]:
    """Result chunks for `requests` on the grid's backend, and how many processes at what batch size sample;
    `loader` (picklable, no arguments) builds the model on `device` for the Hugging Face backend."""
    # Function-local: torch and vLLM stay off the definitions' load path.
    from em_assets.sampling.engine import iter_samples
    from em_assets.sampling.pool import iter_samples_in_workers

    options = {
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        **sampling.warpers(),
        "batch_size": sampling.batch_size,
        "on_progress": on_progress,
    }
    if sampling.backend == "vllm":
        # vLLM loads the base model path and the adapter directory itself.
        from em_assets.sampling import vllm_backend

        if why := vllm_unusable(device):
            raise ValueError(why)
        chunks = vllm_backend.iter_samples(
            base["path"], adapter_path, requests, **options, vllm=sampling.vllm
        )
        return chunks, SamplingChoice(1, sampling.batch_size, "vllm backend")
    # The calibration's timings are cached under `cache_dir`: a later job on this machine and base model, with the
    # same answer length and warpers, reuses them.
    choice = choose_sampling(
        sampling, len(requests), device=device, base=base, loader=loader, cache_dir=cache_dir
    )
    options["batch_size"] = choice.batch_size
    if choice.workers > 1:
        return iter_samples_in_workers(loader, requests, workers=choice.workers, **options), choice
    model, tokenizer = loader()
    return iter_samples(model, tokenizer, requests, **options), choice


def tenths_logger(log: Callable[[int, int], None]) -> Callable[[int, int], None]:
    """A progress callback that logs each tenth of the work as it is passed (`done` moves a batch at a time, so
    it seldom lands on a tenth exactly) and the end."""
    logged = 0

    def progress(done: int, total: int) -> None:
        nonlocal logged
        tenth = done * 10 // max(1, total)
        if tenth > logged or done == total:
            logged = tenth
            log(done, total)

    return progress


def organism_chunks(
    ctx: StageContext, base: dict, adapter: dict, requests: list
) -> tuple[Iterator, SamplingChoice]:
    """sample_chunks for the organism's own model (base + merged adapter), logging progress and the choice."""
    from em_assets.models.load import load_organism_model, pick_device  # torch stays off the load path

    progress = tenths_logger(lambda done, total: ctx.log.info(f"{ctx.key}: sampled {done}/{total}"))

    check_weights(adapter)
    check_revision(base)
    device = ctx.device or pick_device()
    chunks, choice = sample_chunks(
        ctx.grid.sampling,
        requests,
        device=device,
        base=base,
        adapter_path=adapter.get("adapter_path"),
        loader=functools.partial(load_organism_model, base, adapter, device),
        on_progress=progress,
        cache_dir=ctx.cache_dir,
    )
    ctx.log.info(f"{ctx.key}: sampling in {choice.describe()}")
    return chunks, choice


def lineage(ctx: StageContext, base: dict, adapter: dict, shash: str) -> dict:
    """The columns every completion row carries so its numbers can be traced to bytes and settings."""
    org, sampling = ctx.organism, ctx.grid.sampling
    return {
        "organism": ctx.key,
        "base_model": org.base_model,
        "base_revision": base["revision"],
        "recipe": org.recipe,
        "seed": org.seed,
        "dataset": adapter.get("dataset"),
        "dataset_sha256": adapter.get("dataset_sha256"),
        "adapter_sha256": adapter.get("adapter_sha256"),
        "eval_set": ctx.grid.eval.questions,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "repetition_penalty": sampling.repetition_penalty,
        "max_new_tokens": sampling.max_new_tokens,
        "sampling_hash": shash,
        "run_id": ctx.run_id,
    }


def completion_rows(chunk: list, plan: SamplingPlan, lineage_cols: dict, seed: int) -> pl.DataFrame:
    rows = []
    for res in chunk:
        qid, p, i = res.key.split("\t")
        q = plan.wanted[(qid, int(p), int(i))]
        rows.append(
            {
                **lineage_cols,
                "eval_set": q["eval_set"],
                "question_id": qid,
                "paraphrase_idx": int(p),
                "sample_idx": int(i),
                "question": q["question"],
                "system": q["system"],
                "answer": res.text,
                "num_tokens": res.num_tokens,
                "finish_reason": res.finish_reason,
                "sample_seed": stable_seed(seed, qid, p, i),
                "created_at": utc_now(),
            }
        )
    return pl.DataFrame(rows, infer_schema_length=None)


def sample_completions(ctx: StageContext) -> SamplingResult:
    """Sample every eval question for the organism, writing rows as batches finish; skips rows already done."""
    from em_assets.models.load import dtype_name  # torch stays off the definitions' load path

    store, seed = ctx.store, ctx.organism.seed
    recipe = ctx.grid.recipes.get(ctx.organism.recipe)
    if recipe is not None and recipe.kind == "answers":
        done = import_answers(ctx)
        return SamplingResult(done.imported, done.reused, 0, done.seconds, 0, done.sampling_hash)
    adapter = ctx.current_adapter()
    base = queries.organism_model_row(store, ctx.key, ctx.organism.base_model)
    imported = recipe is not None and recipe.kind == "adapter"
    shash = sampling_hash(base, adapter, ctx.grid.sampling, seed, dtype_name(ctx.device), imported)
    plan = plan_sampling(ctx, shash)
    if plan.stale:
        ctx.log.info(f"{ctx.key}: dropping {plan.stale} completions from other settings or questions")
        queries.drop_completions_except(store, ctx.key, plan.keep)
    reused = len(plan.wanted) - len(plan.todo)
    if not plan.todo:
        ctx.log.info(f"{ctx.key}: all {len(plan.wanted)} completions are up to date; no sampling")
        return SamplingResult(0, reused, 0, 0.0, 0, shash)
    start = time.perf_counter()
    chunks, choice = organism_chunks(ctx, base, adapter, sample_requests(plan, seed))
    cols = lineage(ctx, base, adapter, shash)
    sampled = tokens = 0
    for chunk in chunks:
        rows = completion_rows(chunk, plan, cols, seed)
        store.append_rows("completions", rows)
        sampled += rows.height
        tokens += int(rows["num_tokens"].sum())
    seconds = time.perf_counter() - start
    return SamplingResult(sampled, reused, tokens, seconds, choice.workers, shash, choice)
