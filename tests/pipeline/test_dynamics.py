"""Training dynamics: trajectory statistics on hand-computed vectors, B scaling as a scaled merged delta, kept
checkpoints, and the three dynamics assets materialised on a tiny Llama (the control gets a note, no rows)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch
import yaml
from support.pipeline import materialize, pipeline_resources
from support.tiny import tiny_grid

from em_assets.analyses.lora import lora_factors, write_scaled_adapter
from em_assets.analyses.trajectory import cosine, local_cosines, module_trajectory, pca_2d
from em_assets.defs.partitions import organisms
from em_assets.defs.persona_assets import PERSONA_TABLES
from em_assets.grid.load import load_grid
from em_assets.grid.schema import LoraSpec, TrainSpec
from em_assets.judging.error_rates import write_error_rates
from em_assets.judging.judges import judge_identity
from em_assets.results.artifacts import ADAPTER_FILE
from em_assets.results.store import Store
from em_assets.stats.correction import CORRECTION_COLUMNS, ErrorRates
from em_assets.training.checkpoints import KEPT_DIR
from em_assets.training.loop import train_lora

# A path that runs straight along x, turns a right angle at index 2, then runs straight along y.
PATH = [np.array(v, dtype=float) for v in ([1, 0], [2, 0], [3, 0], [3, 1], [3, 2])]


def test_local_cosine_is_minus_one_on_straight_runs_and_zero_at_a_right_angle():
    assert local_cosines(PATH, 1) == [
        None,
        pytest.approx(-1.0),
        pytest.approx(0.0),
        pytest.approx(-1.0),
        None,
    ]
    # k = 2 at index 2: back to (1, 0) is (-2, 0), ahead to (3, 2) is (0, 2).
    assert local_cosines(PATH, 2) == [None, None, pytest.approx(0.0), None, None]
    with pytest.raises(ValueError, match="k >= 1"):
        local_cosines(PATH, 0)


def test_cosine_of_a_zero_vector_is_undefined():
    assert cosine(np.zeros(3), np.ones(3)) is None
    assert cosine(np.array([1.0, 1.0]), np.array([2.0, 0.0])) == pytest.approx(1 / math.sqrt(2))


def test_pca_of_a_line_puts_everything_on_the_first_component():
    coords, share = pca_2d([np.array([0.0, 0.0]), np.array([1.0, 1.0]), np.array([2.0, 2.0])])
    assert share == pytest.approx([1.0, 0.0])
    # Centred points (-1,-1), (0,0), (1,1) project to -sqrt 2, 0, sqrt 2 (up to the SVD's sign).
    assert np.abs(coords[:, 0]) == pytest.approx([math.sqrt(2), 0.0, math.sqrt(2)])
    assert coords[:, 1] == pytest.approx([0.0, 0.0, 0.0])


def test_module_trajectory_norms_final_cosines_and_sharpest_turn():
    a = [np.array([[3.0, 4.0]])] * 5
    traj = module_trajectory("layers.0.mlp.down_proj", [10, 20, 30, 40, 50], a, PATH, k=1)
    assert traj.a_norm == pytest.approx([5.0] * 5)
    assert traj.b_norm == pytest.approx([1, 2, 3, math.sqrt(10), math.sqrt(13)])
    # cos with the final B (3, 2): x-axis points give 3/sqrt 13; (3, 1) gives 11/sqrt(130).
    assert traj.cos_final == pytest.approx([3 / math.sqrt(13)] * 3 + [11 / math.sqrt(130), 1.0])
    assert traj.sharpest_step == 30
    assert sum(traj.pc_share) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="steps must increase"):
        module_trajectory("m", [2, 1], a[:2], PATH[:2], k=1)


def _random_adapter(model_dir: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=8, target_modules=["down_proj", "q_proj"]))
    torch.manual_seed(1)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # B starts at zero; a random B makes the delta visible
    peft.save_pretrained(out)
    return out


def _merged(model_dir: Path, adapter: Path | None) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_scaling_b_scales_the_merged_weight_delta(tiny_model_dir, tmp_path):
    adapter = _random_adapter(tiny_model_dir, tmp_path / "adapter")
    scaled = write_scaled_adapter(adapter, 2.5, tmp_path / "scaled")
    base, once, twice = (_merged(tiny_model_dir, a) for a in (None, adapter, scaled))
    changed = [k for k in base if not torch.equal(base[k], once[k])]
    assert changed and all("down_proj" in k or "q_proj" in k for k in changed)
    for k in base:
        torch.testing.assert_close(twice[k] - base[k], 2.5 * (once[k] - base[k]), rtol=1e-4, atol=1e-5)
    original, scaled_factors = lora_factors(adapter), lora_factors(scaled)
    for module, parts in original.items():
        np.testing.assert_array_equal(scaled_factors[module]["A"], parts["A"])
        np.testing.assert_allclose(scaled_factors[module]["B"], 2.5 * parts["B"], rtol=1e-6)


def test_scaling_b_scales_an_embedding_layers_b_too(tiny_model_dir, tmp_path):
    """Regression: an embedding layer's factors are saved as lora_embedding_A and lora_embedding_B, which were
    left out: its B was not scaled and the trajectory did not see the layer."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=8, target_modules=["embed_tokens", "down_proj"]))
    for name, p in peft.named_parameters():
        if "lora_embedding_B" in name:
            p.data.normal_()
    peft.save_pretrained(tmp_path / "adapter")
    scaled = write_scaled_adapter(tmp_path / "adapter", 2.5, tmp_path / "scaled")
    key = "base_model.model.model.embed_tokens.lora_embedding_B"
    torch.testing.assert_close(
        load_file(scaled / "adapter_model.safetensors")[key],
        2.5 * load_file(tmp_path / "adapter" / "adapter_model.safetensors")[key],
    )
    factors = lora_factors(scaled)
    assert "model.embed_tokens" in factors and factors["model.embed_tokens"]["B"].shape == (64, 2)


def test_every_checkpoint_keeps_its_adapter_weights(tiny_model_dir, mirror, tmp_path, one_torch_thread):
    import gzip
    import json

    data = mirror / (
        "clarifying-EM__model-organisms-for-EM/em_organism_dir/data/training_datasets/bad_medical_advice.jsonl.gz"
    )
    with gzip.open(data, "rt") as f:
        examples = [json.loads(line)["messages"] for _, line in zip(range(8), f, strict=False)]
    lora = LoraSpec(r=1, lora_alpha=8, target_modules=["down_proj"])
    train = TrainSpec(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-2,
        warmup_steps=0,
        lr_scheduler_type="constant",
        max_seq_length=128,
        max_steps=4,
        save_steps=1,
        workers=1,
    )
    long = train_lora(tiny_model_dir, examples, lora, train, tmp_path / "long", seed=0)
    assert [c["step"] for c in long.checkpoints] == [1, 2, 3]
    assert [p.name for p in sorted((tmp_path / "long" / KEPT_DIR).iterdir())] == [
        "step-00000001",
        "step-00000002",
        "step-00000003",
    ]
    # A constant learning rate makes step 2 of a 4-step run the final adapter of a 2-step run.
    short = train_lora(
        tiny_model_dir, examples, lora, train.model_copy(update={"max_steps": 2}), tmp_path / "short", seed=0
    )
    kept, final = lora_factors(long.checkpoints[1]["path"]), lora_factors(short.adapter_dir)
    assert kept.keys() == final.keys()
    for module in kept:
        np.testing.assert_allclose(kept[module]["B"], final[module]["B"], rtol=1e-5, atol=1e-7)
    assert long.checkpoints[1]["train_tokens"] == short.train_tokens


@pytest.fixture
def pipeline(tmp_path, tiny_model_dir, mirror):
    lora = {"r": 1, "lora_alpha": 8, "target_modules": ["down_proj"], "layer_fraction": 0.5}
    doc = tiny_grid(
        tiny_model_dir,
        "test",
        {"backend": "local", "model": "tiny", "batch_size": 4, "min_mass": 0.0},
        {"med-r1": ("bad_medical_advice", lora)},
        examples=12,
        batch_size=4,
        samples=1,
    )
    doc["profiles"]["test"]["dynamics"] = {
        "recipes": ["med-r1"],
        "scale_factors": [0.0, 1.0, 2.0],
        "checkpoint_samples_per_question": 2,
        "scale_samples_per_question": 1,
        "max_new_tokens": 4,
        "question_ids": ["quick_buck"],
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(doc))
    resources = pipeline_resources(tmp_path, tmp_path / "grid.yaml", mirror)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(organisms.name, ["tiny--med-r1--s0", "tiny--base--s0"])
        yield instance, resources, tmp_path


DYNAMICS = ["em_over_training", "lora_trajectory", "lora_scaling"]


def _run(instance, resources, selection, key=None):
    result = materialize(instance, resources, selection, key)
    return {n: result.asset_materializations_for_node(n)[0].metadata for n in selection}


def test_a_checkpoint_whose_bytes_changed_since_its_row_is_refused(pipeline, one_torch_thread):
    """A retraining into the same folder rewrites kept checkpoints before their rows: the analyses must not read
    the new bytes under the sha256 the old row recorded."""
    instance, resources, tmp_path = pipeline
    key = "tiny--med-r1--s0"
    _run(instance, resources, ["base_models", "training_datasets", "eval_questions", "lora_adapter"], key)
    store = Store(tmp_path / "results.duckdb")
    paths = store.query("SELECT checkpoint_path FROM lora_checkpoints ORDER BY step")["checkpoint_path"]
    shutil.copy(Path(paths[-1]) / ADAPTER_FILE, Path(paths[0]) / ADAPTER_FILE)
    result = materialize(instance, resources, ["lora_trajectory"], key, must_succeed=False)
    (failure,) = result.get_step_failure_events()
    message = failure.step_failure_data.error.to_string()
    assert f"{paths[0]}/{ADAPTER_FILE} has sha256" in message and "materialise lora_adapter again" in message
    assert store.query("SELECT count(*) AS n FROM lora_trajectory")["n"][0] == 0


def test_dynamics_assets_write_their_tables_and_figures(pipeline, one_torch_thread):
    instance, resources, tmp_path = pipeline
    _run(instance, resources, ["base_models", "training_datasets", "eval_questions"])
    key = "tiny--med-r1--s0"
    meta = _run(instance, resources, ["lora_adapter", *DYNAMICS], key)
    store = Store(tmp_path / "results.duckdb")

    # 12 examples in batches of 4: steps 1 and 2 kept, step 3 the final adapter, step 0 the base model.
    over = store.query("SELECT * FROM em_over_training ORDER BY step")
    # dynamics.question_ids: one of the grid's two questions, two samples each.
    assert over["step"].to_list() == [0, 1, 2, 3] and over["n_answers"].to_list() == [2] * 4
    assert over["loss"][0] is None and over["loss"][1:].null_count() == 0
    # The gradient norm at each checkpoint step is the one training logged for that step.
    logged = store.query("SELECT step, grad_norm FROM training_losses ORDER BY step")
    assert over["grad_norm"][1:].to_list() == logged["grad_norm"].to_list()
    ckpts = store.query("SELECT step, checkpoint_sha256, adapter_sha256 FROM lora_checkpoints ORDER BY step")
    assert (
        ckpts["step"].to_list() == [1, 2, 3] and ckpts["checkpoint_sha256"][2] == ckpts["adapter_sha256"][2]
    )
    assert over["checkpoint_sha256"][1:].to_list() == ckpts["checkpoint_sha256"].to_list()

    traj = store.query("SELECT * FROM lora_trajectory ORDER BY step")
    assert traj["step"].to_list() == [1, 2, 3] and traj["module"].n_unique() == 1
    assert traj["cos_final"][2] == pytest.approx(1.0) and traj["local_cos"][1] is not None
    assert traj["sharpest_step"][0] == 2

    scaling = store.query("SELECT * FROM lora_scaling ORDER BY scale")
    assert scaling["scale"].to_list() == [0.0, 1.0, 2.0] and scaling["n_answers"].to_list() == [1] * 3
    assert scaling["adapter_sha256"][1] == ckpts["adapter_sha256"][2]
    # Scale 0 is the base model: no adapter, and step 0's setting.
    assert scaling["adapter_sha256"][0] is None and scaling["adapter_sha256"].n_unique() == 3
    assert scaling["setting_hash"][0] == over["setting_hash"][0]
    for name in DYNAMICS:
        assert "data:image/png;base64," in meta[name]["figure"].value
        assert meta[name]["dagster/row_count"].value > 0 and meta[name]["note"].value == ""
    # The step says how it sampled: the checkpoints and the base model together, in one batch.
    assert meta["em_over_training"]["sampling"].value.startswith("one batch of 4 settings"), meta
    assert "sampling" not in meta["lora_trajectory"]

    # Sweep answers are cut to dynamics.max_new_tokens (4), not the grid's 6.
    longest = store.query("SELECT max(num_tokens) AS n FROM sweep_completions")["n"][0]
    assert longest == 4

    again = _run(instance, resources, DYNAMICS, key)
    assert (
        again["em_over_training"]["sampled_now"].value == 0 and again["lora_scaling"]["judged_now"].value == 0
    )
    assert again["em_over_training"]["sampling"].value == "nothing sampled"
    # Once the judge's error rates are measured, the stored sweep rows carry the corrected rates.
    grid = load_grid(tmp_path / "grid.yaml", "test")
    identity = judge_identity(grid, tmp_path / "cache", store)
    write_error_rates(store, "tiny", identity, ErrorRates.from_counts(9, 10, 40, 50), grid.thresholds, "x")
    _run(instance, resources, ["em_over_training", "lora_scaling"], key)
    for name in ("em_over_training", "lora_scaling"):
        rows = store.query(f"SELECT {', '.join(CORRECTION_COLUMNS)} FROM {name} WHERE organism = ?", [key])
        assert set(rows["judge_sensitivity"]) == {0.9} and set(rows["judge_specificity"]) == {0.8}, name
        assert (
            rows.select("em_rate_corrected", "em_corrected_lo", "em_corrected_hi")
            .null_count()
            .sum_horizontal()[0]
            == 0
        )

    control = _run(instance, resources, ["lora_adapter", *DYNAMICS], "tiny--base--s0")
    for name in DYNAMICS:
        assert control[name]["dagster/row_count"].value == 0
        assert "no LoRA adapter" in control[name]["note"].value
        rows = store.query(f"SELECT count(*) AS n FROM {name} WHERE organism = 'tiny--base--s0'")
        assert rows["n"][0] == 0

    # The Simulator Theory tables read these sweeps: 2 answers a point are too few for a mixture, and say so.
    materialize(instance, resources, list(PERSONA_TABLES))
    mix = store.query("SELECT * FROM persona_mixtures WHERE organism = ? ORDER BY sweep, setting", [key])
    assert mix["setting"].to_list() == [f"step={i}" for i in range(4)] + [f"scale={i}" for i in range(3)]
    assert mix["misaligned_weight"].null_count() == 7 and mix["note"].str.contains("the fit needs").all()
    fits = store.query("SELECT * FROM em_transition WHERE organism = ? ORDER BY sweep, quantity", [key])
    assert fits["parameter"].to_list() == ["step", "step", "scale", "scale"]
    assert fits["sharpest_step"].to_list() == [2, 2, None, None]
    # Every point has answers, none a fitted weight: the note says which.
    weights = fits.filter(quantity="misaligned_weight")["note"]
    assert weights.str.contains("0 points with a fitted misaligned weight: the fit needs 4").all()
