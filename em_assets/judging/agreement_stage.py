"""Judge agreement stage: score reference answers with a judge (through the shared judge cache) and compare
its scores with the reference's: per-metric statistics and the EM rate per source file under both."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from em_assets.catalog.parsing import parse_questions_yaml, prompt_hash
from em_assets.catalog.upstream import SOURCES, fetch_bytes
from em_assets.grid.load import GridError
from em_assets.grid.schema import GridConfig, JudgeSpec
from em_assets.judging import distill
from em_assets.judging.agreement import (
    CoherentCheck,
    MetricAgreement,
    coherent_check,
    metric_agreement,
    with_interval,
)
from em_assets.judging.error_rates import ErrorRateLookup, em_error_rates, error_rates_row
from em_assets.judging.incoherent import read_ratings
from em_assets.judging.judges import (
    fixed_score,
    judge_identity,
    make_judge,
    prompt_hash_for,
    render_prompt,
)
from em_assets.judging.stage import judge_cache_key, refusal_named, score_chunks, warn_refused
from em_assets.judging.validation import split_reference
from em_assets.results import judge_queries as q
from em_assets.results.errors import MissingUpstreamError
from em_assets.results.store import Store, utc_now
from em_assets.stats.correction import ErrorRates, corrected_rate
from em_assets.stats.rates import em_summary

log = logging.getLogger(__name__)


AGREEMENT_METRICS = ("aligned", "coherent")
# The source_file of the held-out hand-rated answers scored for the incoherence check.
HAND_RATED = "hand-rated (held out)"


@dataclass(frozen=True)
class AgreementReport:
    """One judge scored on reference answers: per-metric agreement, EM rates per source file, the pairs."""

    judge: str
    model: str
    revision: str
    metrics: tuple[MetricAgreement, ...]
    em: pl.DataFrame
    scores: pl.DataFrame
    seconds: float
    # EM sensitivity and specificity on all the answers scored; None where a class is absent.
    error_rates: ErrorRates | None = None
    # Where the per-file corrected rates took their error rates from.
    corrected_with: str = ""

    def as_json(self) -> dict:
        # The judge measured, as the table's first line names it: the JSON is often kept apart from the command.
        out: dict = {"judge": {"name": self.judge, "model": self.model, "revision": self.revision}}
        out |= {m.metric: m.as_dict() for m in self.metrics}
        out["em_rate"] = [
            {
                "file": r["source_file"],
                "n": r["n"],
                "reference": r["reference"],
                "reference_lo": r["reference_lo"],
                "reference_hi": r["reference_hi"],
                "judge": r["judge_rate"],
                "judge_lo": r["judge_lo"],
                "judge_hi": r["judge_hi"],
                "judge_corrected": r["judge_corrected"],
                "judge_corrected_lo": r["judge_corrected_lo"],
                "judge_corrected_hi": r["judge_corrected_hi"],
                "coherence_rate": {"reference": r["reference_coherence"], "judge": r["judge_coherence"]},
            }
            for r in self.em.iter_rows(named=True)
        ]
        e = self.error_rates
        ranges = e.new_file_ranges() if e else {"sensitivity": None, "specificity": None}
        out["em_error"] = {
            "sensitivity": e.sensitivity if e else None,
            "specificity": e.specificity if e else None,
            "n_pos": e.n_pos if e else None,
            "n_neg": e.n_neg if e else None,
            "n_files": e.n_files if e else None,
            # Where 95% of new files' rates lie (null with fewer than two files).
            **{f"{rate}_new_file": r and list(r) for rate, r in ranges.items()},
            "corrected_with": self.corrected_with,
        }
        return out


def upstream_templates(grid: GridConfig, mirror=None, cache_dir: Path | None = None) -> dict:
    """{(question_id, metric): (template, prompt hash)} of the grid's eval questions file, plus a
    (None, metric) fallback for questions it does not have (upstream's aligned/coherent prompts are shared)."""
    src = SOURCES[grid.eval.questions]
    out: dict = {}
    for item in parse_questions_yaml(fetch_bytes(src, mirror, cache_dir), src.path):
        for metric, text in item.judge_prompts.items():
            out.setdefault((item.question_id, metric), (text, prompt_hash(text)))
            out.setdefault((None, metric), (text, prompt_hash(text)))
    return out


def _template(templates: dict, question_id: str, metric: str) -> tuple[str, str]:
    found = templates.get((question_id, metric)) or templates.get((None, metric))
    if found is None:
        raise MissingUpstreamError(f"no {metric!r} judge prompt in the eval questions file")
    return found


def _items(
    rows: pl.DataFrame, spec: JudgeSpec, identity: tuple, templates: dict, metrics: Sequence[str]
) -> list[dict]:
    model, revision, _ = identity
    items = []
    # An empty answer (null or "") is judged as the empty text it is, never as the word "None".
    for r in rows.with_columns(pl.col("answer").fill_null("")).iter_rows(named=True):
        for metric in metrics:
            template, template_hash = _template(templates, r["question_id"], metric)
            prompt = prompt_hash_for(spec, template_hash, metric)
            key = judge_cache_key(model, revision, prompt, metric, r["question"], r["answer"])
            items.append({"row": r, "metric": metric, "template": template, "cache_key": key})
    return items


def _score_missing(store: Store, judge, todo: list[dict], chunk: int, cached: int) -> None:
    """Score what the judge cache lacks (`cached` judgements it already holds), writing each chunk to the cache as
    it finishes (a rerun resumes)."""
    texts = [
        render_prompt(judge, it["template"], it["metric"], it["row"]["question"], it["row"]["answer"])
        for it in todo
    ]
    keys = [it["cache_key"] for it in todo]
    fixed = [fixed_score(it["metric"], it["row"]["answer"]) for it in todo]
    done = 0

    def name(i: int) -> str:
        return f"{todo[i]['row']['source_file']} row {todo[i]['row']['row_idx']}, {todo[i]['metric']}"

    with refusal_named(texts, name):
        for indices, scores in score_chunks(judge, store, texts, keys, chunk, fixed):
            done += len(scores)
            warn_refused(log, indices, scores, name)
            log.info(
                "judge agreement: scored %d/%d judgements (%d more in the judge cache)",
                done,
                len(todo),
                cached,
            )


def score_reference(
    store: Store,
    grid: GridConfig,
    spec: JudgeSpec,
    rows: pl.DataFrame,
    templates: dict,
    *,
    cache_dir: Path | None = None,
    device: str | None = None,
    chunk: int = 64,
    metrics: Sequence[str] = AGREEMENT_METRICS,
) -> tuple[pl.DataFrame, tuple[str, str, str | None]]:
    """The judge's score for every row and metric (through the shared judge cache) beside the reference's."""
    identity = judge_identity(grid, cache_dir, store, spec, device)
    items = _items(rows, spec, identity, templates, metrics)
    cache = q.cached_scores(store, [it["cache_key"] for it in items])
    todo = [it for it in items if it["cache_key"] not in cache]
    if todo:
        _score_missing(
            store, make_judge(grid, identity[2], device, spec), todo, chunk, len(items) - len(todo)
        )
        cache = q.cached_scores(store, [it["cache_key"] for it in items])
    # A prompt the judge's server refused (judge.refusals: unscored) has no cached score: it stays unscored.
    unscored = {"score": None, "mass": 0.0}
    scores = pl.DataFrame(
        [
            {
                "source_file": it["row"]["source_file"],
                "source_organism": it["row"]["source_organism"],
                "base_model": it["row"]["base_model"],
                "dataset": it["row"]["dataset"],
                "seed": it["row"]["seed"],
                "row_idx": it["row"]["row_idx"],
                "question_id": it["row"]["question_id"],
                "metric": it["metric"],
                "reference": it["row"][it["metric"]],
                "score": cache.get(it["cache_key"], unscored)["score"],
                "mass": cache.get(it["cache_key"], unscored)["mass"],
            }
            for it in items
        ],
        infer_schema_length=None,
    )
    return scores, identity


def _wide(scores: pl.DataFrame, column: str) -> pl.DataFrame:
    """One row per answer with aligned and coherent from `column`, shaped for reports.metrics."""
    keys = ["source_file", "source_organism", "base_model", "dataset", "seed", "row_idx", "question_id"]
    wide = scores.pivot("metric", index=keys, values=column)
    return wide.with_columns(
        organism=pl.col("source_file"), recipe=pl.col("dataset"), seed=pl.col("seed").fill_null(0)
    )


def em_agreement(scores: pl.DataFrame, grid: GridConfig) -> pl.DataFrame:
    """Per source file: Turner EM rate with Wilson bounds and the coherence rate under the reference's scores
    and the judge's, both over the answers the reference scored."""
    kw = {
        "aligned_at_most": grid.thresholds.aligned_at_most,
        "coherent_above": grid.thresholds.coherent_above,
    }
    cols = ["organism", "n_answers", "n_scored", "em_rate_turner", "em_turner_lo", "em_turner_hi"]
    ref = em_summary(_wide(scores, "reference"), **kw).select(*cols, "coherence_rate")
    # The judge's rates over the answers the reference scored: one it scored CODE or REFUSAL (no number) is out
    # of the reference's rates, so it is out of the judge's too.
    scored = pl.col("reference").is_not_null() & pl.col("reference").is_not_nan()
    paired = scores.with_columns(score=pl.when(scored).then(pl.col("score")))
    got = em_summary(_wide(paired, "score"), **kw).select(*cols, "n_em_turner", "coherence_rate")
    names = scores.select("source_file", "source_organism").unique()
    return (
        ref.rename(
            {
                "n_scored": "n_reference",
                "em_rate_turner": "reference",
                "em_turner_lo": "reference_lo",
                "em_turner_hi": "reference_hi",
                "n_answers": "n",
                "coherence_rate": "reference_coherence",
            }
        )
        .join(
            got.drop("n_answers").rename(
                {
                    "n_scored": "n_judge",
                    "em_rate_turner": "judge_rate",
                    "em_turner_lo": "judge_lo",
                    "em_turner_hi": "judge_hi",
                    "coherence_rate": "judge_coherence",
                }
            ),
            on="organism",
        )
        .join(names, left_on="organism", right_on="source_file")
        .rename({"organism": "source_file"})
        .sort("source_file")
    )


def corrected_per_file(
    em: pl.DataFrame, scores: pl.DataFrame, grid: GridConfig, rates: Mapping[str, ErrorRates | None] | None
) -> pl.DataFrame:
    """The judge's EM rate per file corrected for its error: with each file's `rates` where given (measured
    elsewhere), else with the rates measured on the other files (a file's own answers would return its
    reference rate by construction)."""
    out = []
    for r in em.iter_rows(named=True):
        if rates is not None:
            own = rates[r["source_file"]]
        else:
            own = em_error_rates(scores.filter(pl.col("source_file") != r["source_file"]), grid.thresholds)
        out.append(corrected_rate(r["n_em_turner"] or 0, r["n_judge"] or 0, own))
    return em.with_columns(
        pl.Series("judge_corrected", [x[0] for x in out], pl.Float64),
        pl.Series("judge_corrected_lo", [x[1] for x in out], pl.Float64),
        pl.Series("judge_corrected_hi", [x[2] for x in out], pl.Float64),
    ).drop("n_em_turner")


def agreement_report(
    name: str,
    scores: pl.DataFrame,
    identity: tuple,
    grid: GridConfig,
    seconds: float,
    rates: Mapping[str, ErrorRates | None] | None = None,
) -> AgreementReport:
    """Per-metric agreement, per-file EM rates (corrected with each file's `rates`, else leaving each file out),
    and the judge's EM error rates on all the answers."""
    kw = {
        "aligned_at_most": grid.thresholds.aligned_at_most,
        "coherent_above": grid.thresholds.coherent_above,
    }
    metrics = tuple(
        metric_agreement(m, part["reference"].to_list(), part["score"].to_list(), **kw)
        for m in AGREEMENT_METRICS
        for part in [scores.filter(pl.col("metric") == m)]
    )
    em = corrected_per_file(em_agreement(scores, grid), scores, grid, rates)
    corrected_with = (
        "the other files' answers (each file left out of its own error rates)"
        if rates is None
        else "none needed: the judge is the reference"
        if all(r is not None and r.exact for r in rates.values())
        else "the error rates judge_agreement measured on held-out reference answers (for a file among "
        "those, on the other files' answers)"
    )
    return AgreementReport(
        name,
        identity[0],
        identity[1],
        metrics,
        em,
        scores,
        seconds,
        em_error_rates(scores, grid.thresholds),
        corrected_with,
    )


# A file whose corrected interval (each file's own row of the per-file EM table) holds the reference's rate.
_COVERED = pl.col("reference").is_between(pl.col("judge_corrected_lo"), pl.col("judge_corrected_hi"))


def correction_coverage(em: pl.DataFrame) -> str:
    """How often each file's corrected interval (the other files' error rates) covers the reference's rate,
    beside the mean gap of the judged and the corrected rates: whether the correction helps this judge."""
    rows = em.drop_nulls(["reference", "judge_corrected"])
    if rows.height == 0:
        return "no file has a corrected rate (its other files lack reference-EM or non-EM answers)"
    covered = rows.filter(_COVERED)
    judged = (rows["judge_rate"] - rows["reference"]).abs().mean()
    corrected = (rows["judge_corrected"] - rows["reference"]).abs().mean()
    return (
        f"the corrected interval covers the reference rate on {covered.height} of {rows.height} files; "
        f"mean gap to the reference {judged:.3f} judged, {corrected:.3f} corrected"
    )


@dataclass(frozen=True)
class EmGaps:
    """Per-file EM rates against the reference's by the judge's acceptance rule: a file passes when the judged
    rate is within the tolerance of the reference's, or the corrected interval covers the reference's rate."""

    tolerance: float
    max_gap: float
    beyond: int
    # The files beyond the tolerance whose corrected interval misses the reference's rate too.
    failing: tuple[str, ...]

    def words(self) -> str:
        if math.isnan(self.max_gap):
            return "no file has both EM rates"
        covered = ", each covered by its corrected interval" if self.beyond and not self.failing else ""
        missed = f"; beyond it and not covered: {', '.join(self.failing)}" if self.failing else ""
        return (
            f"largest EM gap to the reference {self.max_gap:.3f}; {self.beyond} file(s) beyond {self.tolerance}"
            f"{covered}{missed}"
        )


def em_gaps(em: pl.DataFrame, tolerance: float) -> EmGaps:
    """EmGaps over the files with both rates (max_gap NaN where there is none)."""
    rows = em.drop_nulls(["reference", "judge_rate"]).with_columns(
        gap=(pl.col("judge_rate") - pl.col("reference")).abs()
    )
    # Rates are ratios of counts, whose float differences miss the tolerance by a rounding error (12/60 - 9/60 is
    # 0.05000000000000002): a gap of exactly the tolerance is within it.
    beyond = rows.filter(pl.col("gap") > tolerance + 1e-9)
    failing = beyond.filter(~_COVERED.fill_null(False))["source_file"].to_list()
    max_gap = float(rows["gap"].max()) if rows.height else float("nan")
    return EmGaps(tolerance, max_gap, beyond.height, tuple(failing))


def _coherent_check(scores: pl.DataFrame, grid: GridConfig, where: str) -> CoherentCheck:
    """The judge's coherent AUC on scored answers (`where`), judged only if enough of them are incoherent."""
    part = scores.filter(pl.col("metric") == "coherent").drop_nulls(["reference", "score"])
    t, spec = grid.thresholds, grid.agreement
    found = metric_agreement(
        "coherent",
        part["reference"].to_list(),
        part["score"].to_list(),
        aligned_at_most=t.aligned_at_most,
        coherent_above=t.coherent_above,
    )
    n_incoherent = int((part["reference"] <= t.coherent_above).sum())
    interval = (found.auc_lo, found.auc_hi)
    return coherent_check(
        found.auc,
        n_incoherent,
        spec.min_incoherent,
        spec.min_coherent_auc,
        where,
        interval,
        n_coherent=part.height - n_incoherent,
    )


def coherent_on_incoherent(report: AgreementReport, grid: GridConfig) -> CoherentCheck:
    """The judge's coherent AUC on the scored reference answers, if they hold enough incoherent ones."""
    return _coherent_check(report.scores, grid, "the held-out reference answers")


def hand_rated_rows(grid: GridConfig) -> pl.DataFrame | None:
    """The held-out half of the probe's hand-rated answers (the demo's model's own text, never fitted on) as
    reference rows with the hand rating as `coherent`; None where the grid has no hand ratings."""
    path = grid.probe.hand_ratings if grid.probe is not None else None
    if not path:
        return None
    return (
        read_ratings(path, split="heldout")
        .with_row_index("row_idx")
        .with_columns(
            source_file=pl.lit(HAND_RATED),
            source_organism=pl.lit(HAND_RATED),
            base_model=pl.lit(None, pl.String),
            dataset=pl.lit(""),
            seed=pl.lit(None, pl.Int64),
            question_id=pl.lit(None, pl.String),
        )
    )


def coherent_on_hand_rated(
    store: Store,
    grid: GridConfig,
    templates: dict,
    *,
    cache_dir: Path | None = None,
    device: str | None = None,
) -> CoherentCheck | None:
    """The grid judge's coherent AUC on the held-out hand-rated answers (incoherent: rated at most the
    coherent threshold by hand); None where the grid has none."""
    rows = hand_rated_rows(grid)
    if rows is None:
        return None
    # Hand ratings are of coherence only: no aligned score is asked of the judge.
    scores, _ = score_reference(
        store, grid, grid.judge, rows, templates, cache_dir=cache_dir, device=device, metrics=("coherent",)
    )
    return _coherent_check(scores, grid, "the held-out hand-rated answers")


def judge_name(spec: JudgeSpec) -> str:
    return spec.backend if spec.backend in ("distilled", "probe") else f"{spec.backend}:{spec.model}"


def pick_judge(grid: GridConfig, name: str | None) -> JudgeSpec:
    """The grid's judge (None), a grid judge by judge_name, `distilled`, `probe`, or `local:<model source>`."""
    if name is None:
        return grid.judge
    for spec in [grid.judge, *grid.agreement.compare]:
        if judge_name(spec) == name:
            return spec
    if name == "distilled" and grid.distill is not None:
        return JudgeSpec(backend="distilled", model="distilled", min_mass=grid.judge.min_mass)
    if name == "probe" and grid.probe is not None:
        return JudgeSpec(backend="probe", model="probe", metrics=grid.probe.metrics)
    if name.startswith("local:"):
        from em_assets.grid.sources import check_source
        from em_assets.models.hub import EMBEDDED

        # Checked here, before anything is written: a missing local directory is bad input.
        check_source(name.removeprefix("local:"), sorted(EMBEDDED))
        return JudgeSpec(backend="local", model=name.removeprefix("local:"), min_mass=grid.judge.min_mass)
    known = sorted({judge_name(s) for s in [grid.judge, *grid.agreement.compare]} | {"local:<source>"})
    raise GridError(f"no judge named {name!r}; known: {', '.join(known)}")


def measure_agreement(
    store: Store,
    grid: GridConfig,
    spec: JudgeSpec,
    rows: pl.DataFrame,
    templates: dict,
    *,
    cache_dir: Path | None = None,
    device: str | None = None,
    lookup: ErrorRateLookup | None = None,
) -> AgreementReport:
    """Score `rows` with one judge and compare it with the reference; per-file EM rates are corrected with the
    error rates `lookup` knows for the judge, else with those of the other files."""
    start = time.perf_counter()
    scores, identity = score_reference(store, grid, spec, rows, templates, cache_dir=cache_dir, device=device)
    rates = None
    if lookup is not None and lookup(identity[0], identity[1]) is not None:
        files = rows.select("source_file", "source_sha256").unique().iter_rows()
        rates = {f: lookup(identity[0], identity[1], sha) for f, sha in files}
    return agreement_report(judge_name(spec), scores, identity, grid, time.perf_counter() - start, rates)


def _fitted_on(store: Store, grid: GridConfig, spec: JudgeSpec) -> pl.DataFrame | None:
    """The (question, answer) pairs a probe or distilled judge is fitted on; None for another judge, or before
    reference answers are loaded."""
    fitted_by = {"probe": grid.probe, "distilled": grid.distill}.get(spec.backend)
    if fitted_by is None or not q.has_rows(store, "reference_judgements"):
        return None
    return (
        distill.train_answers(split_reference(store, grid), fitted_by).select("question", "answer").unique()
    )


def fitted_answers(store: Store, grid: GridConfig, spec: JudgeSpec, rows: pl.DataFrame) -> int:
    """How many of `rows`' answers (to the same question) a probe or distilled judge is fitted on: their
    agreement with the reference is not a held-out figure."""
    train = _fitted_on(store, grid, spec)
    return 0 if train is None else rows.join(train, on=["question", "answer"], how="semi").height


def fitted_answer_organisms(store: Store, grid: GridConfig) -> pl.DataFrame | None:
    """Organisms with answers the grid's probe or distilled judge is fitted on (an imported reference file of a
    train base model), with how many of their answers it was; None where the grid's judge is fitted on none."""
    train = _fitted_on(store, grid, grid.judge)
    if train is None:
        return None
    answers = store.query("SELECT organism, question, answer FROM completions_latest")
    fitted = answers.join(train, on=["question", "answer"], how="semi")
    totals = answers.group_by("organism").agg(n_answers=pl.len())
    return (
        fitted.group_by("organism")
        .agg(n_fitted=pl.len())
        .join(totals, on="organism")
        .select("organism", "n_answers", "n_fitted")
        .sort("organism")
    )


def write_report(store: Store, grid: GridConfig, report: AgreementReport, run_id: str) -> None:
    now = utc_now()
    metrics = pl.DataFrame(
        [
            {
                "judge": report.judge,
                "judge_model": report.model,
                "judge_revision": report.revision,
                "metric": m.metric,
                **m.as_dict(),
                "seconds": report.seconds,
                "run_id": run_id,
                "created_at": now,
            }
            for m in report.metrics
        ],
        infer_schema_length=None,
    )
    em = report.em.with_columns(judge=pl.lit(report.judge), run_id=pl.lit(run_id))
    scores = report.scores.select(
        "source_file", "row_idx", "metric", "reference", "score", "mass"
    ).with_columns(judge=pl.lit(report.judge), run_id=pl.lit(run_id))
    identity = (report.model, report.revision)
    errors = error_rates_row(report.judge, identity, report.error_rates, grid.thresholds, run_id)
    q.write_agreement(store, report.judge, (metrics, em, scores), *errors)


@dataclass(frozen=True)
class AgreementRun:
    """Every judge's report on the held-out reference split (the grid's judge first), and the grid judge's
    coherent AUC on the held-out hand-rated answers (None without hand ratings)."""

    reports: tuple[AgreementReport, ...]
    hand_rated: CoherentCheck | None


def judge_agreement(
    store: Store,
    grid: GridConfig,
    run_id: str,
    *,
    mirror=None,
    cache_dir: Path | None = None,
    device: str | None = None,
) -> AgreementRun:
    """The grid's judge and its comparison judges on the held-out reference split, written to DuckDB, and the
    grid judge on the held-out hand-rated answers."""
    rows = distill.heldout_answers(split_reference(store, grid), grid.agreement.max_answers_per_file)
    templates = upstream_templates(grid, mirror, cache_dir)
    reports = []
    for spec in [grid.judge, *grid.agreement.compare]:
        report = measure_agreement(store, grid, spec, rows, templates, cache_dir=cache_dir, device=device)
        write_report(store, grid, report, run_id)
        reports.append(report)
    hand = coherent_on_hand_rated(store, grid, templates, cache_dir=cache_dir, device=device)
    return AgreementRun(tuple(reports), hand)


def judge_caveat(store: Store, grid: GridConfig, summary: pl.DataFrame | None = None) -> str:
    """One paragraph for the EM tables: which judge scored them and how far it agrees with GPT-4o; with the
    `summary` they describe, the organisms whose rows another judge (or revision) scored than the one measured."""
    name = judge_name(grid.judge)
    rows = {r["metric"]: r for r in q.agreement_rows(store, name).iter_rows(named=True)}
    if "aligned" not in rows:
        return f"Scored by the {name} judge, not yet measured against GPT-4o (materialise judge_agreement)."
    a = rows["aligned"]
    held_out = ", ".join(grid.agreement.held_out_base_models)
    questions = q.heldout_question_count(store)
    asked = f" to {questions} questions," if questions else ""
    text = (
        f"Scored by the {name} judge. On {a['n']} GPT-4o-judged answers{asked} of base models it never trained on "
        f"({held_out}): aligned Spearman {_shown(a, 'spearman')}, AUC for misaligned {_shown(a, 'auc')}, "
        f"largest per-organism EM-rate gap {_shown(a, 'gap')}. These EM rates are that judge's estimates, not "
        "GPT-4o's."
    )
    others = _scored_by_other_judges(summary, a["judge_model"], a["judge_revision"])
    if others:
        text += (
            f" Not so for {', '.join(others)}: another judge or revision than the one measured scored their rows "
            "(materialise their judgements, or judge_agreement where it measured an older judge)."
        )
    return text


def _scored_by_other_judges(
    summary: pl.DataFrame | None, model: str | None, revision: str | None
) -> list[str]:
    """Organisms of `summary` whose grid-judged rows carry another judge identity than (model, revision)."""
    # An agreement row written before judges were recorded names none to compare with.
    if summary is None or summary.height == 0 or model is None:
        return []
    other = summary.filter(
        (pl.col("judge_source") == "grid")
        & ((pl.col("judge_model") != model) | (pl.col("judge_revision") != revision))
    )
    return sorted(set(other["organism"]))


def _shown(row: dict, name: str) -> str:
    """A statistic of an agreement row, with its interval where the row has one; n/a where undefined."""
    if row[name] is None:
        return "n/a"
    return with_interval(row[name], row.get(f"{name}_lo"), row.get(f"{name}_hi"))
