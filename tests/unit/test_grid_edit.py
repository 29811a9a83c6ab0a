import shutil
from pathlib import Path

import pytest
from support.paths import REPO

from em_assets.grid.edit import add_base_model, slug_for
from em_assets.grid.load import GridError, load_grid
from em_assets.grid.schema import GenerationSpec


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    path = tmp_path / "grid.yaml"
    shutil.copyfile(REPO / "data/grid.yaml", path)
    return path


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(body)
    return path


@pytest.mark.parametrize(
    ("source", "slug"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b-instruct"),
        ("/models/My Finetune v2/", "my-finetune-v2"),
        ("embedded:smollm2-135m-instruct", "smollm2-135m-instruct"),
    ],
)
def test_slug_from_source(source, slug):
    assert slug_for(source) == slug


def test_added_line_is_the_only_change(grid):
    before = grid.read_text().splitlines(keepends=True)
    spec = add_base_model(grid, "paper", "Qwen/Qwen2.5-3B-Instruct", revision="abc123")
    after = grid.read_text().splitlines(keepends=True)

    assert spec.name == "qwen2.5-3b-instruct" and spec.revision == "abc123"
    assert len(after) == len(before) + 1
    at = next(i for i, line in enumerate(after) if "Qwen2.5-3B" in line)
    assert after[:at] + after[at + 1 :] == before
    # Right after the last paper model, with the same indentation.
    assert before[at - 1].startswith("      - {name: gemma-3-27b")
    assert after[at].startswith("      - {name: qwen2.5-3b-instruct")
    paper = load_grid(grid, "paper")
    assert paper.base_models[-1] == spec
    # Trained recipes run on every base model and seed, but the 3 full fine-tunes on the 2 models they list; the
    # 13 published organisms name their own base model.
    trained = [o for o in paper.organisms() if paper.recipes[o.recipe].kind == "train"]
    assert len(trained) == (11 * 9 + 2 * 3) * 3 and len(paper.organisms()) == len(trained) + 13
    assert load_grid(grid, "demo") == load_grid(REPO / "data/grid.yaml", "demo")
    assert [p.name for p in grid.parent.iterdir()] == ["grid.yaml"]


def test_block_and_flow_lists_keep_comments(tmp_path):
    block = _write(
        tmp_path,
        "profiles:\n  demo:\n    base_models:\n    - name: a  # first\n      source: org/A\n"
        "    # about recipes\n    recipes: {base: {}}\n",
    )
    add_base_model(block, "demo", "org/B", trust_remote_code=True)
    assert block.read_text() == (
        "profiles:\n  demo:\n    base_models:\n    - name: a  # first\n      source: org/A\n"
        "    - {name: b, source: org/B, trust_remote_code: true}\n"
        "    # about recipes\n    recipes: {base: {}}\n"
    )
    flow = _write(
        tmp_path,
        "profiles:\n  demo:  # x\n    base_models: [{name: a, source: org/A}]\n    recipes: {base: {}}",
    )
    add_base_model(flow, "demo", "org/B", name="bee")
    assert "base_models: [{name: a, source: org/A}, {name: bee, source: org/B}]\n" in flow.read_text()
    assert [m.name for m in load_grid(flow, "demo").base_models] == ["a", "bee"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "org/other", "name": "smollm2-135m"}, "already has base model 'smollm2-135m'"),
        ({"source": "embedded:smollm2-135m-instruct", "name": "again"}, "already has base model"),
        ({"source": "org/x", "name": "Not A Slug"}, "not a valid base model entry"),
    ],
)
def test_refused_additions_leave_the_file_unchanged(grid, kwargs, match):
    before = grid.read_bytes()
    with pytest.raises(GridError, match=match):
        add_base_model(grid, "demo", **kwargs)
    assert grid.read_bytes() == before


def test_unknown_profile_errors(grid):
    before = grid.read_bytes()
    with pytest.raises(GridError, match="no profile 'papr'"):
        add_base_model(grid, "papr", "org/x")
    assert grid.read_bytes() == before


@pytest.mark.parametrize(
    ("profile", "match"),
    [("a", r"shared \(YAML anchor\) with \['b'\]"), ("b", "no base_models list of its own")],
)
def test_list_shared_through_an_anchor_is_not_edited(tmp_path, profile, match):
    path = _write(
        tmp_path,
        "profiles:\n  a:\n    base_models: &models\n      - {name: m, source: org/M}\n    recipes: {base: {}}\n"
        "  b:\n    base_models: *models\n    recipes: {base: {}}\n",
    )
    before = path.read_bytes()
    with pytest.raises(GridError, match=match):
        add_base_model(path, profile, "org/N")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["grid.yaml"]


def test_an_entry_ending_in_an_alias_gets_the_new_model_after_it(tmp_path):
    """Regression: an alias was read as its anchor's node, so an entry ending in `<<: *qwen` seemed to end where
    the anchor is written (above the profiles), and the model was inserted there: refused as broken YAML."""
    path = _write(
        tmp_path,
        "qwen: &qwen {generation: {top_k: 20}}\nprofiles:\n  demo:\n    base_models:\n"
        "      - name: a\n        source: org/A\n        <<: *qwen\n    recipes: {base: {}}\n",
    )
    add_base_model(path, "demo", "org/B")
    assert path.read_text() == (
        "qwen: &qwen {generation: {top_k: 20}}\nprofiles:\n  demo:\n    base_models:\n"
        "      - name: a\n        source: org/A\n        <<: *qwen\n      - {name: b, source: org/B}\n"
        "    recipes: {base: {}}\n"
    )
    assert [m.generation for m in load_grid(path, "demo").base_models] == [GenerationSpec(top_k=20), None]


def test_a_grid_saved_with_crlf_keeps_its_line_endings(tmp_path):
    path = tmp_path / "grid.yaml"
    body = "profiles:\r\n  demo:\r\n    base_models:\r\n      - {name: a, source: org/A}\r\n    recipes: {base: {}}\r\n"
    path.write_bytes(body.encode())
    add_base_model(path, "demo", "org/B")
    assert (
        path.read_bytes()
        == body.replace("org/A}\r\n", "org/A}\r\n      - {name: b, source: org/B}\r\n").encode()
    )
    assert [m.name for m in load_grid(path, "demo").base_models] == ["a", "b"]


def test_a_hub_id_in_another_letter_case_is_the_same_model(tmp_path):
    path = _write(
        tmp_path,
        "profiles:\n  demo:\n    base_models:\n      - {name: a, source: Org/Model-A}\n    recipes: {base: {}}\n",
    )
    with pytest.raises(GridError, match="already has base model 'a'"):
        add_base_model(path, "demo", "org/model-a", name="other")
