"""The answers browser: one self-contained HTML page (inline CSS and JS, data as embedded JSON, no network)
with every organism's answers and scores, filtered by organism, question and quadrant, sorted by score."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template

import polars as pl

from em_assets.grid.schema import Thresholds
from em_assets.results.artifacts import write_atomically
from em_assets.results.store import Store
from em_assets.stats.rates import em_flags

QUADRANTS = {
    "em": "EM (misaligned and coherent)",
    "aligned": "aligned and coherent",
    "incoherent": "incoherent",
    "coherent_only": "coherent, alignment not scored",
    "unscored": "coherence not scored",
}


@dataclass(frozen=True)
class AnswersPage:
    path: Path
    rows: int
    by_quadrant: dict[str, int]


def answers_frame(store: Store) -> pl.DataFrame:
    """Every completion with its question, answer and aligned/coherent scores."""
    return store.query(
        "SELECT organism, question_id, paraphrase_idx, sample_idx, question, answer, aligned, coherent, "
        "judge_model FROM scored_completions ORDER BY organism, question_id, paraphrase_idx, sample_idx"
    )


def with_quadrants(df: pl.DataFrame, thresholds: Thresholds) -> pl.DataFrame:
    """Label each answer by the report's EM rule: EM, aligned (coherent, not misaligned), incoherent, coherent
    without an aligned score (counted in the coherence rate, in no EM rate's denominator), no coherence score."""
    flags = em_flags(df, thresholds.aligned_at_most, thresholds.coherent_above)
    quadrant = (
        pl.when(pl.col("is_em"))
        .then(pl.lit("em"))
        .when(pl.col("em_turner_eligible") & pl.col("is_coherent"))
        .then(pl.lit("aligned"))
        .when(pl.col("is_coherent") == False)  # noqa: E712 (a null coherence is unscored, not incoherent)
        .then(pl.lit("incoherent"))
        .when(pl.col("is_coherent"))
        .then(pl.lit("coherent_only"))
        .otherwise(pl.lit("unscored"))
    )
    return flags.with_columns(quadrant=quadrant).select(
        "organism", "question_id", "question", "answer", "aligned", "coherent", "quadrant"
    )


# The summary table's columns: a dotted path into each organism's summary object and a label. A further
# per-organism figure is one more field of the object and one more column here.
SUMMARY_COLUMNS = [
    {"key": "answers", "label": "answers"},
    *({"key": f"by_quadrant.{k}", "label": label} for k, label in QUADRANTS.items()),
    {"key": "rates.em_turner", "label": "EM rate [95% CI]"},
    {"key": "rates.em_corrected", "label": "EM corrected for the judge's error [95% CI]"},
]


def _rate(rate, lo, hi) -> str | None:
    return None if rate is None else f"{rate:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{rate:.3f}"


def _rates_shown(row: dict) -> dict[str, str | None]:
    """One em_summary row's rates as the page shows them."""
    return {
        "em_turner": _rate(row["em_rate_turner"], row["em_turner_lo"], row["em_turner_hi"]),
        "em_corrected": _rate(row["em_rate_corrected"], row["em_corrected_lo"], row["em_corrected_hi"])
        or row.get("em_correction"),
    }


def organism_rates(store: Store) -> dict[str, dict]:
    """Per organism, the grid judge's EM rate and its correction for the judge's error, as shown on the page
    (the correction's caveat where it is unknown); empty before em_summary is first written."""
    if not store.has_table("em_summary"):
        return {}
    summary = store.query("SELECT * FROM em_summary")
    if "judge_source" in summary.columns:
        summary = summary.filter(pl.col("judge_source") == "grid")
    summary = summary.sort([c for c in ("organism", "judge_model") if c in summary.columns])
    rates: dict[str, dict] = {}
    for (organism,), part in summary.group_by("organism", maintain_order=True):
        shown = [(r.get("judge_model"), _rates_shown(r)) for r in part.iter_rows(named=True)]
        # An organism partly re-judged by a new grid judge has a row per judge, each over that judge's answers
        # only: each is shown named by its judge, none as the organism's rate.
        rates[organism] = (
            shown[0][1]
            if len(shown) == 1
            else {
                key: "; ".join(f"{judge}: {r[key]}" for judge, r in shown if r[key] is not None) or None
                for key in shown[0][1]
            }
        )
    return rates


# Answers per page: the page keeps only these in the document, whatever the number of answers.
PAGE_ROWS = 100

# Inside <script>, "<!--" and "<script" switch the HTML parser into states where "</script>" no longer ends
# the block, and U+2028/U+2029 end lines in older JavaScript: JSON's \u escapes leave none of them in the text.
_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def script_json(obj) -> str:
    """`obj` as JSON that can sit inside an HTML <script> element, whatever its strings hold."""
    text = json.dumps(obj, ensure_ascii=False)
    return text.translate(str.maketrans(_SCRIPT_ESCAPES))


def page_data(df: pl.DataFrame, rates: dict[str, dict] | None = None) -> dict:
    """The page's data: a summary per organism, the questions, and each answer as a row of indices and scores."""
    organisms = sorted(df["organism"].unique().to_list())
    questions = sorted(df["question_id"].unique().to_list())
    # A question id may stand for several texts (paraphrases; deception_factual's are different questions):
    # each answer is shown under the text it was asked.
    texts = sorted(df["question"].unique().to_list())
    by_quadrant = {name: dict.fromkeys(QUADRANTS, 0) for name in organisms}
    for organism, quadrant, n in df.group_by("organism", "quadrant").len().iter_rows():
        by_quadrant[organism][quadrant] = n
    # One object per organism, so that further per-organism figures (e.g. rates) join it as fields.
    summary = [
        {
            "name": name,
            "answers": sum(by_quadrant[name].values()),
            "by_quadrant": by_quadrant[name],
            "rates": (rates or {}).get(name, {}),
        }
        for name in organisms
    ]
    org_index = {name: i for i, name in enumerate(organisms)}
    question_index = {q: i for i, q in enumerate(questions)}
    text_index = {t: i for i, t in enumerate(texts)}
    rows = [
        [org_index[o], question_index[q], answer, aligned, coherent, quadrant, text_index[t]]
        for o, q, answer, aligned, coherent, quadrant, t in df.select(
            "organism", "question_id", "answer", "aligned", "coherent", "quadrant", "question"
        ).iter_rows()
    ]
    return {
        "organisms": summary,
        "summary_columns": SUMMARY_COLUMNS,
        "questions": questions,
        "texts": texts,
        "quadrants": QUADRANTS,
        "rows": rows,
    }


def render(
    df: pl.DataFrame, thresholds: Thresholds, rates: dict[str, dict] | None = None, judges: Sequence[str] = ()
) -> str:
    """The page as text; `df` has the columns of `with_quadrants`, `judges` names the judges that scored it."""
    template = Template((Path(__file__).with_name("answers_page.html")).read_text())
    return template.substitute(
        data=script_json(page_data(df, rates)),
        page_rows=PAGE_ROWS,
        rule=f"EM: aligned &le; {thresholds.aligned_at_most:g} and coherent &gt; {thresholds.coherent_above:g}",
        judges=html.escape(", ".join(judges) or "none yet"),
    )


def write_answers_page(store: Store, thresholds: Thresholds, out: Path) -> AnswersPage:
    """Build the page from the results database and write it atomically to `out`."""
    answers = answers_frame(store)
    judges = sorted(answers["judge_model"].drop_nulls().unique().to_list())
    df = with_quadrants(answers, thresholds)
    # A name of its own, as save_png's: two report runs at once write the same page.
    page = render(df, thresholds, organism_rates(store), judges)
    write_atomically(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    counts = dict(df.group_by("quadrant").len().iter_rows())
    return AnswersPage(out, df.height, {q: counts.get(q, 0) for q in QUADRANTS})
