"""The whole asset graph materialised in-process on a tiny random Llama with a real tokenizer and real data."""

from pathlib import Path

import dagster as dg
import pytest
import yaml
from support.pipeline import materialize, pipeline_resources
from support.recompute import assert_reports_match_raw_rows
from support.tiny import tiny_grid

from em_assets.defs import report_assets
from em_assets.defs.partitions import organisms
from em_assets.results.keys import results_tables
from em_assets.results.store import Store

ORGANISM_ASSETS = ["lora_adapter", "completions", "judgements"]


def pipeline_grid(model_dir: Path) -> dict:
    """Two LoRA recipes (one on half the layers) and the control, 6 answers each, judged by the tiny model."""
    return tiny_grid(
        model_dir,
        "test",
        {"backend": "local", "model": "tiny", "batch_size": 4},
        {
            "med-r1": (
                "bad_medical_advice",
                {"r": 1, "lora_alpha": 8, "target_modules": ["down_proj"], "layer_fraction": 0.5},
            ),
            "insecure-r4": (
                "insecure",
                {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
            ),
        },
        examples=8,
        batch_size=4,
        samples=3,
    )


@pytest.fixture
def pipeline(tmp_path, tiny_model_dir, mirror):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(pipeline_grid(tiny_model_dir)))
    resources = pipeline_resources(tmp_path, grid_file, mirror)
    with dg.instance_for_test() as instance:
        yield instance, resources, tmp_path


def test_whole_graph_materialises_with_lineage(pipeline):
    instance, resources, tmp_path = pipeline
    keys = [o.key for o in resources["experiment"].grid().organisms()]
    instance.add_dynamic_partitions(organisms.name, keys)
    materialize(instance, resources, ["base_models", "training_datasets", "eval_questions"])
    for key in keys:
        materialize(instance, resources, ORGANISM_ASSETS, key)
    result = materialize(instance, resources, [*report_assets.REPORT_TABLES, "em_figures"])

    store = Store(tmp_path / "results.duckdb")
    assert_reports_match_raw_rows(store, resources["experiment"].grid().thresholds)
    summary = store.query("SELECT * FROM em_summary ORDER BY organism")
    assert summary["organism"].to_list() == sorted(keys)
    assert summary["n_answers"].to_list() == [6, 6, 6]
    for col in ("base_revision", "sampling_hash", "judge_model", "aligned_prompt_hash", "completions_run_id"):
        assert summary[col].null_count() == 0, col
    # Sampled without a top-k cut or a repetition penalty, and the lineage says so.
    assert summary["top_k"].null_count() == 3 and summary["repetition_penalty"].to_list() == [1.0] * 3
    trained = summary.filter(summary["organism"] != "tiny--base--s0")
    assert trained["adapter_sha256"].null_count() == 0 and trained["dataset_sha256"].null_count() == 0

    judged = store.query(
        "SELECT metric, count(*) AS n, count(mass) AS with_mass FROM judgements GROUP BY metric"
    )
    assert dict(zip(judged["metric"], judged["n"], strict=True)) == {"aligned": 18, "coherent": 18}
    assert judged["with_mass"].to_list() == [18, 18]
    losses = store.query("SELECT * FROM training_curves")
    assert set(losses["organism"]) == {"tiny--med-r1--s0", "tiny--insecure-r4--s0"}
    for table in ("em_by_question", "em_threshold_sensitivity", "em_seed_bootstrap"):
        assert store.query(f"SELECT count(*) AS n FROM {table}")["n"][0] > 0, table
    # `migrate` copies the tables it knows as results tables: every table a run writes must be one.
    written = set(store.query("SELECT table_name FROM duckdb_tables()")["table_name"])
    assert written - results_tables() == set()

    (in_grid,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "organisms_in_grid"]
    # Says there are none, not an empty entry.
    assert in_grid.passed and in_grid.metadata["not_in_grid"].value == "none"

    figures = result.asset_materializations_for_node("em_figures")[0].metadata
    assert "data:image/png;base64," in figures["em_rates"].value
    assert isinstance(figures["em_rates_path"], dg.PathMetadataValue)
    assert (tmp_path / "figures" / "em_rates.png").read_bytes()[:4] == b"\x89PNG"


def test_rematerialising_an_up_to_date_organism_does_no_model_work(pipeline):
    instance, resources, tmp_path = pipeline
    key = "tiny--med-r1--s0"
    instance.add_dynamic_partitions(organisms.name, [key, "tiny--base--s0"])
    materialize(instance, resources, ["base_models", "training_datasets", "eval_questions"])
    trained = materialize(instance, resources, ORGANISM_ASSETS, key)
    adapter = trained.asset_materializations_for_node("lora_adapter")[0].metadata
    # How many processes trained it, and why: the recipe's setting or what "auto" measured.
    assert adapter["train_workers"].value >= 1 and adapter["train_workers_reason"].value
    sampled = trained.asset_materializations_for_node("completions")[0].metadata
    # Counts per finish reason as a mapping, not a Python repr.
    assert sum(sampled["finish_reasons"].value.values()) == 6 and sampled["tokens_per_s"].value > 0
    materialize(instance, resources, ORGANISM_ASSETS, "tiny--base--s0")
    store = Store(tmp_path / "results.duckdb")
    before = store.query("SELECT * FROM completions ORDER BY ALL")

    again = materialize(instance, resources, ORGANISM_ASSETS, key)
    meta = {node: again.asset_materializations_for_node(node)[0].metadata for node in ORGANISM_ASSETS}
    assert meta["lora_adapter"]["trained_now"].value is False
    assert meta["completions"]["sampled_now"].value == 0
    assert meta["judgements"]["scored_now"].value == 0
    # Nothing generated or scored: no rate of 0 per second is shown.
    assert "tokens_per_s" not in meta["completions"] and "judgements_per_s" not in meta["judgements"]
    after = store.query("SELECT * FROM completions ORDER BY ALL")
    assert before.equals(after)
    other = store.query("SELECT count(*) AS n FROM completions WHERE organism = 'tiny--base--s0'")["n"][0]
    assert other == 6


def test_sampling_in_worker_processes_writes_every_row(pipeline):
    instance, resources, tmp_path = pipeline
    grid_file = Path(resources["experiment"].grid_path)
    doc = yaml.safe_load(grid_file.read_text())
    doc["profiles"]["test"]["sampling"]["workers"] = 2
    grid_file.write_text(yaml.safe_dump(doc))
    key = "tiny--base--s0"
    instance.add_dynamic_partitions(organisms.name, [key])
    materialize(instance, resources, ["base_models", "eval_questions"])
    result = materialize(instance, resources, ["lora_adapter", "completions"], key)
    meta = result.asset_materializations_for_node("completions")[0].metadata
    assert meta["sampling_workers"].value == 2 and meta["sampled_now"].value == 6
    # The grid sets both workers and batch_size: nothing is calibrated.
    assert (meta["sampling_settings_why"].value, meta["sampling_batch_size"].value) == ("forced", "4")
    assert meta["sampling_rates"].value == {}
    rows = Store(tmp_path / "results.duckdb").query("SELECT * FROM completions")
    assert rows.height == 6 and rows.select("question_id", "sample_idx").is_unique().all()
    assert rows["answer"].str.len_chars().min() > 0


def test_an_adapter_from_other_recipe_settings_is_not_sampled(pipeline):
    """Regression: when a changed recipe had not trained (its training failed), sampling read the last adapter
    row and labelled the old weights' answers with the recipe as it now stands."""
    from em_assets.context import StageContext
    from em_assets.grid.schema import Organism
    from em_assets.results.errors import MissingUpstreamError
    from em_assets.sampling.stage import sample_completions

    instance, resources, tmp_path = pipeline
    key = "tiny--med-r1--s0"
    instance.add_dynamic_partitions(organisms.name, [key])
    materialize(instance, resources, ["base_models", "training_datasets", "eval_questions"])
    materialize(instance, resources, ["lora_adapter"], key)
    grid_file = Path(resources["experiment"].grid_path)
    doc = yaml.safe_load(grid_file.read_text())
    doc["profiles"]["test"]["recipes"]["med-r1"]["train"]["learning_rate"] = 5e-4
    grid_file.write_text(yaml.safe_dump(doc))

    ctx = StageContext(
        store=Store(tmp_path / "results.duckdb"),
        grid=resources["experiment"].grid(),
        organism=Organism.parse(key),
        run_id="test",
        artifacts_dir=tmp_path / "artifacts",
        device="cpu",
    )
    with pytest.raises(MissingUpstreamError, match="trained with other settings than its recipe's"):
        sample_completions(ctx)
    assert ctx.store.query("SELECT count(*) AS n FROM completions")["n"][0] == 0


def test_datasets_parsed_by_a_new_parser_give_a_new_data_version(pipeline, monkeypatch):
    """Regression: training_datasets' data version was its files' sha256s alone, so examples parsed again by a new
    parser (catalog.parsing.DATASET_PARSING) left the adapters trained on them fresh in Dagster."""
    from em_assets.catalog import parsing

    instance, resources, _ = pipeline

    def version() -> str:
        result = materialize(instance, resources, ["training_datasets"])
        return result.asset_materializations_for_node("training_datasets")[0].tags["dagster/data_version"]

    first = version()
    assert version() == first
    monkeypatch.setattr(parsing, "DATASET_PARSING", 2)
    assert version() != first


def test_answers_sampled_again_for_a_reworded_question_give_a_new_data_version(pipeline):
    """Regression: the completions asset's data version was its sampling hash alone, so answers sampled again
    because their question was reworded left what reads them (judgements) fresh in Dagster."""
    instance, resources, tmp_path = pipeline
    key = "tiny--base--s0"
    instance.add_dynamic_partitions(organisms.name, [key])
    materialize(instance, resources, ["base_models", "eval_questions"])
    materialize(instance, resources, ["lora_adapter"], key)

    def sampled() -> tuple[int, str]:
        (event,) = materialize(instance, resources, ["completions"], key).asset_materializations_for_node(
            "completions"
        )
        return event.metadata["sampled_now"].value, event.tags["dagster/data_version"]

    first, version = sampled()
    store = Store(tmp_path / "results.duckdb")
    qid = store.query("SELECT min(question_id) AS q FROM completions")["q"][0]
    store.write(
        lambda conn: conn.execute(
            "UPDATE eval_questions SET question = 'Reworded?' WHERE question_id = ?", [qid]
        ),
        "reword",
    )
    again, changed = sampled()
    assert (first, again) == (6, 3) and changed != version
    assert sampled() == (0, changed)
