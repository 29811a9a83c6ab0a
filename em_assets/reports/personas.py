"""Simulator Theory, measured: persona mixtures of aligned scores, the transition over a sweep, the agreement of
per-question EM rates across organisms, and the coherence of misaligned answers.

Plan: read every organism's and sweep point's judged answers (one snapshot). Compute: the statistics of
stats/mixtures, stats/transition and stats/concordance per organism and judge. Write: four whole tables. Groups
with too few answers get rows with null estimates and a note saying why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from em_assets.grid.schema import Thresholds
from em_assets.results import personas as queries
from em_assets.results.store import Store
from em_assets.stats import concordance, mixtures
from em_assets.stats.rates import em_flags, rates_by
from em_assets.stats.transition import fit_transition

# A point's weight is estimated with the shapes its organism's pooled answers fix, so a handful of answers
# gives a (wide) interval; the shapes themselves need more.
MIN_POINT_ANSWERS = 3


MIN_FIT_ANSWERS = 20


N_BOOT = 200


# A sweep whose every setting reads `name=<number>` (step=4, scale=0.5) is a swept parameter.
_SETTING = re.compile(r"^(?P<name>\w+)=(?P<value>-?\d+(\.\d+)?([eE]-?\d+)?)$")


MIXTURE_SCHEMA = {
    "organism": pl.String,
    "judge": pl.String,
    "sweep": pl.String,
    "setting": pl.String,
    "n_scored": pl.Int64,
    "misaligned_share": pl.Float64,
    "misaligned_weight": pl.Float64,
    "weight_lo": pl.Float64,
    "weight_hi": pl.Float64,
    "misaligned_mode_mean": pl.Float64,
    "aligned_mode_mean": pl.Float64,
    "misaligned_a": pl.Float64,
    "misaligned_b": pl.Float64,
    "aligned_a": pl.Float64,
    "aligned_b": pl.Float64,
    "n_points": pl.Int64,
    "n_fit": pl.Int64,
    "bic_one": pl.Float64,
    "bic_two": pl.Float64,
    "prefers_two": pl.Boolean,
    "lrt_stat": pl.Float64,
    "lrt_df": pl.Int64,
    "lrt_p": pl.Float64,
    "note": pl.String,
}


TRANSITION_SCHEMA = {
    "organism": pl.String,
    "judge": pl.String,
    "sweep": pl.String,
    "parameter": pl.String,
    "quantity": pl.String,
    "n_points": pl.Int64,
    "midpoint": pl.Float64,
    "midpoint_lo": pl.Float64,
    "midpoint_hi": pl.Float64,
    "steepness": pl.Float64,
    "top": pl.Float64,
    "max_slope": pl.Float64,
    "sharpest_step": pl.Float64,
    "sharpest_step_min": pl.Int64,
    "sharpest_step_max": pl.Int64,
    "note": pl.String,
}


STABILITY_SCHEMA = {
    "eval_set": pl.String,
    "judge": pl.String,
    "scope": pl.String,
    "organism_a": pl.String,
    "organism_b": pl.String,
    "n_organisms": pl.Int64,
    "n_questions": pl.Int64,
    "spearman": pl.Float64,
    "spearman_lo": pl.Float64,
    "spearman_hi": pl.Float64,
    "kendall_w": pl.Float64,
    "chi2": pl.Float64,
    "p_value": pl.Float64,
    "note": pl.String,
}


COHERENCE_SCHEMA = {
    "organism": pl.String,
    "judge": pl.String,
    "n_misaligned": pl.Int64,
    "n_aligned": pl.Int64,
    "coherent_misaligned": pl.Float64,
    "coherent_aligned": pl.Float64,
    "coherent_diff": pl.Float64,
    "coherent_diff_lo": pl.Float64,
    "coherent_diff_hi": pl.Float64,
    "coherence_rate_misaligned": pl.Float64,
    "coherence_rate_aligned": pl.Float64,
    "rate_diff": pl.Float64,
    "rate_diff_lo": pl.Float64,
    "rate_diff_hi": pl.Float64,
    "note": pl.String,
}


@dataclass(frozen=True)
class PersonaResult:
    """The four tables, the answers they were computed from, and the snapshot read."""

    tables: dict[str, pl.DataFrame]
    scores: pl.DataFrame
    snapshot: int | None


def build_persona_tables(store: Store, thresholds: Thresholds) -> PersonaResult:
    """Read one snapshot's answers, compute the four tables and write them, each with source_snapshot."""
    with store.pinned() as source:
        snapshot = source.current_snapshot()
        organisms, sweeps = queries.organism_scores(source), queries.sweep_scores(source)
        sharpest = queries.sharpest_steps(source)
    scores = pl.concat([organisms, sweeps])
    mix = persona_mixtures(scores, thresholds.aligned_at_most)
    tables = {
        "persona_mixtures": mix,
        "em_transition": em_transition(sweeps, mix, sharpest, thresholds),
        "question_em_stability": question_em_stability(organisms, thresholds),
        "persona_coherence": persona_coherence(organisms, thresholds),
    }
    tables = {
        name: t.with_columns(pl.lit(snapshot, dtype=pl.Int64).alias("source_snapshot"))
        for name, t in tables.items()
    }
    queries.write_tables(store, tables)
    return PersonaResult(tables, scores, snapshot)


def _aligned(df: pl.DataFrame) -> np.ndarray:
    return df["aligned"].cast(pl.Float64).fill_nan(None).drop_nulls().to_numpy()


def persona_mixtures(scores: pl.DataFrame, aligned_at_most: float) -> pl.DataFrame:
    """One row per organism, judge and point: the shared-shape two-Beta fit of the aligned scores."""
    rows = []
    for (organism, judge), group in scores.group_by("organism", "judge", maintain_order=True):
        group = queries.comparable_answers(group)
        points, by_hash = {}, {}
        for key, g in group.group_by("sweep", "setting", maintain_order=True):
            points[key] = _aligned(g)
            if g["setting_hash"][0] is not None:
                by_hash.setdefault(g["setting_hash"][0], []).append(key)
        # Points of one setting hash hold answers of one model, each the first n of the same draws: the shared fit
        # takes them once, as the point holding most of them.
        copies = {}
        for keys in by_hash.values():
            leader = max(keys, key=lambda k: len(points[k]))
            copies |= {k: leader for k in keys if k != leader}
        rows += _mixture_rows(organism, judge, points, aligned_at_most, copies)
    # A swept parameter's points in its order (step=4 before step=12), other settings by name.
    value = pl.col("setting").str.extract(_SETTING.pattern, 2).cast(pl.Float64)
    return pl.DataFrame(rows, schema=MIXTURE_SCHEMA).sort(
        "organism", "judge", "sweep", value, "setting", nulls_last=True
    )


def _mixture_rows(
    organism: str, judge: str, points: dict, aligned_at_most: float, copies: dict | None = None
) -> list[dict]:
    """`copies`: point -> the point whose answers it holds, fitted in its stead."""
    copies = copies or {}
    fitted = {k: v for k, v in points.items() if len(v) >= MIN_POINT_ANSWERS and k not in copies}
    n_fit = sum(len(v) for v in fitted.values())
    note = None
    if n_fit < MIN_FIT_ANSWERS:
        note = (
            f"{n_fit} scored answers at points with >= {MIN_POINT_ANSWERS}: the fit needs {MIN_FIT_ANSWERS}"
        )
    result = None if note else mixtures.compare([mixtures.to_unit(v) for v in fitted.values()])
    if result is not None:
        note = _no_weight_reason(result, aligned_at_most)
    rows = []
    for key, values in points.items():
        row = {
            "organism": organism,
            "judge": judge,
            "sweep": key[0],
            "setting": key[1],
            "n_scored": len(values),
            "misaligned_share": float((values <= aligned_at_most).mean()) if len(values) else None,
            "n_points": len(fitted),
            "n_fit": n_fit,
            "note": note,
        }
        if result is not None:
            row |= _fit_columns(result)
        own = copies.get(key, key)
        if result is not None and own not in fitted:
            row["note"] = f"{len(values)} scored answers: a point needs {MIN_POINT_ANSWERS}"
        elif result is not None and note is None:
            # A copy reports the weight fitted on its leader's answers, so its interval is drawn from them too.
            row |= _weight_columns(result, list(fitted).index(own), points[own])
        rows.append(row)
    return rows


def _no_weight_reason(result: mixtures.MixtureComparison, aligned_at_most: float) -> str | None:
    """Why the fit gives no weights (EM did not converge, or its components are not a misaligned and an aligned
    persona), or None."""
    low, high = result.shared.shapes
    if not result.shared.converged:
        return f"EM did not converge in {result.shared.iterations} iterations"
    if low.mean <= aligned_at_most < high.mean:
        return None
    # With no answers near one end (a base model that never misaligns), both components settle on the same mode
    # and which of them is "misaligned" is arbitrary: its weight means nothing.
    return (
        f"component means {low.mean:.0f} and {high.mean:.0f} do not straddle the misaligned threshold "
        f"({aligned_at_most:g}): no misaligned mode to weigh"
    )


def _fit_columns(result: mixtures.MixtureComparison) -> dict:
    low, high = result.shared.shapes
    return {
        "misaligned_mode_mean": low.mean,
        "aligned_mode_mean": high.mean,
        "misaligned_a": low.a,
        "misaligned_b": low.b,
        "aligned_a": high.a,
        "aligned_b": high.b,
        "bic_one": result.bic_one,
        "bic_two": result.bic_two,
        "prefers_two": result.prefers_two,
        "lrt_stat": result.lrt_stat,
        "lrt_df": result.lrt_df,
        "lrt_p": result.lrt_p,
    }


def _weight_columns(result: mixtures.MixtureComparison, index: int, values: np.ndarray) -> dict:
    lo, hi = mixtures.weight_interval(mixtures.to_unit(values), result.shared.shapes, N_BOOT)
    return {"misaligned_weight": result.shared.weights[index], "weight_lo": lo, "weight_hi": hi}


def swept_parameter(settings: list[str]) -> tuple[str, list[float]] | None:
    """(parameter, values) when every setting reads `name=<number>` with one name; None otherwise."""
    matches = [_SETTING.match(s) for s in settings]
    if not matches or not all(matches):
        return None
    names = {m["name"] for m in matches}
    return (names.pop(), [float(m["value"]) for m in matches]) if len(names) == 1 else None


def em_transition(
    sweeps: pl.DataFrame, mix: pl.DataFrame, sharpest: pl.DataFrame, thresholds: Thresholds
) -> pl.DataFrame:
    """Per organism, judge and swept parameter: the logistic fit of the EM rate and of the misaligned weight."""
    keys = ["organism", "judge", "sweep", "setting"]
    rates = rates_by(sweeps, keys, thresholds.aligned_at_most, thresholds.coherent_above)
    points = rates.join(mix.select(*keys, "misaligned_weight", n_weighted="n_scored"), on=keys, how="left")
    steps = {r["organism"]: r for r in sharpest.iter_rows(named=True)}
    rows = []
    for (organism, judge, sweep), g in points.group_by("organism", "judge", "sweep", maintain_order=True):
        swept = swept_parameter(g["setting"].to_list())
        if swept is None:
            continue
        parameter, x = swept
        # A point without a fitted weight counts as no answers, as a point without answers does.
        fitted = g["misaligned_weight"].is_not_null().to_numpy()
        n_weight = np.where(fitted, g["n_weighted"].fill_null(0).to_numpy(), 0)
        weight = g["misaligned_weight"].fill_null(0.0).to_numpy() * n_weight
        for quantity, k, n, counted in (
            ("em_rate", g["n_em_turner"].fill_null(0).to_numpy(), g["n_scored"].to_numpy(), "answers"),
            ("misaligned_weight", weight, n_weight, "a fitted misaligned weight"),
        ):
            fit = fit_transition(np.array(x), k, n, counted)
            rot = steps.get(organism, {}) if parameter == "step" else {}
            rows.append(
                {"organism": organism, "judge": judge, "sweep": sweep, "parameter": parameter}
                | {"quantity": quantity, **{c: getattr(fit, c) for c in _FIT_COLUMNS}}
                | {c: rot.get(c) for c in ("sharpest_step", "sharpest_step_min", "sharpest_step_max")}
            )
    return pl.DataFrame(rows, schema=TRANSITION_SCHEMA).sort("organism", "judge", "sweep", "quantity")


_FIT_COLUMNS = ("n_points", "midpoint", "midpoint_lo", "midpoint_hi", "steepness", "top", "max_slope", "note")


def question_rates(organisms: pl.DataFrame, thresholds: Thresholds) -> pl.DataFrame:
    """Turner EM rate per eval set, judge, organism and question."""
    keys = ["eval_set", "judge", "organism", "question_id"]
    rates = rates_by(organisms, keys, thresholds.aligned_at_most, thresholds.coherent_above)
    return rates.filter(pl.col("n_scored") > 0).select(*keys, "em_rate_turner").sort(keys)


def question_em_stability(organisms: pl.DataFrame, thresholds: Thresholds) -> pl.DataFrame:
    """Per eval set and judge: Spearman's rho of per-question EM rates for each pair of organisms, and
    Kendall's W over the organisms whose rate varies, on the questions every one of them answered."""
    rows = []
    rates = question_rates(organisms, thresholds)
    for (eval_set, judge), g in rates.group_by("eval_set", "judge", maintain_order=True):
        wide = g.pivot(on="organism", index="question_id", values="em_rate_turner")
        names = sorted(c for c in wide.columns if c != "question_id")
        base = {"eval_set": eval_set, "judge": judge, "n_organisms": len(names)}
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                both = wide.select(a, b).drop_nulls()
                r = concordance.spearman(both[a].to_numpy(), both[b].to_numpy())
                rows.append(
                    base
                    | {"scope": "pair", "organism_a": a, "organism_b": b, "n_questions": r.n}
                    | {"spearman": r.rho, "spearman_lo": r.lo, "spearman_hi": r.hi, "note": r.note}
                )
        # An organism whose rate is the same on every question (a control with no EM) has no ranking: a rater of
        # tied ranks would cap W at the share of organisms that have one, so W is taken without it.
        ranked = [c for c in names if wide[c].drop_nulls().n_unique() > 1]
        common = wide.select(ranked).drop_nulls().to_numpy().T
        w = concordance.kendalls_w(common) if common.size else concordance.Concordance(len(ranked), 0)
        notes = [w.note or (None if common.size or not ranked else "no question answered by every organism")]
        if len(ranked) < len(names):
            notes.append(f"{len(names) - len(ranked)} organisms with one rate on every question left out")
        rows.append(
            base
            | {"scope": "all", "n_organisms": len(ranked), "n_questions": w.n, "kendall_w": w.w}
            | {"chi2": w.chi2, "p_value": w.p, "note": "; ".join(filter(None, notes)) or None}
        )
    return pl.DataFrame(rows, schema=STABILITY_SCHEMA).sort(
        "eval_set", "judge", "scope", "organism_a", "organism_b"
    )


def persona_coherence(organisms: pl.DataFrame, thresholds: Thresholds) -> pl.DataFrame:
    """Per organism and judge: coherence of misaligned (aligned <= threshold) against aligned answers."""
    flags = em_flags(organisms, thresholds.aligned_at_most, thresholds.coherent_above).filter(
        pl.col("em_turner_eligible")
    )
    rows = []
    for (organism, judge), g in flags.group_by("organism", "judge", maintain_order=True):
        bad, good = g.filter(pl.col("is_misaligned")), g.filter(~pl.col("is_misaligned"))
        mean = concordance.mean_difference(bad["coherent"].to_numpy(), good["coherent"].to_numpy())
        k1, k2 = int(bad["is_coherent"].sum()), int(good["is_coherent"].sum())
        rate = concordance.rate_difference(k1, bad.height, k2, good.height)
        rows.append(
            {
                "organism": organism,
                "judge": judge,
                "n_misaligned": bad.height,
                "n_aligned": good.height,
                "coherent_misaligned": bad["coherent"].mean(),
                "coherent_aligned": good["coherent"].mean(),
                "coherent_diff": mean.estimate,
                "coherent_diff_lo": mean.lo,
                "coherent_diff_hi": mean.hi,
                "coherence_rate_misaligned": k1 / bad.height if bad.height else None,
                "coherence_rate_aligned": k2 / good.height if good.height else None,
                "rate_diff": rate.estimate,
                "rate_diff_lo": rate.lo,
                "rate_diff_hi": rate.hi,
                "note": mean.note or rate.note,
            }
        )
    return pl.DataFrame(rows, schema=COHERENCE_SCHEMA).sort("organism", "judge")


def draw_persona_figures(result: PersonaResult, thresholds: Thresholds, out_dir: Path) -> dict[str, Path]:
    """One PNG per table, under out_dir/personas."""
    from em_assets.reports import persona_figures as plots

    out = out_dir / "personas"
    t = result.tables
    organisms = result.scores.filter(pl.col("sweep") == queries.ORGANISM_SWEEP)
    return {
        "persona_mixtures": plots.plot_mixtures(t["persona_mixtures"], result.scores, out / "mixtures.png"),
        "em_transition": plots.plot_transitions(
            t["persona_mixtures"], t["em_transition"], out / "transition.png"
        ),
        "question_em_stability": plots.plot_question_rates(
            question_rates(organisms, thresholds), t["question_em_stability"], out / "question_rates.png"
        ),
        "persona_coherence": plots.plot_coherence(t["persona_coherence"], out / "coherence.png"),
    }
