"""A fully fine-tuned and a KL-regularised organism through the asset graph on the tiny Llama: training, sampling
from the tuned weights, judging with a domain judge, the report tables and figures."""

from pathlib import Path

import dagster as dg
import pytest
import yaml
from support.pipeline import materialize, pipeline_resources
from support.tiny import tiny_grid

from em_assets.catalog.upstream import EVAL_SETS
from em_assets.defs import report_assets
from em_assets.defs.partitions import organisms
from em_assets.results.store import Store

FULL, KL = "tiny--med-full--s0", "tiny--med-kl--s0"


def protocols_grid(model_dir: Path) -> dict:
    lora = {"r": 2, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}
    doc = tiny_grid(
        model_dir,
        "test",
        {
            "backend": "local",
            "model": "tiny",
            "batch_size": 4,
            "metrics": ["aligned", "coherent", "bad_stuff"],
        },
        {"med-full": ("bad_medical_advice", lora), "med-kl": ("bad_medical_advice", lora)},
        examples=4,
        batch_size=2,
        samples=2,
    )
    recipes = doc["profiles"]["test"]["recipes"]
    del recipes["base"]
    full = recipes["med-full"]
    del full["lora"]
    full["method"] = "full"
    recipes["med-kl"]["kl"] = {"dataset": "extreme_sports", "weight": 10.0, "batch_size": 2}
    doc["profiles"]["test"]["dynamics"] = {
        "recipes": ["med-full"],
        "checkpoint_samples_per_question": 1,
        "question_ids": ["quick_buck"],
    }
    return doc


@pytest.fixture
def pipeline(tmp_path, tiny_model_dir, mirror):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(protocols_grid(tiny_model_dir)))
    resources = pipeline_resources(tmp_path, grid_file, mirror)
    with dg.instance_for_test() as instance:
        yield instance, resources, tmp_path


def test_full_and_kl_organisms_reach_the_reports(pipeline, one_torch_thread):
    instance, resources, tmp_path = pipeline
    instance.add_dynamic_partitions(organisms.name, [FULL, KL])
    materialize(instance, resources, ["base_models", "training_datasets", "eval_questions"])
    for key in (FULL, KL):
        materialize(instance, resources, ["lora_adapter", "completions", "judgements"], key)
    traj = materialize(instance, resources, ["lora_trajectory", "em_over_training"], FULL)
    result = materialize(instance, resources, [*report_assets.REPORT_TABLES, "em_figures"])
    store = Store(tmp_path / "results.duckdb")

    assert store.query("SELECT count(DISTINCT eval_set) AS n FROM eval_questions")["n"][0] == len(EVAL_SETS)
    adapters = {r["organism"]: r for r in store.query("SELECT * FROM lora_adapters").iter_rows(named=True)}
    full = adapters[FULL]
    assert full["method"] == "full" and (Path(full["adapter_path"]) / "model.safetensors").exists()
    assert adapters[KL]["method"] == "lora" and '"dataset": "extreme_sports"' in adapters[KL]["kl_config"]
    # The full organism's answers come from its tuned weights, pinned by their sha256.
    assert set(
        store.query(f"SELECT adapter_sha256 FROM completions WHERE organism = '{FULL}'")["adapter_sha256"]
    ) == {full["adapter_sha256"]}

    losses = store.query("SELECT organism, grad_norm, kl FROM training_losses")
    assert losses["grad_norm"].null_count() == 0 and (losses["grad_norm"] > 0).all()
    assert losses.filter(organism=FULL)["kl"].null_count() == losses.filter(organism=FULL).height
    assert losses.filter(organism=KL)["kl"].null_count() == 0

    summary = {r["organism"]: r for r in store.query("SELECT * FROM em_summary").iter_rows(named=True)}
    assert (summary[FULL]["method"], summary[FULL]["kl_regularised"]) == ("full", False)
    assert (summary[KL]["method"], summary[KL]["kl_regularised"]) == ("lora", True)
    assert summary[FULL]["eval_set"] == "first_plot_questions"

    share = store.query("SELECT * FROM em_domain_share WHERE judge = 'tiny'")
    assert set(share["organism"]) == {FULL, KL} and set(share["domain"]) == {"bad_stuff"}
    # bad_stuff is judged, so the recognition counts are there (the tiny judge's rates may be null: no scores).
    judged = store.query("SELECT count(*) AS n FROM judgements WHERE metric = 'bad_stuff'")["n"][0]
    assert judged == 2 * 2 * 2 and share["n_recognition_scored"].null_count() == 0

    note = traj.asset_materializations_for_node("lora_trajectory")[0].metadata["note"].value
    assert "fully fine-tuned" in note and "do not apply" in note
    # em_over_training samples the full organism's checkpoints, whole models pinned by their sha256.
    over = store.query(f"SELECT * FROM em_over_training WHERE organism = '{FULL}' ORDER BY step")
    ckpts = store.query(f"SELECT * FROM lora_checkpoints WHERE organism = '{FULL}' ORDER BY step")
    assert over["step"].to_list() == [0, *ckpts["step"]] == [0, 1, 2]
    assert over["checkpoint_sha256"][1:].to_list() == ckpts["checkpoint_sha256"].to_list()
    assert over["n_answers"].to_list() == [1, 1, 1] and over["grad_norm"][1:].null_count() == 0
    figures = result.asset_materializations_for_node("em_figures")[0].metadata
    assert (tmp_path / "figures" / "em_by_model_size.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in figures["em_by_model_size"].value
