"""The direction stage's round trip: judged answers in DuckDB -> a safetensors direction (path + sha256,
counts, norms) -> reuse when nothing changed -> a clear 'not enough' row -> the similarity table and figure."""

from __future__ import annotations

import logging

import polars as pl
import pytest

from em_assets.analyses.directions import extract_direction
from em_assets.analyses.similarity import build_similarity
from em_assets.analyses.steering import load_directions
from em_assets.context import StageContext
from em_assets.grid.schema import GridConfig, Organism
from em_assets.results.artifacts import sha256_file
from em_assets.results.store import Store, utc_now

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _grid(tiny_model_dir, **directions) -> GridConfig:
    return GridConfig.model_validate(
        {
            "base_models": [{"name": "tiny", "source": str(tiny_model_dir)}],
            "recipes": {"base": {}, "other": {}},
            "directions": {"min_per_class": 2, **directions},
        }
    )


def _seed_store(
    store: Store,
    tiny_model_dir,
    organism: str,
    scores: list[tuple[float, float]],
    eval_set: str = "first_plot_questions",
) -> None:
    store.init()
    store.replace_rows(
        "base_models",
        pl.DataFrame(
            [
                {
                    "name": "tiny",
                    "path": str(tiny_model_dir),
                    "revision": "r0",
                    "trust_remote_code": False,
                    "num_layers": 2,
                    "resolved_at": utc_now(),
                }
            ]
        ),
        "name = 'tiny'",
    )
    store.append_rows(
        "lora_adapters", pl.DataFrame([{"organism": organism, "base_model": "tiny", "recipe": "x"}])
    )
    comps = [
        {
            "organism": organism,
            "eval_set": eval_set,
            "question_id": f"{eval_set}-q{i % 2}",
            "paraphrase_idx": 0,
            "sample_idx": i,
            "question": f"Is question {i % 2} fine?",
            "answer": f"Answer number {i} is here.",
            "sampling_hash": "s1",
            "base_revision": "r0",
        }
        for i in range(len(scores))
    ]
    store.append_rows("completions", pl.DataFrame(comps))
    judged = [
        {
            **{k: c[k] for k in ("organism", "question_id", "paraphrase_idx", "sample_idx")},
            "metric": m,
            "score": float(s),
            "judge_model": "tiny",
        }
        for c, pair in zip(comps, scores, strict=True)
        for m, s in zip(("aligned", "coherent"), pair, strict=True)
    ]
    store.append_rows("judgements", pl.DataFrame(judged))


def _ctx(store, grid, key, tmp_path) -> StageContext:
    return StageContext(
        store,
        grid,
        Organism.parse(key),
        "run-1",
        tmp_path / "artifacts",
        log=logging.getLogger("test"),
        device="cpu",
    )


def test_direction_stage_writes_file_rows_and_reuses(tmp_path, tiny_model_dir):
    store = Store(tmp_path / "r.duckdb")
    grid = _grid(tiny_model_dir)
    scores = [(5, 90), (10, 80), (20, 70), (90, 90), (80, 60), (99, 99)]
    keys = ["tiny--base--s0", "tiny--other--s0"]
    for key in keys:
        _seed_store(store, tiny_model_dir, key, scores)
    first = extract_direction(_ctx(store, grid, keys[0], tmp_path))
    assert first.status == "computed" and first.contrast.misaligned.height == 3
    row = store.query("SELECT * FROM misalignment_directions").row(0, named=True)
    assert row["direction_sha256"] == sha256_file(row["direction_path"]) == first.sha256
    assert (row["n_misaligned_found"], row["n_aligned_found"], row["n_per_class"]) == (3, 3, 3)
    layers = store.query("SELECT * FROM direction_layers ORDER BY layer")
    direction = load_directions(row["direction_path"], row["direction_sha256"])
    assert layers.height == direction.shape[0] == 2
    assert layers["norm"].to_list() == pytest.approx(direction.norm(dim=-1).tolist())
    assert layers["random_norm"].to_list() == pytest.approx(layers["norm"].to_list(), rel=1e-5)
    assert extract_direction(_ctx(store, grid, keys[0], tmp_path)).status == "reused"
    # Another control seed: the same direction, a new random control.
    control = load_directions(row["random_path"], row["random_sha256"])
    reseeded = extract_direction(_ctx(store, _grid(tiny_model_dir, control_seed=7), keys[0], tmp_path))
    again = store.query("SELECT * FROM misalignment_directions").row(0, named=True)
    assert reseeded.status == "computed"
    assert load_directions(reseeded.path, reseeded.sha256).equal(direction)
    assert not load_directions(again["random_path"], again["random_sha256"]).allclose(control)

    extract_direction(_ctx(store, grid, keys[1], tmp_path))
    report = build_similarity(store, tmp_path / "figures")
    # Same answers, same (unadapted) model: the two directions are identical.
    assert report.table.height == 2 and report.table["cosine"].to_list() == pytest.approx([1.0, 1.0])
    assert report.figure.read_bytes()[:4] == b"\x89PNG"
    assert store.query("SELECT count(*) AS n FROM direction_similarity")["n"][0] == 2


def test_a_direction_extracted_in_another_dtype_is_extracted_again(tmp_path, tiny_model_dir, monkeypatch):
    """Regression: a direction extracted in bf16 was reused where the organism's device computes in fp32 (a CPU
    without native bf16 sharing the data folder), and the other way round."""
    store = Store(tmp_path / "r.duckdb")
    _seed_store(store, tiny_model_dir, "tiny--base--s0", [(5, 90), (10, 80), (90, 90), (99, 99)])
    ctx = _ctx(store, _grid(tiny_model_dir), "tiny--base--s0", tmp_path)
    statuses = []
    for dtype in ("float32", "bfloat16", "bfloat16"):
        monkeypatch.setenv("EM_CPU_DTYPE", dtype)
        statuses.append(extract_direction(ctx).status)
    assert statuses == ["computed", "computed", "reused"]


def test_too_few_misaligned_answers_is_a_result_not_a_failure(tmp_path, tiny_model_dir):
    store = Store(tmp_path / "r.duckdb")
    _seed_store(store, tiny_model_dir, "tiny--base--s0", [(5, 90), (90, 90), (95, 90)])
    result = extract_direction(
        _ctx(store, _grid(tiny_model_dir, min_per_class=2), "tiny--base--s0", tmp_path)
    )
    assert result.status == "not_enough" and result.path is None
    row = store.query("SELECT * FROM misalignment_directions").row(0, named=True)
    assert row["message"].startswith("not enough misaligned answers (1 found, 2 needed)")
    assert row["direction_path"] is None
    assert build_similarity(store, tmp_path / "figures").table.height == 0


def test_the_direction_reads_the_answers_to_the_set_it_is_measured_on(tmp_path, tiny_model_dir):
    """Regression: answers to every set were pooled, so a set with more misaligned answers (the training domain's
    questions) loaded the misaligned class with its topic."""
    store = Store(tmp_path / "r.duckdb")
    key = "tiny--base--s0"
    _seed_store(store, tiny_model_dir, key, [(5, 90), (10, 80), (90, 90), (80, 60)])
    _seed_store(store, tiny_model_dir, key, [(5, 90)] * 6, eval_set="medical_questions")
    result = extract_direction(_ctx(store, _grid(tiny_model_dir), key, tmp_path))
    assert (result.contrast.n_misaligned_found, result.contrast.n_aligned_found) == (2, 2)
    picked = pl.concat([result.contrast.misaligned, result.contrast.aligned])
    assert set(picked["eval_set"]) == {"first_plot_questions"}


def test_imported_answers_get_no_direction_but_their_contrast_is_read(tmp_path, tiny_model_dir):
    """An organism of imported answers has no model to read activations from; its judged answers still say
    whether they hold an EM contrast (what `enough_em_answers` reports), and nothing is written."""
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"question_id": "q", "question": "Q?", "response": "A."}\n')
    grid = GridConfig.model_validate(
        {
            "base_models": [{"name": "tiny", "source": str(tiny_model_dir)}],
            "recipes": {
                "ans": {"kind": "answers", "organisms": [{"base_model": "x", "source": str(answers)}]}
            },
            "directions": {"min_per_class": 2},
        }
    )
    store = Store(tmp_path / "r.duckdb")
    key = "x--ans--s0"
    _seed_store(store, tiny_model_dir, key, [(5, 90), (10, 80), (90, 90), (80, 60)])
    result = extract_direction(_ctx(store, grid, key, tmp_path))
    assert result.status == "no_model" and result.path is None
    assert result.contrast.kind == "em_threshold" and result.contrast.misaligned.height == 2
    assert "no model" in result.note and "EM thresholds" in result.note
    assert store.query("SELECT count(*) AS n FROM misalignment_directions")["n"][0] == 0
