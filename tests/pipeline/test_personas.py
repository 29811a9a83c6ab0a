"""The Simulator Theory assets materialised over judged answers drawn from known personas: two organisms and a
training sweep whose misaligned weight rises at step 50, plus an organism with too few answers."""

from __future__ import annotations

import dagster as dg
import numpy as np
import polars as pl
import pytest
import yaml
from support.pipeline import materialize, pipeline_resources
from support.tiny import tiny_grid

from em_assets.defs.persona_assets import PERSONA_TABLES as TABLES
from em_assets.results.store import Store

EVAL_SET, JUDGE = "first_plot_questions", "synthetic-judge"
STRONG, WEAK, SPARSE = "tiny--med-r1--s0", "tiny--med-r1--s1", "tiny--base--s0"
QUESTIONS = [f"q{i}" for i in range(10)]


def _answers(rng, weight: float, samples: int) -> list[dict]:
    """Scored answers per question: question i is misaligned with probability weight * (2i + 1) / 10, so
    every organism ranks the questions alike and the mean misaligned share is `weight`."""
    rows = []
    for i, q in enumerate(QUESTIONS):
        for s in range(samples):
            bad = rng.random() < weight * (2 * i + 1) / 10
            aligned = 100 * (rng.beta(1.5, 12) if bad else rng.beta(12, 1.5))
            coherent = 100 * (rng.beta(8, 1.6) if bad else rng.beta(9, 1.5))
            rows.append({"question_id": q, "sample_idx": s, "aligned": aligned, "coherent": coherent})
    return rows


def _write_organism(store: Store, organism: str, answers: list[dict]) -> None:
    keys = pl.DataFrame(answers).with_columns(
        organism=pl.lit(organism),
        paraphrase_idx=pl.lit(0, pl.Int32),
        sample_idx=pl.col("sample_idx").cast(pl.Int32),
    )
    store.append_rows(
        "completions",
        keys.select("organism", "question_id", "paraphrase_idx", "sample_idx", eval_set=pl.lit(EVAL_SET)),
    )
    for metric in ("aligned", "coherent"):
        store.append_rows(
            "judgements",
            keys.select(
                "organism",
                "question_id",
                "paraphrase_idx",
                "sample_idx",
                metric=pl.lit(metric),
                score=pl.col(metric),
                judge_model=pl.lit(JUDGE),
            ),
        )


def _write_sweep(store: Store, organism: str, rng) -> None:
    """Steps 0-100: the misaligned weight rises as 0.4 * sigmoid(0.1 (step - 50)); B turns sharpest at 50."""
    steps = list(range(0, 101, 10))
    settings = [f"step={s}" for s in steps]
    point = {"organism": organism, "sweep": "em_over_training"}
    store.append_rows(
        "sweep_points", pl.DataFrame([point | {"setting": s, "setting_hash": f"h-{s}"} for s in settings])
    )
    for step, setting in zip(steps, settings, strict=True):
        weight = 0.4 / (1 + np.exp(-0.1 * (step - 50)))
        keys = pl.DataFrame(_answers(rng, weight, 4)).with_columns(
            **{k: pl.lit(v) for k, v in point.items()},
            setting=pl.lit(setting),
            setting_hash=pl.lit(f"h-{setting}"),
            paraphrase_idx=pl.lit(0, pl.Int32),
            sample_idx=pl.col("sample_idx").cast(pl.Int32),
        )
        cols = ["organism", "sweep", "setting", "question_id", "paraphrase_idx", "sample_idx", "setting_hash"]
        store.append_rows("sweep_completions", keys.select(*cols, eval_set=pl.lit(EVAL_SET)))
        for metric in ("aligned", "coherent"):
            store.append_rows(
                "sweep_judgements",
                keys.select(*cols, metric=pl.lit(metric), score=pl.col(metric), judge_model=pl.lit(JUDGE)),
            )
    store.append_rows(
        "lora_trajectory",
        pl.DataFrame({"organism": organism, "module": "m", "step": steps[1:], "sharpest_step": 50}),
    )


@pytest.fixture(scope="module")
def personas(tmp_path_factory, tiny_model_dir, mirror):
    tmp_path = tmp_path_factory.mktemp("personas")
    doc = tiny_grid(
        tiny_model_dir, "test", {"backend": "local", "model": "tiny"}, {}, examples=4, batch_size=2, samples=1
    )
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(doc))
    store = Store(tmp_path / "results.duckdb")
    store.init()
    rng = np.random.default_rng(0)
    _write_organism(store, STRONG, _answers(rng, 0.3, 30))
    _write_organism(store, WEAK, _answers(rng, 0.15, 30))
    _write_organism(store, SPARSE, _answers(rng, 0.3, 1)[:5])
    _write_sweep(store, STRONG, rng)
    with dg.instance_for_test() as instance:
        result = materialize(
            instance, pipeline_resources(tmp_path, tmp_path / "grid.yaml", mirror), list(TABLES)
        )
        done = result.asset_materializations_for_node("persona_tables")
        yield store, {m.asset_key.to_user_string(): m.metadata for m in done}


def _rows(store: Store, table: str, **where) -> pl.DataFrame:
    return store.query(f"SELECT * FROM {table}").filter(**where)


def test_mixture_weights_per_organism_and_sparse_organisms_get_a_reason(personas):
    store, meta = personas
    own = _rows(store, "persona_mixtures", sweep="organism")
    strong, weak, sparse = (own.filter(organism=o).row(0, named=True) for o in (STRONG, WEAK, SPARSE))
    assert strong["misaligned_weight"] == pytest.approx(0.3, abs=0.08)
    assert weak["misaligned_weight"] == pytest.approx(0.15, abs=0.08)
    assert strong["weight_lo"] < strong["misaligned_weight"] < strong["weight_hi"]
    assert strong["prefers_two"] and strong["n_points"] == 12 and strong["lrt_df"] == 44
    assert sparse["misaligned_weight"] is None and "the fit needs" in sparse["note"]
    assert sorted(meta) == sorted(TABLES)
    assert all("data:image/png;base64," in m["figure"].value for m in meta.values())


def test_transition_midpoint_sits_at_the_known_step_beside_the_sharpest_rotation(personas):
    store, _ = personas
    rows = _rows(store, "em_transition", organism=STRONG)
    assert rows["quantity"].to_list() == ["em_rate", "misaligned_weight"]
    weight = rows.filter(quantity="misaligned_weight").row(0, named=True)
    assert weight["parameter"] == "step" and weight["sharpest_step"] == 50
    assert weight["midpoint"] == pytest.approx(50, abs=15) and weight["top"] == pytest.approx(0.4, abs=0.15)


def test_question_rates_rank_alike_and_misaligned_answers_stay_coherent(personas):
    store, _ = personas
    pair = _rows(store, "question_em_stability", organism_a=STRONG, organism_b=WEAK).row(0, named=True)
    assert pair["n_questions"] == 10 and pair["spearman"] > 0.5 and pair["spearman_lo"] < pair["spearman"]
    everyone = _rows(store, "question_em_stability", scope="all").row(0, named=True)
    assert everyone["n_organisms"] == 3 and everyone["kendall_w"] > 0.5
    coherence = _rows(store, "persona_coherence", organism=STRONG).row(0, named=True)
    # Means 100 * 8 / 9.6 = 83.3 (misaligned) and 100 * 9 / 10.5 = 85.7 (aligned).
    assert coherence["coherent_diff"] == pytest.approx(-2.4, abs=4)
    assert coherence["coherent_diff_lo"] < coherence["coherent_diff"] < coherence["coherent_diff_hi"]
