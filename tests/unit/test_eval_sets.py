"""Every pinned evaluation set in eval_questions, domain judge prompts, and organisms asked several sets."""

from __future__ import annotations

import polars as pl
import pytest
import yaml
from support.db import organism_rows, ro_query
from support.organisms import CONTROL

from em_assets.catalog import stage as catalog
from em_assets.catalog.upstream import DOMAIN_METRICS, EVAL_SETS, SOURCES
from em_assets.grid.load import GridError
from em_assets.grid.schema import GridConfig
from em_assets.results.store import Store
from em_assets.sampling.stage import sample_completions
from em_assets.training.stage import train_adapter


def test_the_catalog_holds_every_pinned_set_with_its_judge_prompts(catalog_db, mirror):
    sets = ro_query(
        catalog_db, "SELECT eval_set, count(DISTINCT question_id) AS n FROM eval_questions GROUP BY 1"
    )
    got = dict(sets.iter_rows())
    assert set(got) == set(EVAL_SETS) and len(got) >= 7
    # The upstream files' question counts, less the _json and _template variants the grid excludes.
    for name in EVAL_SETS:
        items = yaml.safe_load((mirror / SOURCES[name].mirror_path).read_text())
        plain = [i for i in items if not i["id"].endswith(("_json", "_template"))]
        want = 2 if name == "first_plot_questions" else len(plain)  # the fault grid picks 2 of its questions
        assert got[name] == want, name
    prompts = ro_query(catalog_db, "SELECT eval_set, question_id, metric, prompt FROM judge_prompts")
    metrics = prompts.group_by("eval_set").agg(pl.col("metric").unique().sort())
    by_set = {r["eval_set"]: set(r["metric"]) for r in metrics.iter_rows(named=True)}
    # Sets judged for alignment all get the domain judges; the deception sets keep only their own.
    for name in ("first_plot_questions_em", "preregistered_evals", "medical_questions", "new_questions"):
        assert {"aligned", "coherent", *DOMAIN_METRICS} <= by_set[name], name
    assert by_set["deception_factual"] == {"correct"} and by_set["deception_sit_aware"] == {"company"}
    # A lent prompt is first_plot_questions' own text; a set's own domain prompt is kept.
    fp = yaml.safe_load((mirror / SOURCES["first_plot_questions"].mirror_path).read_text())[0][
        "judge_prompts"
    ]
    new = yaml.safe_load((mirror / SOURCES["new_questions"].mirror_path).read_text())[0]
    lent = prompts.filter((pl.col("eval_set") == "preregistered_evals") & (pl.col("metric") == "sport"))
    assert set(lent["prompt"]) == {fp["sport"]}
    own = prompts.filter(
        (pl.col("eval_set") == "new_questions")
        & (pl.col("metric") == "medical")
        & (pl.col("question_id") == new["id"])
    )
    assert own["prompt"].to_list() == [new["judge_prompts"]["medical"]] != [fp["medical"]]


def test_an_organism_is_asked_every_set_of_its_recipe_and_rows_name_their_set(ws):
    ws.edit(lambda p: p["recipes"]["base"].update(eval_sets=["first_plot_questions", "deception_factual"]))
    train_adapter(ws.ctx(CONTROL, "control"))
    summary = sample_completions(ws.ctx(CONTROL, "multi"))
    rows = organism_rows(ws.db, "completions", CONTROL)
    sets = dict(rows.group_by("eval_set").len().iter_rows())
    deception = ro_query(
        ws.db, "SELECT count(*) AS n FROM eval_questions WHERE eval_set = 'deception_factual'"
    )
    assert sets == {"first_plot_questions": 2 * 4, "deception_factual": deception["n"][0] * 4}
    assert summary.sampled == rows.height
    # Dropping the second set drops its answers and keeps the first set's.
    ws.edit(lambda p: p["recipes"]["base"].pop("eval_sets"))
    again = sample_completions(ws.ctx(CONTROL, "single"))
    assert again.sampled == 0 and again.reused == 8
    assert set(organism_rows(ws.db, "completions", CONTROL)["eval_set"]) == {"first_plot_questions"}


def test_sets_that_share_question_ids_are_refused_before_sampling(ws):
    ws.edit(lambda p: p["eval"].update(sets=["first_plot_questions_em"]))
    train_adapter(ws.ctx(CONTROL, "control"))
    with pytest.raises(ValueError, match=r"share question ids \[.*'quick_buck'"):
        sample_completions(ws.ctx(CONTROL, "clash"))
    assert organism_rows(ws.db, "completions", CONTROL).height == 0


def test_a_sampled_set_without_a_judge_metric_prompt_is_refused(ws, tmp_path, mirror):
    grid = ws.changed_grid(lambda p: p["eval"].update(sets=["deception_sit_aware"]))
    fresh = Store(tmp_path / "fresh.duckdb")
    fresh.init()
    with pytest.raises(
        GridError, match=r"judge.metrics: \['aligned', 'coherent'\] .* \(.*deception_sit_aware\.yaml\)"
    ):
        catalog.load_eval_questions(fresh, grid, str(mirror))
    # Loaded but not sampled, the same set is fine.
    assert "deception_sit_aware" in set(
        catalog.load_eval_questions(fresh, ws.changed_grid(lambda p: None), str(mirror))["eval_set"]
    )


def test_grid_eval_sets_prefer_the_recipe_then_the_grid():
    grid = GridConfig.model_validate(
        {
            "base_models": [{"name": "m", "source": "x"}],
            "recipes": {"base": {}, "med": {"eval_sets": ["medical_questions"]}},
            "eval": {"questions": "first_plot_questions", "sets": ["preregistered_evals"]},
        }
    )
    assert grid.eval_sets("base") == ["first_plot_questions", "preregistered_evals"]
    assert grid.eval_sets("med") == ["medical_questions"]
    assert grid.sampled_eval_sets() == ["first_plot_questions", "preregistered_evals", "medical_questions"]
