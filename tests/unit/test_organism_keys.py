"""Organism keys are unambiguous: names cannot hold the `--` that joins base model, recipe and seed."""

from __future__ import annotations

import pydantic
import pytest
import yaml
from support.paths import REPO

from em_assets.grid.load import GridError, load_grid
from em_assets.grid.schema import Organism


@pytest.mark.parametrize(
    ("base_model", "recipe", "seed"),
    [("qwen2.5-7b", "bad-medical-r1", 0), ("q", "a.b_c-d", 12), ("smollm2-135m", "control", -1)],
)
def test_a_key_parses_back_to_its_organism(base_model, recipe, seed):
    organism = Organism(base_model=base_model, recipe=recipe, seed=seed)
    assert Organism.parse(organism.key) == organism


@pytest.mark.parametrize("name", ["qwen--7b", "qwen-", "a---b"])
def test_names_with_the_key_separator_are_refused(name):
    with pytest.raises(pydantic.ValidationError, match="may not contain '--'"):
        Organism(base_model=name, recipe="control", seed=0)
    with pytest.raises(pydantic.ValidationError, match="may not contain '--'"):
        Organism(base_model="qwen", recipe=name, seed=0)


def test_names_dagster_would_read_as_a_range_of_partitions_are_refused():
    for fields in ({"base_model": "qwen...7b", "recipe": "control"}, {"base_model": "q", "recipe": "a...b"}):
        with pytest.raises(pydantic.ValidationError, match=r"may not contain '\.\.\.'"):
            Organism(**fields, seed=0)
    assert Organism(base_model="qwen2.5..7b", recipe="a.b", seed=0).key == "qwen2.5..7b--a.b--s0"


@pytest.mark.parametrize(
    "key", ["qwen--7b--bad-medical-r1--s0", "qwen--bad--s0--s1", "qwen--r", "qwen--r--seed0", "qwen--r--s"]
)
def test_ambiguous_or_malformed_keys_do_not_parse(key):
    with pytest.raises(ValueError):
        Organism.parse(key)


def _grid_with(tmp_path, edit) -> str:
    doc = yaml.safe_load((REPO / "data" / "grid.yaml").read_text())
    edit(doc["profiles"]["demo"])
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_the_grid_refuses_a_base_model_or_recipe_named_with_the_separator(tmp_path):
    def base_model(profile):
        profile["base_models"][0]["name"] = "qwen--7b"

    with pytest.raises(GridError, match=r"base_models\.0\.name: .*'qwen--7b': names may not contain '--'"):
        load_grid(_grid_with(tmp_path, base_model), "demo")

    def recipe(profile):
        name = next(iter(profile["recipes"]))
        profile["recipes"]["bad--medical"] = profile["recipes"].pop(name)

    with pytest.raises(GridError, match="'bad--medical': names may not contain '--'"):
        load_grid(_grid_with(tmp_path, recipe), "demo")
