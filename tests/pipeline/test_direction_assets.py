"""The direction assets materialised in Dagster on a tiny Llama: organism -> misalignment_directions (quartile
fallback, warning check) -> direction_similarity, with tables in DuckDB and figures inline."""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest
import yaml
from support.pipeline import materialize, pipeline_resources
from support.tiny import make_tiny_llama, tiny_grid

from em_assets.defs.partitions import organisms
from em_assets.grid.load import load_grid
from em_assets.judging.error_rates import write_error_rates
from em_assets.judging.judges import judge_identity
from em_assets.results.store import Store
from em_assets.stats.correction import CORRECTION_COLUMNS, UNKNOWN, ErrorRates, corrected_rate

ORGANISM = [
    "lora_adapter",
    "completions",
    "judgements",
    "misalignment_directions",
    "steering_sweep",
    "direction_ablation",
]


def direction_grid(tiny_model_dir) -> dict:
    """The base control and a rank-1 organism whose direction is swept at one layer and scale."""
    doc = tiny_grid(
        tiny_model_dir,
        "test",
        {"backend": "local", "model": "tiny", "batch_size": 8, "min_mass": 0.0},
        {"med-r1": ("bad_medical_advice", {"r": 1, "lora_alpha": 8, "target_modules": ["down_proj"]})},
        examples=4,
        batch_size=4,
        samples=4,
    )
    doc["profiles"]["test"]["directions"] = {
        "min_per_class": 50,
        "fallback": "quartile",
        "layer_fractions": [0.5],
        "scales": [4],
        "samples_per_question": 1,
        "sweep_recipes": ["med-r1"],
    }
    return doc


@pytest.fixture
def pipeline(tmp_path, tiny_model_dir, mirror):
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(direction_grid(tiny_model_dir)))
    resources = pipeline_resources(tmp_path, tmp_path / "grid.yaml", mirror)
    with dg.instance_for_test() as instance:
        yield instance, resources, tmp_path


def test_directions_and_similarity_materialise(pipeline):
    instance, resources, tmp_path = pipeline
    keys = [o.key for o in resources["experiment"].grid().organisms()]
    instance.add_dynamic_partitions(organisms.name, keys)
    materialize(instance, resources, ["base_models", "training_datasets", "eval_questions"])
    for key in keys:
        result = materialize(instance, resources, ORGANISM, key)
        meta = result.asset_materializations_for_node("misalignment_directions")[0].metadata
        assert meta["contrast"].value == "quartile" and "not the EM threshold" in meta["result"].value
        (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "enough_em_answers"]
        assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
        sweeps = {n: result.asset_materializations_for_node(n)[0].metadata for n in ORGANISM[-2:]}
        ran = key == "tiny--med-r1--s0"  # only the recipes in directions.sweep_recipes
        assert all(m["ran"].value is ran for m in sweeps.values())
        if ran:
            assert all("data:image/png;base64," in m["figure"].value for m in sweeps.values())
            # Steering's three settings (unsteered, direction, random) go through the base model in one batch.
            assert sweeps["steering_sweep"]["sampling"].value.startswith("one batch of 3 settings")
    store = Store(tmp_path / "results.duckdb")
    steering = store.query("SELECT * FROM steering_results ORDER BY setting")
    # Unsteered, then the direction and the random control at one layer and scale; 2 questions x 1 sample.
    assert steering["setting"].to_list() == [
        "direction layer=1 scale=4",
        "random layer=1 scale=4",
        "unsteered",
    ]
    assert (steering["n"] == 2).all() and steering["em_lo"].null_count() == 0
    ablation = store.query("SELECT * FROM direction_ablation ORDER BY setting")
    assert ablation["setting"].to_list() == [
        "direction ablated",
        "organism (its completions)",
        "random ablated",
    ]
    assert ablation["source_layer"].to_list() == [1, None, 1]
    assert ablation.filter(pl.col("source_layer").is_null())["n"][0] == 8  # the organism's own 2 x 4 answers
    edits = store.query("SELECT setting, edits FROM sweep_points WHERE sweep = 'ablation' ORDER BY setting")
    assert edits.height == 2 and all('"Ablate"' in e for e in edits["edits"])
    # The judge's error rates are not measured yet: every row says so, its corrected columns null.
    for table in (steering, ablation):
        assert set(CORRECTION_COLUMNS) <= set(table.columns) and set(table["em_correction"]) == {UNKNOWN}
    # Once they are, the stored rows carry each point's rate corrected with them, the organism's own row too.
    grid = load_grid(tmp_path / "grid.yaml", "test")
    rates = ErrorRates.from_counts(9, 10, 40, 50)
    write_error_rates(
        store, "tiny", judge_identity(grid, tmp_path / "cache", store), rates, grid.thresholds, "x"
    )
    materialize(instance, resources, ORGANISM[-2:], "tiny--med-r1--s0")
    for name in ("steering_results", "direction_ablation"):
        for r in store.query(f"SELECT * FROM {name}").iter_rows(named=True):
            assert (r["judge_sensitivity"], r["judge_specificity"]) == (0.9, 0.8), (name, r["setting"])
            expected = corrected_rate(round(r["em_rate"] * r["n"]), r["n"], rates)
            assert (r["em_rate_corrected"], r["em_corrected_lo"], r["em_corrected_hi"]) == pytest.approx(
                expected
            )
            assert "9/10" in r["em_correction"]
    rows = store.query("SELECT * FROM misalignment_directions ORDER BY organism")
    assert rows["organism"].to_list() == sorted(keys) and rows["direction_sha256"].null_count() == 0
    assert (rows["n_per_class"] == 2).all()  # 8 answers: a quarter on each side

    report = materialize(instance, resources, ["direction_similarity"])
    meta = report.asset_materializations_for_node("direction_similarity")[0].metadata
    assert "data:image/png;base64," in meta["heatmap"].value
    table = store.query("SELECT * FROM direction_similarity")
    assert table.height == rows["num_layers"][0]  # one pair of organisms, every layer


def test_a_model_organism_steers_its_base_model(tmp_path, tiny_model_dir, smollm2_tokenizer_dir, mirror):
    """Steering adds a direction to the chat model: a fine-tuned `model` organism's sweep samples its grid base
    model, as a LoRA organism's does, not its own weights (which its ablation edits)."""
    finetuned = make_tiny_llama(smollm2_tokenizer_dir, tmp_path / "finetuned", seed=3)
    doc = direction_grid(tiny_model_dir)
    profile = doc["profiles"]["test"]
    del profile["recipes"]["base"]
    profile["recipes"]["ft"] = {
        "kind": "model",
        "organisms": [{"base_model": "tiny", "source": str(finetuned)}],
    }
    profile["directions"]["sweep_recipes"] = ["med-r1", "ft"]
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(doc))
    resources = pipeline_resources(tmp_path, tmp_path / "grid.yaml", mirror)
    keys = ["tiny--med-r1--s0", "tiny--ft--s0"]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(organisms.name, keys)
        materialize(instance, resources, ["base_models", "training_datasets", "eval_questions"])
        for key in keys:
            materialize(instance, resources, ORGANISM[:-1], key)
    unsteered = Store(tmp_path / "results.duckdb").query(
        "SELECT organism, answer, base_revision FROM sweep_completions "
        "WHERE sweep = 'steering' AND setting = 'unsteered' ORDER BY organism, question_id, sample_idx"
    )
    lora, model = (unsteered.filter(pl.col("organism") == k) for k in keys)
    assert lora.height == model.height == 2
    assert model["answer"].to_list() == lora["answer"].to_list()
    assert model["base_revision"].to_list() == lora["base_revision"].to_list()


def _judged_then_regridded(pipeline, edit) -> str:
    """The rank-1 organism judged with its direction drawn, then its grid profile changed by `edit`."""
    instance, resources, tmp_path = pipeline
    key = "tiny--med-r1--s0"
    instance.add_dynamic_partitions(organisms.name, [key])
    materialize(instance, resources, ["base_models", "training_datasets", "eval_questions"])
    materialize(instance, resources, ORGANISM[:4], key)
    grid_file = tmp_path / "grid.yaml"
    doc = yaml.safe_load(grid_file.read_text())
    edit(doc["profiles"]["test"])
    grid_file.write_text(yaml.safe_dump(doc))
    return key


def test_answers_and_a_direction_of_weights_trained_before_are_refused(pipeline):
    """Regression: with the organism retrained and nothing after it run again, its direction read the new
    adapter's activations on the old adapter's answers, and steering and ablation swept the old adapter's
    direction (ablation beside the old adapter's answers as "before"), all under the organism's name."""
    from em_assets.analyses.direction_sweeps import ABLATION, STEERING, run_direction_sweep
    from em_assets.analyses.directions import extract_direction
    from em_assets.context import StageContext
    from em_assets.grid.schema import Organism
    from em_assets.results.errors import MissingUpstreamError

    instance, resources, tmp_path = pipeline
    key = _judged_then_regridded(
        pipeline, lambda p: p["recipes"]["med-r1"]["train"].update(learning_rate=5e-4)
    )
    materialize(instance, resources, ["lora_adapter"], key)

    store = Store(tmp_path / "results.duckdb")
    ctx = StageContext(
        store,
        resources["experiment"].grid(),
        Organism.parse(key),
        "test",
        tmp_path / "artifacts",
        device="cpu",
    )
    direction = store.query("SELECT * FROM misalignment_directions")
    with pytest.raises(MissingUpstreamError, match="materialise completions and judgements first"):
        extract_direction(ctx)
    for sweep in (STEERING, ABLATION):
        with pytest.raises(MissingUpstreamError, match="materialise misalignment_directions first"):
            run_direction_sweep(ctx, sweep, tmp_path / "figures")
    assert store.query("SELECT * FROM misalignment_directions").equals(direction)
    assert store.query("SELECT count(*) AS n FROM sweep_completions")["n"][0] == 0


def test_ablation_under_another_sampler_samples_its_own_before(pipeline):
    """With the grid sampling through vLLM, the organism's completions come from another sampler than the hf
    points': its unedited answers are sampled with the points, so before and after differ by the edit alone."""
    instance, resources, tmp_path = pipeline
    key = _judged_then_regridded(pipeline, lambda p: p["sampling"].update(backend="vllm"))
    materialize(instance, resources, ["direction_ablation"], key)

    store = Store(tmp_path / "results.duckdb")
    ablation = store.query("SELECT setting, source_layer, n FROM direction_ablation ORDER BY setting")
    assert ablation["setting"].to_list() == ["direction ablated", "organism unedited", "random ablated"]
    assert ablation["n"].to_list() == [2, 2, 2]  # 2 questions x 1 sample each, the organism's own included
    points = store.query("SELECT setting, edits FROM sweep_points WHERE sweep = 'ablation' ORDER BY setting")
    assert points["setting"].to_list() == ["direction ablated", "organism unedited", "random ablated"]
    assert points["edits"][1] == "[]"
