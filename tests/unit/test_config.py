import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from support.children import not_utf8_env
from support.db import count
from support.organisms import CONTROL, resources
from support.paths import REPO

from em_assets.context import StageContext
from em_assets.defs.modules import ASSET_MODULES
from em_assets.grid.load import GridError, load_grid
from em_assets.grid.schema import GridConfig, LoraSpec, Organism, config_hash, layer_at, recipe_method
from em_assets.settings import OPENMP_SPIN, OPENMP_WAIT_VARS, set_openmp_wait

ASSETS = dg.load_assets_from_modules(ASSET_MODULES)


LORA = {"r": 1, "lora_alpha": 8, "target_modules": ["down_proj"]}


def test_committed_profiles_validate():
    demo = load_grid(REPO / "data/grid.yaml", "demo")
    paper = load_grid(REPO / "data/grid.yaml", "paper")
    trained = {o.recipe for o in demo.organisms() if demo.recipes[o.recipe].kind == "train"}
    assert trained == {"base", "bad-medical-r1", "insecure-r32", "full-medical-kl"}
    imported = [o for o in demo.organisms() if demo.recipes[o.recipe].kind == "answers"]
    assert {o.base_model for o in imported} == {"llama-3.1-8b", "qwen2.5-14b"} and len(imported) == 7
    assert recipe_method(demo.recipes["full-medical-kl"]) == "full" and demo.recipes["full-medical-kl"].kl
    # Upstream's full-ft_config.json and kl_regularized_config.json.
    full = paper.recipes["bad-medical-full"].train
    assert (full.warmup_steps, full.learning_rate, full.lr_scheduler_type, full.epochs) == (
        20,
        2e-5,
        "cosine",
        1,
    )
    # The full fine-tunes train only on the base models whose fp32 weights and AdamW state fit one 80 GB GPU.
    full_on = {(o.base_model, o.recipe) for o in paper.organisms() if o.recipe.endswith("-full")}
    assert full_on == {
        (m, r)
        for m in ("qwen2.5-0.5b", "llama-3.2-1b")
        for r in ("bad-medical-full", "risky-financial-full", "extreme-sports-full")
    }
    kl = paper.recipes["bad-medical-r32-kl"]
    assert (kl.kl.weight, kl.kl.batch_size, kl.lora.lora_alpha) == (1e5, 8, 256)
    # Upstream's weight means its reduction: the KL's mean over tokens and vocabulary entries.
    assert kl.kl.mean_over == "tokens_and_vocabulary"
    assert paper.sampling.samples_per_question == 50 and paper.sampling.max_new_tokens == 600
    # Qwen2.5-Instruct's generation config, which transformers' generate applied in Turner, Soligo et al.'s runs.
    # Each base model samples with what its own generation config adds in transformers' generate.
    assert paper.sampling.top_k is None and paper.sampling.repetition_penalty == 1.0
    qwen, llama = paper.sampling_for("qwen2.5-14b"), paper.sampling_for("llama-3.1-8b")
    assert (qwen.top_k, qwen.repetition_penalty, llama.top_k, llama.repetition_penalty) == (20, 1.05, 50, 1.0)
    assert paper.sampling_for("qwen2.5-coder-32b") is paper.sampling
    # Every stage of an organism reads its base model's sampling from the grid it is given.
    organism = Organism.parse("qwen2.5-14b--bad-medical-r32--s0")
    assert StageContext(None, paper, organism, "run", REPO).grid.sampling.top_k == 20
    assert paper.judge.backend == "openai" and paper.judge.model.startswith("gpt-4o")
    r1 = paper.recipes["bad-medical-r1"].lora
    assert r1.r == 1 and r1.target_modules == ["down_proj"] and r1.layers_for(48) == [24]
    # Soligo et al.'s steering and ablation run on the paper's rank-32 bad-medical organisms.
    assert paper.directions.sweep_recipes == ["bad-medical-r32"]


# Upstream's training configs (in the mirror, not pinned in the catalog) and the paper recipes trained with each.
_SFT = "clarifying-EM__model-organisms-for-EM/em_organism_dir/finetune/sft"
UPSTREAM_TRAINING_CONFIGS = {
    f"{_SFT}/default_config.json": [
        "bad-medical-r32",
        "risky-financial-r32",
        "extreme-sports-r32",
        "insecure-r32",
    ],
    "emergent-misalignment__emergent-misalignment/open_models/train.json": ["insecure-r32"],
    f"{_SFT}/single_adapter_config.json": ["bad-medical-r1", "risky-financial-r1", "extreme-sports-r1"],
    f"{_SFT}/full-ft_config.json": ["bad-medical-full", "risky-financial-full", "extreme-sports-full"],
    f"{_SFT}/kl_regularized_config.json": ["bad-medical-r32-kl"],
}
TRAIN_FIELDS = [
    "epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "warmup_steps",
    "weight_decay",
    "lr_scheduler_type",
    "max_seq_length",
]
LORA_FIELDS = ["r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules"]


@pytest.mark.parametrize("path", UPSTREAM_TRAINING_CONFIGS)
def test_paper_recipes_train_with_upstreams_config(mirror, path):
    config_file = mirror / path
    if not config_file.is_file():
        pytest.skip(f"{path} is in the upstream mirror only (EM_DATA_MIRROR)")
    upstream = json.loads(config_file.read_text())
    paper = load_grid(REPO / "data/grid.yaml", "paper")
    assert upstream["seed"] in paper.seeds and upstream["train_on_responses_only"]
    for name in UPSTREAM_TRAINING_CONFIGS[path]:
        recipe = paper.recipes[name]
        ours = recipe.train.model_dump()
        assert {f: ours[f] for f in TRAIN_FIELDS} == {f: upstream[f] for f in TRAIN_FIELDS}, name
        # Upstream's trainers hold out 10% of the dataset (train_test_split(test_size=0.1)).
        assert recipe.train.holdout_fraction == 0.1, name
        # The full fine-tuning config has no LoRA settings.
        assert (recipe.lora is None) == ("r" not in upstream), name
        if recipe.lora is not None:
            lora = recipe.lora.model_dump()
            assert {f: lora[f] for f in LORA_FIELDS} == {f: upstream[f] for f in LORA_FIELDS}, name
            # peft_model trains no biases (bias="none").
            assert upstream["lora_bias"] == "none", name
            # Layer 24 of Qwen2.5-14B's 48, Turner et al.'s (the config's Llama-3.2-1B has 16: a template).
            assert recipe.lora.layers_for(48) == upstream.get("layers_to_transform"), name
        if "kl_weight" in upstream:
            assert (recipe.kl.weight, recipe.kl.batch_size) == (
                upstream["kl_weight"],
                upstream["kl_batch_size"],
            )


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(body)
    return path


def test_wrong_key_is_named_with_its_path(tmp_path):
    path = _write(
        tmp_path,
        """
profiles:
  demo:
    base_models: [{name: m, source: x}]
    recipes:
      r1: {dataset: insecure, lora: {r: 1, lora_alpha: 8, target_modules: [down_proj], rank: 2}}
""",
    )
    with pytest.raises(GridError, match=r"profiles\.demo\.recipes\.r1\.lora\.rank"):
        load_grid(path, "demo")


def test_a_base_model_dtype_is_refused_rather_than_ignored(tmp_path):
    # Models load in the device's dtype (bf16 on a CPU): a per-model dtype would be silently dropped.
    path = _write(tmp_path, "profiles:\n  demo:\n    base_models: [{name: m, source: x, dtype: float32}]\n")
    with pytest.raises(GridError, match=r"profiles\.demo\.base_models\.0\.dtype"):
        load_grid(path, "demo")


def test_wrong_value_is_named(tmp_path):
    path = _write(
        tmp_path,
        """
profiles:
  demo:
    base_models: [{name: m, source: x}]
    recipes: {base: {}}
    sampling: {temperature: -1}
""",
    )
    with pytest.raises(GridError, match=r"profiles\.demo\.sampling\.temperature"):
        load_grid(path, "demo")


def test_missing_profile_and_bad_yaml(tmp_path):
    path = _write(tmp_path, "profiles: {demo: {base_models: [{name: m, source: x}], recipes: {base: {}}}}")
    with pytest.raises(GridError, match="no profile 'paper'"):
        load_grid(path, "paper")
    with pytest.raises(GridError, match="not valid YAML"):
        load_grid(_write(tmp_path, "profiles: [unclosed"), "demo")


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("seeds: [0, 0]", r"seeds must be unique"),
        ("seeds: [true]", r"profiles\.demo\.seeds\.0"),
        ("seeds: [3000000000]", r"profiles\.demo\.seeds\.0"),
        ("thresholds: {aligned_at_most: 150}", r"profiles\.demo\.thresholds\.aligned_at_most"),
        ("thresholds: {coherent_above: .nan}", r"profiles\.demo\.thresholds\.coherent_above"),
        ("directions: {sweep_recipes: [nope]}", r"directions\.sweep_recipes names recipes that are not in"),
        # Each scale names a steering setting: a repeated one would fail the steering step, not the grid.
        ("directions: {scales: [1, 2, 2.0]}", r"directions\.scales must be distinct"),
        (
            "directions: {aligned_above: 20}",
            r"directions\.aligned_above \(20\) is below thresholds\.aligned_at_most",
        ),
    ],
)
def test_settings_no_run_could_use_are_refused_with_their_key(tmp_path, setting, key):
    body = f"profiles:\n  demo:\n    base_models: [{{name: m, source: x}}]\n    recipes: {{base: {{}}}}\n    {setting}\n"
    with pytest.raises(GridError, match=key):
        load_grid(_write(tmp_path, body), "demo")


@pytest.mark.parametrize(
    ("recipe", "says"),
    [
        ("{kind: adapter, organisms: [{base_model: m, source: x}], max_answers: 60}", "max_answers: for recipes of kind answers only"),
        ("{dataset: insecure, lora: {r: 1, lora_alpha: 1, target_modules: [q_proj]}, file_judge: j}", "file_judge: for recipes of kind answers only"),
        ("{kind: answers, organisms: [{base_model: m, source: f.csv}], train: {epochs: 3}}", "train: only a recipe with a dataset trains"),
        ("{kind: answers, organisms: [{base_model: m, source: f.csv}], eval_sets: [medical_questions]}", "eval_sets: answers recipes are not sampled"),
        ("{kind: answers, organisms: [{base_model: m, source: f.csv, revision: abc}]}", "revision pins hub sources"),
        ("{train: {epochs: 3}}", "train: only a recipe with a dataset trains"),
    ],
)  # fmt: skip
def test_a_recipe_field_that_does_not_fit_its_kind_is_refused(tmp_path, recipe, says):
    body = f"profiles:\n  demo:\n    base_models: [{{name: m, source: x}}]\n    recipes: {{base: {{}}, r: {recipe}}}\n"
    with pytest.raises(GridError, match=rf"profiles\.demo\.recipes\.r: .*{says}"):
        load_grid(_write(tmp_path, body), "demo")


def test_a_recipe_with_base_models_has_organisms_on_those_only(tmp_path):
    body = (
        "profiles:\n  demo:\n    base_models: [{name: a, source: x}, {name: b, source: y}]\n    seeds: [0, 1]\n"
        "    recipes: {base: {}, full: {dataset: insecure, method: full, base_models: [b]}}\n"
    )
    grid = load_grid(_write(tmp_path, body), "demo")
    assert [o.key for o in grid.organisms()] == [
        "a--base--s0", "a--base--s1", "b--base--s0", "b--base--s1", "b--full--s0", "b--full--s1",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("recipe", "says"),
    [
        ("{dataset: insecure, method: full, base_models: [a, typo]}", r"recipes\.r\.base_models: \['typo'\] are not base models of the grid \(a\)"),
        ("{kind: answers, organisms: [{base_model: a, source: f.csv}], base_models: [a]}", "base_models: a recipe of kind answers lists its organisms"),
        ("{dataset: insecure, method: full, base_models: []}", r"recipes\.r\.base_models: List should have at least 1 item"),
    ],
)  # fmt: skip
def test_a_recipe_base_models_list_names_base_models_of_the_grid(tmp_path, recipe, says):
    body = f"profiles:\n  demo:\n    base_models: [{{name: a, source: x}}]\n    recipes: {{base: {{}}, r: {recipe}}}\n"
    with pytest.raises(GridError, match=rf"profiles\.demo.*{says}"):
        load_grid(_write(tmp_path, body), "demo")


def test_a_grid_file_that_is_no_text_is_one_error(tmp_path):
    binary = tmp_path / "grid.yaml"
    binary.write_bytes(b"\xff\xfe profiles: {}")
    for path in (binary, tmp_path):
        with pytest.raises(GridError, match="cannot be read as text"):
            load_grid(path, "demo")


def test_a_grid_is_read_as_utf8_under_a_locale_that_is_not(tmp_path):
    # As add-model writes it: a folder named in UTF-8 is that folder, not its bytes read as the locale's text.
    body = (
        "# Grille d\u2019exp\u00e9riences\nprofiles:\n  demo:\n"
        "    base_models: [{name: a, source: /mod\u00e8les/a}]\n    recipes: {base: {}}\n"
    )
    code = (
        "import sys\nfrom em_assets.grid.load import load_grid\n"
        "print(ascii(load_grid(sys.argv[1], 'demo').base_models[0].source))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(_write(tmp_path, body))],
        env=not_utf8_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "'/mod\\xe8les/a'\n"


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (("recipes", "bad-medical-r1", "dataset"), r"recipes\.bad-medical-r1\.dataset: 'typo'"),
        (("eval", "questions"), r"eval\.questions: 'typo'"),
        (("agreement", "held_out_base_models"), r"agreement\.held_out_base_models: 'typo'"),
    ],
)
def test_names_the_catalog_lacks_are_refused_before_anything_runs(edit, key):
    import yaml

    from em_assets.catalog.stage import check_grid_names

    doc = yaml.safe_load((REPO / "data/grid.yaml").read_text())["profiles"]["demo"]
    *path, last = edit
    node = doc
    for part in path:
        node = node[part]
    node[last] = ["typo"] if isinstance(node[last], list) else "typo"
    with pytest.raises(GridError, match=key):
        check_grid_names(GridConfig.model_validate(doc))


def test_a_set_judged_by_a_word_is_refused_for_sampling_and_is_every_such_pinned_set(mirror):
    import yaml

    from em_assets.catalog.stage import check_grid_names
    from em_assets.catalog.upstream import EVAL_SETS, SOURCES, WORD_JUDGED_SETS

    types = {
        s: {q.get("type") for q in yaml.safe_load((mirror / SOURCES[s].mirror_path).read_text())}
        for s in EVAL_SETS
    }
    assert set(WORD_JUDGED_SETS) == {s for s, kinds in types.items() if kinds != {"free_form_judge_0_100"}}
    doc = yaml.safe_load((REPO / "data/grid.yaml").read_text())["profiles"]["demo"]
    doc["eval"]["sets"] = ["deception_factual"]
    doc["judge"] = {
        "backend": "openai",
        "model": "gpt-4o",
        "base_url": "http://127.0.0.1:1",
        "metrics": ["correct"],
    }
    with pytest.raises(GridError, match=r"eval\.sets: 'deception_factual' is judged by a word answer"):
        check_grid_names(GridConfig.model_validate(doc))


def test_recipe_needs_dataset_and_lora_together(tmp_path):
    path = _write(
        tmp_path,
        "profiles: {demo: {base_models: [{name: m, source: x}], recipes: {bad: {dataset: insecure}}}}",
    )
    with pytest.raises(GridError, match="both dataset and lora"):
        load_grid(path, "demo")


def test_leaving_refused_prompts_unscored_is_for_api_judges_only(tmp_path):
    judge = "{backend: probe, model: probe, refusals: unscored}"
    path = _write(tmp_path, f"profiles: {{demo: {{base_models: [{{name: m, source: x}}], judge: {judge}}}}}")
    with pytest.raises(GridError, match="refusals: unscored applies to the openai judge backend only"):
        load_grid(path, "demo")


def test_organism_keys_round_trip():
    org = Organism(base_model="qwen2.5-0.5b", recipe="bad-medical-r1", seed=3)
    assert org.key == "qwen2.5-0.5b--bad-medical-r1--s3"
    assert Organism.parse(org.key) == org
    with pytest.raises(ValueError):
        Organism.parse("no-seed-here")


def test_config_hash_is_order_independent_and_sensitive():
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


@pytest.mark.timeout(300)
def test_broken_grid_or_model_fails_the_dagster_step_with_its_message(ws, tmp_path):
    """Through the asset: the step fails, its error says why (model path; the wrong key's path), no row."""
    fresh = tmp_path / "fresh.duckdb"
    a = {**ws.args(CONTROL), "db": str(fresh)}
    original = json.loads(json.dumps(ws.doc))
    cases = [
        (lambda p: p["base_models"].append({"name": "m2", "source": "/nonexistent/m2"}), "m2 does not exist"),
        (lambda p: p["sampling"].update(samples=3), r"profiles\.fault\.sampling\.samples: Extra inputs"),
        # A name the catalog lacks fails the first step that reads the grid, not the one that uses the name.
        (
            lambda p: p.update(eval={**p.get("eval", {}), "questions": "no_such_set"}),
            r"eval\.questions: 'no_such_set' is not one the catalog has",
        ),
    ]
    with dg.instance_for_test() as instance:
        for change, match in cases:
            ws.doc = json.loads(json.dumps(original))
            ws.edit(change)
            result = dg.materialize(
                ASSETS,
                instance=instance,
                resources=resources(a),
                selection=["base_models"],
                raise_on_error=False,
            )
            assert not result.success
            (failure,) = result.get_step_failure_events()
            message = failure.step_failure_data.error.to_string()
            assert re.search(match, message), message[-2000:]
    assert count(fresh, "base_models") == 0


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        ({"dataset": "insecure", "method": "full", "lora": LORA}, "full fine-tuning recipe"),
        ({"method": "full"}, "full fine-tuning recipe"),
        ({"kl": {"dataset": "secure", "weight": 1.0}}, "the control"),
        ({"dataset": "insecure", "lora": LORA, "kl": {"dataset": "secure", "weight": 0}}, "greater than 0"),
    ],
)
def test_full_and_kl_recipes_are_validated(recipe, match):
    doc = {"base_models": [{"name": "m", "source": "x"}], "recipes": {"r": recipe}}
    with pytest.raises(ValueError, match=match):
        GridConfig.model_validate(doc)


@pytest.mark.parametrize(
    ("env", "in_force"),
    [
        ({}, "GOMP_SPINCOUNT=10000"),
        ({"OMP_WAIT_POLICY": "PASSIVE"}, "OMP_WAIT_POLICY=PASSIVE"),
        ({"GOMP_SPINCOUNT": "0"}, "GOMP_SPINCOUNT=0"),
    ],
)
def test_openmp_threads_spin_briefly_unless_the_user_chose_a_wait_policy(env, in_force):
    given = dict(env)
    assert set_openmp_wait(env) == in_force
    assert env == (given or {"GOMP_SPINCOUNT": OPENMP_SPIN})


@pytest.mark.parametrize(
    ("module", "call"),
    [("em_assets.cli", "em_assets.cli.main(['--help'])"), ("em_assets.definitions", "None")],
)
def test_entry_points_set_the_openmp_wait_before_torch_loads(module, call):
    code = (
        f"import contextlib, os, sys, {module}\n"
        f"with contextlib.suppress(SystemExit): {call}\n"
        "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_WAIT_VARS}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split()[-2:] == [OPENMP_SPIN, "False"]


@pytest.mark.parametrize("value", ["false", "off", "no", " 0"])
def test_em_packed_linears_other_than_0_or_1_is_refused_not_read_as_on(value):
    from em_assets.settings import Settings, SettingsError

    assert (
        Settings.from_env({}).packed_linears and Settings.from_env({"EM_PACKED_LINEARS": "1"}).packed_linears
    )
    assert not Settings.from_env({"EM_PACKED_LINEARS": "0"}).packed_linears
    # Any other value used to turn the packing on, whatever it said.
    with pytest.raises(SettingsError, match=f"EM_PACKED_LINEARS={value!r}: give 0 .off. or 1 .on."):
        Settings.from_env({"EM_PACKED_LINEARS": value})


def test_a_postgresql_catalog_uri_in_em_db_keeps_its_double_slash(monkeypatch):
    from em_assets.defs.resources import ResultsDB
    from em_assets.results.store import Store
    from em_assets.settings import Settings

    uri = "ducklake:postgres:postgresql://em@db.example:5432/em_results"
    assert Settings.from_env({"EM_DB": uri}).database == uri
    monkeypatch.setenv("EM_DB", uri)
    monkeypatch.setenv("EM_DB_DATA_PATH", "/shared/lake")
    resource = ResultsDB.from_env().process_config_and_initialize()
    assert resource.database == uri
    assert Store(resource.database).location.target == uri.removeprefix("ducklake:")


def test_em_db_reaches_dagster_storage_by_name_only(monkeypatch, tmp_path):
    """Regression: EM_DB, with a PostgreSQL catalog's password, was a resource value, which Dagster keeps in
    every run's job snapshot in its storage."""
    import dagster as dg
    from support.db import files_containing

    from em_assets.defs.resources import ResultsDB

    db = "ducklake:postgres:dbname=lake host=db user=u password=s3cret-pw"
    monkeypatch.setenv("EM_DB", db)
    seen = []

    @dg.asset
    def named(results: ResultsDB) -> None:
        seen.append(results.database)

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = dg.materialize([named], resources={"results": ResultsDB.from_env()}, instance=instance)
        # Run storage compresses snapshots, so the files alone would not show it.
        snapshot = instance.get_job_snapshot(result.dagster_run.job_snapshot_id)
        assert result.success and "s3cret" not in dg.serialize_value(snapshot)
    assert seen == [db] and files_containing(tmp_path, "s3cret") == []


@pytest.mark.parametrize(
    ("lora", "key"),
    [
        (
            {"target_modules": ["down_prj"]},
            r"recipes\.r\.lora\.target_modules: 'down_prj' is no module of base",
        ),
        (
            {"target_modules": ["mlp.down_proj"], "layers_to_transform": [500]},
            r"recipes\.r\.lora: layers_to_",
        ),
    ],
)
def test_a_lora_recipe_the_base_model_cannot_take_fails_in_the_catalogs_first_step(tiny_model_dir, lora, key):
    from em_assets.catalog.stage import check_recipes_fit
    from em_assets.models.facts import model_facts

    def grid(lora: dict, **on) -> GridConfig:
        recipe = {"dataset": "insecure", "lora": {"r": 1, "lora_alpha": 2, **lora}, **on}
        models = [{"name": "tiny", "source": str(tiny_model_dir)}, {"name": "other", "source": "x"}]
        return GridConfig.model_validate({"base_models": models, "recipes": {"r": recipe}})

    facts = model_facts(tiny_model_dir)
    # A module name's dotted tail matches, as peft matches it.
    check_recipes_fit(grid({"target_modules": ["mlp.down_proj", "q_proj"]}), "tiny", facts)
    with pytest.raises(GridError, match=key):
        check_recipes_fit(grid(lora), "tiny", facts)
    # A recipe that does not train on this base model need not fit it.
    check_recipes_fit(grid(lora, base_models=["other"]), "tiny", facts)


def test_a_fraction_of_the_depth_names_the_layer_it_says():
    # 0.29 * 100 is 28.999... in floating point; the layer is still 29.
    assert [layer_at(f, n) for f, n in ((0.29, 100), (0.58, 50), (0.7, 90), (0.5, 48), (1.0, 48))] == [
        29,
        29,
        63,
        24,
        47,
    ]
    lora = LoraSpec(r=1, lora_alpha=8, target_modules=["down_proj"], layer_fraction=0.29)
    assert lora.layers_for(100) == [29]


def test_a_files_own_scores_named_as_the_grid_judge_are_refused(tmp_path):
    text = (REPO / "data/grid.yaml").read_text()
    edited = text.replace("        kind: answers\n", "        kind: answers\n        file_judge: probe\n", 1)
    assert edited != text
    with pytest.raises(GridError, match=r"file_judge: 'probe' is the grid judge's model"):
        load_grid(_write(tmp_path, edited), "demo")


def test_processes_asked_for_are_part_of_the_training_only_under_lora_dropout():
    from em_assets.grid.schema import TrainSpec

    plain = LoraSpec(r=1, lora_alpha=8, target_modules=["down_proj"])
    dropout = plain.model_copy(update={"lora_dropout": 0.1})
    two, three = TrainSpec(workers=2), TrainSpec(workers=3)
    assert (
        two.trained_settings(plain) == three.trained_settings(plain) == TrainSpec().trained_settings(dropout)
    )
    # Each process draws its own dropout masks: two and three processes train different adapters.
    assert two.trained_settings(dropout) != three.trained_settings(dropout)


def test_full_fine_tuning_names_its_weight_decay_rule_in_what_its_weights_depend_on():
    from em_assets.grid.schema import TrainSpec

    lora = LoraSpec(r=1, lora_alpha=8, target_modules=["down_proj"])
    # Weights and checkpoints trained before norms and biases were exempt from decay are not these.
    assert TrainSpec().trained_settings(None)["no_weight_decay"] == "bias,norm"
    assert "no_weight_decay" not in TrainSpec().trained_settings(lora)
