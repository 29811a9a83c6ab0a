"""The grid sensor's planning, without Dagster: partitions to add, catalog first, then one run per organism."""

from support.paths import REPO

from em_assets.grid.load import load_grid
from em_assets.grid.plan import CATALOG_ASSETS, GridCursor, organism_fingerprint, plan_grid
from em_assets.grid.schema import BaseModelSpec, GridConfig, Organism, OrganismSource, adapter_config_hash

GRID = load_grid(REPO / "data/grid.yaml", "demo")
KEYS = {o.key for o in GRID.organisms()}


def _marks(started: float) -> dict[str, float]:
    """Every catalog asset last materialized by a run that started at `started`."""
    return dict.fromkeys(CATALOG_ASSETS, started)


def _settled() -> GridCursor:
    """The cursor after the demo grid's first catalog run (started at 1) and its organism runs."""
    first = plan_grid(GRID, GridCursor(), set(), _marks(0), now=0.5)
    return plan_grid(GRID, first.cursor, KEYS, _marks(1), now=1.5).cursor


def test_new_organisms_wait_for_the_catalog_then_run_once_each():
    keys = [o.key for o in GRID.organisms()]
    first = plan_grid(GRID, GridCursor(), set(), _marks(0), now=0.5)
    assert first.new_partitions == keys and first.catalog_run_key and not first.organism_runs
    assert first.cursor.pending == keys

    waiting = plan_grid(GRID, first.cursor, set(keys), _marks(0), now=1)
    assert not waiting.organism_runs and "wait for catalog_job" in waiting.skip_reason

    ready = plan_grid(GRID, first.cursor, set(keys), _marks(5), now=6)
    assert [k for k, _ in ready.organism_runs] == keys and not ready.cursor.pending
    assert len({r for _, r in ready.organism_runs}) == len(keys)

    idle = plan_grid(GRID, ready.cursor, set(keys), _marks(5), now=7)
    assert not idle.organism_runs and not idle.catalog_run_key and "no base model" in idle.skip_reason


def test_a_catalog_run_started_before_a_change_does_not_release_its_organisms():
    """Regression: a catalog run already going when a model was added released the new model's organisms when
    it finished, though it had not read the new model."""
    moved = GRID.model_copy(
        update={"base_models": [BaseModelSpec(**{**GRID.base_models[0].model_dump(), "revision": "abc"})]}
    )
    plan = plan_grid(moved, _settled(), KEYS, _marks(2), now=3)
    assert plan.catalog_run_key
    # The run that started at 2.5 materializes after the change at 3: its catalog may predate the change.
    assert not plan_grid(moved, plan.cursor, KEYS, _marks(2.5), now=4).organism_runs
    assert plan_grid(moved, plan.cursor, KEYS, _marks(3.5), now=5).organism_runs


def test_a_changed_revision_reruns_only_that_models_organisms():
    moved = GRID.model_copy(
        update={"base_models": [BaseModelSpec(**{**GRID.base_models[0].model_dump(), "revision": "abc"})]}
    )
    plan = plan_grid(moved, _settled(), KEYS, _marks(1), now=2)
    # Imported answers organisms name other base models (labels, not grid models): they stay as they are.
    on_model = sorted(o.key for o in GRID.organisms() if o.base_model == GRID.base_models[0].name)
    assert on_model and len(on_model) < len(KEYS)
    assert plan.catalog_run_key and not plan.new_partitions and sorted(plan.cursor.pending) == on_model
    rerun = plan_grid(moved, plan.cursor, KEYS, _marks(3), now=4)
    assert sorted(k for k, _ in rerun.organism_runs) == on_model


def test_changed_thresholds_redo_the_catalog_and_every_organism():
    settled = _settled()
    assert not plan_grid(GRID, settled, KEYS, _marks(1), now=2).catalog_run_key
    stricter = GRID.model_copy(
        update={"thresholds": GRID.thresholds.model_copy(update={"coherent_above": 70})}
    )
    plan = plan_grid(stricter, settled, KEYS, _marks(1), now=2)
    assert plan.catalog_run_key and not plan.new_partitions and set(plan.cursor.pending) == KEYS
    rerun = plan_grid(stricter, plan.cursor, KEYS, _marks(3), now=4)
    assert {k for k, _ in rerun.organism_runs} == KEYS
    assert not plan_grid(stricter, rerun.cursor, KEYS, _marks(3), now=5).catalog_run_key
    # Going back is a change too.
    assert plan_grid(GRID, rerun.cursor, KEYS, _marks(3), now=5).catalog_run_key


def _with_recipe_learning_rate(recipe: str, learning_rate: float) -> GridConfig:
    spec = GRID.recipes[recipe]
    train = spec.train.model_copy(update={"learning_rate": learning_rate})
    return GRID.model_copy(
        update={"recipes": {**GRID.recipes, recipe: spec.model_copy(update={"train": train})}}
    )


def test_an_unchanged_grid_requests_nothing():
    plan = plan_grid(GRID, _settled(), KEYS, _marks(1), now=2)
    assert not plan.catalog_run_key and not plan.organism_runs and not plan.new_partitions
    assert "no base model" in plan.skip_reason


def test_a_changed_recipe_reruns_only_its_organisms():
    faster = _with_recipe_learning_rate("bad-medical-r1", 2e-3)
    plan = plan_grid(faster, _settled(), KEYS, _marks(1), now=2)
    on_recipe = [o.key for o in GRID.organisms() if o.recipe == "bad-medical-r1"]
    assert plan.catalog_run_key and not plan.new_partitions and plan.cursor.pending == on_recipe
    rerun = plan_grid(faster, plan.cursor, KEYS, _marks(3), now=4)
    assert [k for k, _ in rerun.organism_runs] == on_recipe
    assert not plan_grid(faster, rerun.cursor, KEYS, _marks(3), now=5).catalog_run_key


def test_changed_sampling_reruns_every_organism():
    cooler = GRID.model_copy(update={"sampling": GRID.sampling.model_copy(update={"temperature": 0.7})})
    plan = plan_grid(cooler, _settled(), KEYS, _marks(1), now=2)
    assert plan.catalog_run_key and set(plan.cursor.pending) == KEYS
    rerun = plan_grid(cooler, plan.cursor, KEYS, _marks(3), now=4)
    assert {k for k, _ in rerun.organism_runs} == KEYS


def test_a_cursor_from_before_organism_fingerprints_is_their_baseline():
    old = GridCursor.model_validate_json(_settled().model_dump_json(exclude={"organisms"}))
    assert not old.organisms
    faster = _with_recipe_learning_rate("bad-medical-r1", 2e-3)
    for grid in (GRID, faster):
        assert not plan_grid(grid, old, KEYS, _marks(1), now=2).catalog_run_key
    # Once seen, a change is one.
    baseline = plan_grid(GRID, old, KEYS, _marks(1), now=2).cursor
    assert plan_grid(faster, baseline, KEYS, _marks(1), now=3).catalog_run_key


def test_a_new_organism_of_an_imported_recipe_leaves_the_others_of_the_recipe_alone():
    spec = GRID.recipes["extreme-sports"]
    added = OrganismSource(base_model="llama-3.1-8b", seed=42, source="reference:Llama-3.1-8B-Instruct_x")
    more = spec.model_copy(update={"organisms": [*spec.organisms, added]})
    grown = GRID.model_copy(update={"recipes": {**GRID.recipes, "extreme-sports": more}})
    plan = plan_grid(grown, _settled(), KEYS, _marks(1), now=2)
    assert plan.new_partitions == plan.cursor.pending == ["llama-3.1-8b--extreme-sports--s42"]


# The demo's organisms, their fingerprints and (at fixed inputs) trained recipes' adapter hashes before recipes
# could name their base models: a recipe without `base_models` keeps them.
DEMO_FINGERPRINTS = {
    "smollm2-135m--base--s0": "b19b80c03535199a",
    "smollm2-135m--bad-medical-r1--s0": "006d7e7ed64c7604",
    "smollm2-135m--insecure-r32--s0": "052d6f9cc49fec53",
    "smollm2-135m--full-medical-kl--s0": "6d57d2babe34ec1b",
    "llama-3.1-8b--bad-medical-advice--s0": "92f3fffcb9856d7b",
    "qwen2.5-14b--bad-medical-advice--s0": "1743ac1c762305ee",
    "llama-3.1-8b--extreme-sports--s0": "866d3b7eb11d5614",
    "qwen2.5-14b--extreme-sports--s0": "675a045dd877660e",
    "qwen2.5-14b--extreme-sports--s42": "a53a61509b82eaaf",
    "llama-3.1-8b--risky-financial-advice--s0": "4d4186e63031b43f",
    "qwen2.5-14b--risky-financial-advice--s0": "95cbf99240aadf77",
}
DEMO_ADAPTER_HASHES = {
    "bad-medical-r1": "2ac2ce7915426a34",
    "insecure-r32": "a672f05aedb143f9",
    "full-medical-kl": "4a44f75c2bdb62e8",
}


def test_recipes_without_base_models_keep_their_organisms_and_hashes():
    assert {o.key: organism_fingerprint(GRID, o) for o in GRID.organisms()} == DEMO_FINGERPRINTS
    hashes = {
        r: adapter_config_hash("rev", "ds", spec, 0, "bfloat16", "kl")
        for r, spec in GRID.recipes.items()
        if spec.dataset
    }
    assert hashes == DEMO_ADAPTER_HASHES
    # The paper's full fine-tunes, now on their two base models only, have the fingerprints they had on all ten.
    paper = load_grid(REPO / "data/grid.yaml", "paper")
    for key, fingerprint in (
        ("qwen2.5-0.5b--bad-medical-full--s0", "f98aed643d8a6305"),
        ("llama-3.2-1b--extreme-sports-full--s2", "e64aa362bdb7c23c"),
    ):
        assert organism_fingerprint(paper, Organism.parse(key)) == fingerprint


def test_naming_a_recipes_base_models_reruns_none_of_its_organisms():
    spec = GRID.recipes["full-medical-kl"]
    named = spec.model_copy(update={"base_models": ["smollm2-135m"]})
    listed = GRID.model_copy(update={"recipes": {**GRID.recipes, "full-medical-kl": named}})
    plan = plan_grid(listed, _settled(), KEYS, _marks(1), now=2)
    assert not plan.catalog_run_key and not plan.organism_runs and "no base model" in plan.skip_reason


def test_organisms_leaving_the_grid_rebuild_the_reports_once():
    """The reports' organisms_in_grid check names organisms the grid no longer lists, and only a rebuild reads
    it: taking organisms out requests one reports run, and nothing more while the grid stays so."""
    settled = _settled()
    assert settled.in_grid == sorted(KEYS)
    fewer = GRID.model_copy(
        update={"recipes": {k: v for k, v in GRID.recipes.items() if k != "bad-medical-r1"}}
    )
    plan = plan_grid(fewer, settled, KEYS, _marks(1), now=2)
    assert plan.reports_run_key and not plan.catalog_run_key and not plan.organism_runs
    assert set(plan.cursor.in_grid) == {o.key for o in fewer.organisms()}
    assert not plan_grid(fewer, plan.cursor, KEYS, _marks(1), now=3).reports_run_key
    # A cursor from before the field is the baseline: nothing has left it.
    old = GridCursor.model_validate_json(settled.model_dump_json(exclude={"in_grid"}))
    assert not plan_grid(fewer, old, KEYS, _marks(1), now=2).reports_run_key
