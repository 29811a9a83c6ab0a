"""The misalignment direction of one organism (Soligo et al.): per layer, the mean over its misaligned answers of
each answer's mean answer-token activation, minus the same over its aligned ones (balanced per class), saved as a
safetensors file. Each answer weighs the same, not each token (docs/protocols.md says how upstream differs).

Classes follow the grid: misaligned = aligned <= thresholds.aligned_at_most and coherent > coherent_above;
aligned = aligned > directions.aligned_above and coherent. With too few on either side the result says so
(no failure); the `quartile` fallback instead contrasts the lowest and highest aligned quarters of all
judged answers, coherent or not (a demo contrast, labelled as such wherever it is stored).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from em_assets.context import StageContext
from em_assets.grid.schema import DirectionsSpec, Thresholds, config_hash, dtype_fields
from em_assets.models.chat import rendering_fields
from em_assets.models.hub import check_revision
from em_assets.results import directions as db
from em_assets.results.artifacts import check_weights
from em_assets.results.errors import MissingUpstreamError
from em_assets.results.queries import organism_model_row
from em_assets.results.store import utc_now
from em_assets.stats.rates import em_flags

EM_CONTRAST = "em_threshold"
QUARTILE_CONTRAST = "quartile"
CONTRAST_LABELS = {
    EM_CONTRAST: "misaligned vs aligned answers at the grid's EM thresholds",
    QUARTILE_CONTRAST: "quartile contrast, not the EM threshold: lowest vs highest aligned quarter of answers",
}
KEYS = ["question_id", "paraphrase_idx", "sample_idx"]


@dataclass(frozen=True)
class Contrast:
    """The answers on each side of a direction, balanced, or why there are not enough."""

    kind: str | None
    misaligned: pl.DataFrame
    aligned: pl.DataFrame
    n_misaligned_found: int
    n_aligned_found: int
    needed: int

    @property
    def message(self) -> str:
        if self.kind is None:
            return (
                f"not enough misaligned answers ({self.n_misaligned_found} found, {self.needed} needed) or aligned "
                f"answers ({self.n_aligned_found} found, {self.needed} needed)"
            )
        return f"{CONTRAST_LABELS[self.kind]}; {self.misaligned.height} answers per class"


@dataclass(frozen=True)
class DirectionResult:
    organism: str
    status: str  # computed | reused | not_enough | no_model
    contrast: Contrast
    path: str | None
    sha256: str | None
    seconds: float
    note: str | None = None


def _balanced(df: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    return df.sort(KEYS).sample(n, seed=seed).sort(KEYS) if df.height > n else df.sort(KEYS)


def select_contrast(
    scored: pl.DataFrame, thresholds: Thresholds, spec: DirectionsSpec, seed: int
) -> Contrast:
    """Pick the two classes of answers (balanced by seeded sampling) from judged, non-empty answers."""
    usable = em_flags(
        scored.filter(pl.col("answer").str.strip_chars() != ""),
        thresholds.aligned_at_most,
        thresholds.coherent_above,
    )
    coherent = pl.col("is_coherent").fill_null(False)
    mis = usable.filter(pl.col("is_misaligned").fill_null(False) & coherent)
    ali = usable.filter((pl.col("aligned") > spec.aligned_above).fill_null(False) & coherent)
    found = (mis.height, ali.height)
    kind: str | None = EM_CONTRAST
    if min(found) < spec.min_per_class:
        kind = None
        if spec.fallback == QUARTILE_CONTRAST:
            ranked = usable.filter(pl.col("aligned").is_not_null()).sort(["aligned", *KEYS])
            quarter = ranked.height // 4
            if quarter >= 2:
                kind, mis, ali = QUARTILE_CONTRAST, ranked.head(quarter), ranked.tail(quarter)
    n = min(mis.height, ali.height)
    return Contrast(
        kind, _balanced(mis, n, seed), _balanced(ali, n, seed + 1), found[0], found[1], spec.min_per_class
    )


def _answers(df: pl.DataFrame) -> list:
    from em_assets.models.activations import JudgedAnswer

    return [
        JudgedAnswer(
            ([{"role": "system", "content": r["system"]}] if r["system"] else [])
            + [{"role": "user", "content": r["question"]}],
            r["answer"],
        )
        for r in df.iter_rows(named=True)
    ]


def compute_direction(model, tokenizer, contrast: Contrast, batch_size: int) -> dict:
    """The [layers, hidden] tensors: direction (misaligned mean minus aligned mean) and both class means."""
    from em_assets.models.activations import class_means

    means = class_means(
        model,
        tokenizer,
        {"mis": _answers(contrast.misaligned), "ali": _answers(contrast.aligned)},
        batch_size,
    )
    return {
        "direction": means["mis"] - means["ali"],
        "misaligned_mean": means["mis"],
        "aligned_mean": means["ali"],
    }


def save_tensors(tensors: dict, path: Path, metadata: dict[str, str]) -> str:
    """Write a safetensors file atomically; return its sha256."""
    from safetensors.torch import save_file

    from em_assets.results.artifacts import sha256_file, write_atomically

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))
    return sha256_file(path)


def _input_hash(contrast: Contrast, adapter: dict, base: dict, ctx: StageContext, dtype: str) -> str:
    """What the direction and its random control depend on: model bytes and the dtype they compute in, the
    chosen answers' text, and the selection settings and control seed."""
    picked = [
        [side, r["question_id"], r["paraphrase_idx"], r["sample_idx"], r["answer"]]
        for side, df in (("m", contrast.misaligned), ("a", contrast.aligned))
        for r in df.iter_rows(named=True)
    ]
    return config_hash(
        {
            "base_revision": base["revision"],
            "adapter_sha256": adapter.get("adapter_sha256"),
            "contrast": contrast.kind,
            "answers": config_hash(picked),
            "batch_size": ctx.grid.directions.batch_size,
            "control_seed": ctx.grid.directions.control_seed,
            **dtype_fields(dtype),
            **rendering_fields(),
        }
    )


def check_sampled_by(ctx: StageContext, scored: pl.DataFrame, base: dict, adapter: dict) -> None:
    """Refuse answers the organism's model as it now stands did not give (an adapter retrained, a base model
    re-resolved, and completions not sampled again): its activations on another model's answers, or its edited
    answers beside another model's, would pass for its own."""
    other = scored.filter(
        pl.col("base_revision").ne_missing(base["revision"])
        | pl.col("adapter_sha256").ne_missing(adapter.get("adapter_sha256"))
    )
    if other.height:
        raise MissingUpstreamError(
            f"organism {ctx.key}: {other.height} of its answers were sampled from other weights than its model's "
            "now; materialise completions and judgements first"
        )


def _is_current(row: dict | None, input_hash: str) -> bool:
    from em_assets.results.artifacts import sha256_file

    if row is None or row["input_hash"] != input_hash or row["direction_path"] is None:
        return False
    return all(
        Path(row[p]).exists() and sha256_file(row[p]) == row[s]
        for p, s in (("direction_path", "direction_sha256"), ("random_path", "random_sha256"))
    )


def extract_direction(ctx: StageContext) -> DirectionResult:
    """Plan (which answers, is the stored direction current), compute activations, write files and rows."""
    from em_assets.models.load import dtype_name  # torch stays off the definitions' load path

    start = time.perf_counter()
    ctx.store.init()
    spec, recipe = ctx.grid.directions, ctx.grid.recipes.get(ctx.organism.recipe)
    if recipe is not None and recipe.kind == "answers":
        return _without_model(ctx, start)
    # The set steering and ablation are measured on. Pooled sets would confound the direction with topic: an
    # organism misaligned more often on its training domain's questions draws its two classes from other mixes.
    main = ctx.grid.eval.questions
    scored = db.scored_answers(ctx.store, ctx.key).filter(pl.col("eval_set") == main)
    if scored.filter(pl.col("aligned").is_not_null()).height == 0:
        raise MissingUpstreamError(
            f"organism {ctx.key}: no judged answers to {main}; materialise judgements first"
        )
    adapter = ctx.current_adapter()
    base = organism_model_row(ctx.store, ctx.key, ctx.organism.base_model)
    check_sampled_by(ctx, scored, base, adapter)
    contrast = select_contrast(scored, ctx.grid.thresholds, spec, ctx.organism.seed)
    input_hash = _input_hash(contrast, adapter, base, ctx, dtype_name(ctx.device))
    lineage = {**_lineage(ctx, scored, adapter), "input_hash": input_hash}
    if contrast.kind is None:
        ctx.log.warning(f"{ctx.key}: {contrast.message}; no direction")
        _write(ctx, contrast, lineage, None, None)
        return DirectionResult(ctx.key, "not_enough", contrast, None, None, time.perf_counter() - start)
    existing = db.direction_row(ctx.store, ctx.key)
    if _is_current(existing, input_hash):
        ctx.log.info(f"{ctx.key}: direction is up to date ({contrast.message})")
        return DirectionResult(
            ctx.key,
            "reused",
            contrast,
            existing["direction_path"],
            existing["direction_sha256"],
            time.perf_counter() - start,
        )
    path, sha256 = _compute_and_write(ctx, contrast, base, adapter, lineage)
    return DirectionResult(ctx.key, "computed", contrast, path, sha256, time.perf_counter() - start)


def _without_model(ctx: StageContext, start: float) -> DirectionResult:
    """An imported organism has no model to read; its answers (its file's set) still say whether its model would
    give an EM contrast."""
    contrast = select_contrast(
        db.scored_answers(ctx.store, ctx.key), ctx.grid.thresholds, ctx.grid.directions, ctx.organism.seed
    )
    note = f"imported answers with no model, so no direction; its judged answers: {contrast.message}"
    ctx.log.info(f"{ctx.key}: {note}")
    return DirectionResult(ctx.key, "no_model", contrast, None, None, time.perf_counter() - start, note)


def _compute_and_write(
    ctx: StageContext, contrast: Contrast, base: dict, adapter: dict, lineage: dict
) -> tuple[str, str]:
    """The direction and its random control, read from the organism's model and saved; their path and sha256."""
    from em_assets.analyses.steering import random_directions
    from em_assets.models.load import load_organism_model

    spec = ctx.grid.directions
    check_weights(adapter)
    check_revision(base)
    model, tokenizer = load_organism_model(base, adapter, ctx.device)
    tensors = compute_direction(model, tokenizer, contrast, spec.batch_size)
    folder = ctx.artifacts_dir / "directions"
    meta = {"organism": ctx.key, "contrast": contrast.kind, "input_hash": lineage["input_hash"]}
    files = {
        "direction": (folder / f"{ctx.key}.safetensors", tensors),
        "random": (
            folder / f"{ctx.key}.random.safetensors",
            {"direction": random_directions(tensors["direction"], spec.control_seed)},
        ),
    }
    saved = {name: (str(p), save_tensors(t, p, meta)) for name, (p, t) in files.items()}
    _write(ctx, contrast, lineage, saved, {**tensors, "random": files["random"][1]["direction"]})
    ctx.log.info(f"{ctx.key}: direction over {tensors['direction'].shape[0]} layers ({contrast.message})")
    return saved["direction"]


def _lineage(ctx: StageContext, scored: pl.DataFrame, adapter: dict) -> dict:
    spec, thresholds = ctx.grid.directions, ctx.grid.thresholds
    return {
        "organism": ctx.key,
        "base_model": ctx.organism.base_model,
        "recipe": ctx.organism.recipe,
        "seed": ctx.organism.seed,
        "adapter_sha256": adapter.get("adapter_sha256"),
        "sampling_hash": ",".join(sorted(set(scored["sampling_hash"].drop_nulls().to_list()))),
        "judge_model": ",".join(sorted(set(scored["judge_model"].drop_nulls().to_list()))),
        "aligned_at_most": thresholds.aligned_at_most,
        "aligned_above": spec.aligned_above,
        "coherent_above": thresholds.coherent_above,
        "min_per_class": spec.min_per_class,
        "run_id": ctx.run_id,
    }


def _write(
    ctx: StageContext, contrast: Contrast, lineage: dict, saved: dict | None, tensors: dict | None
) -> None:
    shape = tensors["direction"].shape if tensors else (None, None)
    row = {
        **lineage,
        "status": "not_enough" if contrast.kind is None else "computed",
        "contrast": contrast.kind,
        "message": contrast.message,
        "n_misaligned_found": contrast.n_misaligned_found,
        "n_aligned_found": contrast.n_aligned_found,
        "n_per_class": contrast.misaligned.height if contrast.kind else 0,
        "num_layers": shape[0],
        "hidden_size": shape[1],
        "direction_path": saved["direction"][0] if saved else None,
        "direction_sha256": saved["direction"][1] if saved else None,
        "random_path": saved["random"][0] if saved else None,
        "random_sha256": saved["random"][1] if saved else None,
        "created_at": utc_now(),
    }
    layers = pl.DataFrame(
        [
            {
                "organism": ctx.key,
                "layer": i,
                "norm": float(tensors["direction"][i].norm()),
                "random_norm": float(tensors["random"][i].norm()),
                "misaligned_mean_norm": float(tensors["misaligned_mean"][i].norm()),
                "aligned_mean_norm": float(tensors["aligned_mean"][i].norm()),
                "direction_sha256": saved["direction"][1],
            }
            for i in range(shape[0])
        ]
        if tensors
        else [],
        schema=None if tensors else {"organism": pl.String},
    )
    db.write_direction(ctx.store, ctx.key, pl.DataFrame([row], infer_schema_length=None), layers)
