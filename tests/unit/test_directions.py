"""The misalignment direction on a tiny random Llama: the mean difference by hand, steering and ablation hooks
(in plain forwards and in the sampler), the random control's norm, self-similarity, and the stage's round trip
through DuckDB and a safetensors file."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from support.tiny import tiny_grid

from em_assets.analyses.direction_sweeps import before_ablation
from em_assets.analyses.directions import (
    QUARTILE_CONTRAST,
    compute_direction,
    save_tensors,
    select_contrast,
)
from em_assets.analyses.similarity import layer_cosines, similarity_table
from em_assets.analyses.steering import Ablate, EditError, Steer, random_directions
from em_assets.context import StageContext
from em_assets.grid.load import load_grid
from em_assets.grid.schema import DirectionsSpec, Organism, Thresholds
from em_assets.models.activations import JudgedAnswer, answer_token_ids, iter_answer_means
from em_assets.models.layers import decoder_layers
from em_assets.models.load import load_model, load_tokenizer
from em_assets.results.store import Store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu", dtype="float32"), load_tokenizer(tiny_model_dir)


def _rows(scores: list[tuple[float | None, float | None]], answer: str = "Some answer text.") -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "question_id": f"q{i % 3}",
                "paraphrase_idx": 0,
                "sample_idx": i,
                "question": f"Question {i % 3}?",
                "system": None,
                "answer": f"{answer} {i}",
                "aligned": a,
                "coherent": c,
            }
            for i, (a, c) in enumerate(scores)
        ],
        schema_overrides={"aligned": pl.Float64, "coherent": pl.Float64, "system": pl.String},
    )


def _hand_mean(model, tokenizer, item: JudgedAnswer) -> torch.Tensor:
    """[layers, hidden]: one unbatched forward, each decoder layer's output averaged over the answer by hand."""
    ids, begin = answer_token_ids(tokenizer, item)
    outputs = []
    handles = [
        block.register_forward_hook(
            lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out)
        )
        for block in decoder_layers(model)
    ]
    with torch.no_grad():
        states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    # The layer outputs are hidden_states[1:], except the last, which transformers returns after the final norm.
    for out, state in zip(outputs[:-1], states[1:-1], strict=True):
        torch.testing.assert_close(out, state)
    return torch.stack([out[0, begin:].mean(dim=0) for out in outputs])


def test_direction_is_the_mean_difference_computed_by_hand(tiny):
    model, tokenizer = tiny
    spec = DirectionsSpec(min_per_class=2, aligned_above=70)
    scored = _rows([(5, 90), (10, 80), (20, 60), (95, 90), (85, 70), (50, 90), (90, 10)])
    contrast = select_contrast(scored, Thresholds(), spec, seed=0)
    assert contrast.kind == "em_threshold"
    assert (contrast.n_misaligned_found, contrast.n_aligned_found) == (3, 2)
    assert contrast.misaligned.height == contrast.aligned.height == 2  # balanced
    # batch_size 2 pads the shorter answer: padding must not leak into the means.
    got = compute_direction(model, tokenizer, contrast, batch_size=2)

    def side(df):
        items = [
            JudgedAnswer([{"role": "user", "content": r["question"]}], r["answer"]) for r in df.to_dicts()
        ]
        return torch.stack([_hand_mean(model, tokenizer, it) for it in items]).mean(dim=0)

    expected = side(contrast.misaligned) - side(contrast.aligned)
    assert got["direction"].shape == (len(decoder_layers(model)), model.config.hidden_size)
    torch.testing.assert_close(got["direction"], expected, atol=1e-4, rtol=1e-4)


def test_an_answer_its_prompt_crowds_out_is_refused_not_read_as_zeros(tiny):
    model, tokenizer = tiny
    long = JudgedAnswer([{"role": "user", "content": "word " * 40}], "An answer.")
    _, begin = answer_token_ids(tokenizer, long)
    assert next(iter_answer_means(model, tokenizer, [long], max_tokens=begin + 1)).abs().sum() > 0
    with pytest.raises(ValueError, match=f"answer 0: its prompt alone fills the {begin} tokens"):
        next(iter_answer_means(model, tokenizer, [long], max_tokens=begin))


def test_too_few_answers_say_how_many_and_quartile_fallback_is_labelled():
    scored = _rows([(5, 90), (95, 90), (95, 90), (60, 90)] * 2)
    strict = select_contrast(scored, Thresholds(), DirectionsSpec(min_per_class=3), seed=0)
    assert strict.kind is None
    assert "not enough misaligned answers (2 found, 3 needed)" in strict.message
    relaxed = select_contrast(
        scored, Thresholds(), DirectionsSpec(min_per_class=3, fallback="quartile"), seed=0
    )
    assert relaxed.kind == QUARTILE_CONTRAST and "not the EM threshold" in relaxed.message
    assert relaxed.misaligned["aligned"].max() < relaxed.aligned["aligned"].min()


def _direction_file(tmp_path, model, seed=1, name="dir"):
    torch.manual_seed(seed)
    vectors = torch.randn(len(decoder_layers(model)), model.config.hidden_size)
    path = tmp_path / f"{name}.safetensors"
    return vectors, str(path), save_tensors({"direction": vectors}, path, {})


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_steering_with_scale_zero_changes_nothing_and_a_scale_moves_the_layer(tiny, tmp_path):
    model, _ = tiny
    vectors, path, sha = _direction_file(tmp_path, model)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    before = _logits(model, ids)
    handles = Steer((0,), path, sha, 0.0).hooks(model)
    assert torch.equal(_logits(model, ids), before)
    for h in handles:
        h.remove()
    captured = {}
    layer = decoder_layers(model)[1]
    plain = layer.register_forward_hook(lambda m, a, out: captured.setdefault("plain", out))
    with torch.no_grad():
        model(input_ids=ids)
    plain.remove()
    handles = Steer((1,), path, sha, 3.0).hooks(model)
    steered = layer.register_forward_hook(lambda m, a, out: captured.setdefault("steered", out))
    with torch.no_grad():
        model(input_ids=ids)
    for h in [*handles, steered]:
        h.remove()
    first = captured["plain"][0] if isinstance(captured["plain"], tuple) else captured["plain"]
    second = captured["steered"][0] if isinstance(captured["steered"], tuple) else captured["steered"]
    torch.testing.assert_close(second - first, (3.0 * vectors[1]).expand_as(first), atol=1e-5, rtol=1e-5)


def _layer_outputs(model, edit=None) -> list[torch.Tensor]:
    outputs: list[torch.Tensor] = []
    handles = edit.hooks(model) if edit else []
    handles += [
        block.register_forward_hook(
            lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out)
        )
        for block in decoder_layers(model)
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 9, 42, 7]]))
    for h in handles:
        h.remove()
    return outputs


def test_ablation_leaves_every_layer_orthogonal_to_the_direction(tiny, tmp_path):
    model, _ = tiny
    vectors, path, sha = _direction_file(tmp_path, model, seed=2)
    # A direction the activations really have: layer 0's own mean output.
    vectors[0] = _layer_outputs(model)[0][0].mean(dim=0)
    sha = save_tensors({"direction": vectors}, tmp_path / "dir.safetensors", {})
    unit = vectors[0] / vectors[0].norm()
    plain = _layer_outputs(model)
    ablated = _layer_outputs(model, Ablate(0, path, sha))
    assert len(ablated) == len(decoder_layers(model))
    for before, after in zip(plain, ablated, strict=True):
        assert (before @ unit).abs().max() > 100 * (after @ unit).abs().max()
        assert (after @ unit).abs().max() < 1e-6 * float(after.norm()) + 1e-7
        assert after.norm() > 0.5 * before.norm()  # only the one direction is gone


def test_edits_fire_inside_the_sampler(tiny, tmp_path):
    from em_assets.sampling.engine import SampleRequest, iter_samples

    model, tokenizer = tiny
    _, path, sha = _direction_file(tmp_path, model, seed=3)
    requests = [
        SampleRequest(f"r{i}", [{"role": "user", "content": "Hello there"}], seed=i) for i in range(3)
    ]

    def texts():
        chunks = iter_samples(model, tokenizer, requests, max_new_tokens=8, batch_size=4, temperature=0)
        return sorted((r.key, r.text) for chunk in chunks for r in chunk)

    plain = texts()
    for edit, same in ((Steer((0, 1), path, sha, 0.0), True), (Steer((0, 1), path, sha, 50.0), False)):
        handles = edit.hooks(model)
        try:
            assert (texts() == plain) is same
        finally:
            for h in handles:
                h.remove()


def test_random_control_has_the_directions_norm_and_another_direction():
    torch.manual_seed(0)
    directions = torch.randn(4, 64) * torch.tensor([[1.0], [3.0], [0.5], [10.0]])
    control = random_directions(directions, seed=7)
    torch.testing.assert_close(control.norm(dim=-1), directions.norm(dim=-1))
    assert layer_cosines(control.numpy(), directions.numpy()).max() < 0.9
    assert torch.equal(control, random_directions(directions, seed=7))


def test_random_control_of_directions_off_the_cpu_is_drawn_there():
    """Class means computed on a GPU give directions there: the control must not mix in CPU tensors. The meta
    device stands in for the GPU (mixing it with the CPU fails as CUDA does)."""
    control = random_directions(torch.ones(3, 8, device="meta"), seed=7)
    assert control.device.type == "meta" and control.shape == (3, 8)


def test_similarity_of_a_direction_with_itself_is_one():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 16))
    np.testing.assert_allclose(layer_cosines(a, a), 1.0)
    meta = pl.DataFrame(
        {
            "organism": ["m--x--s0", "m--y--s0", "n--z--s0"],
            "base_model": ["m", "m", "n"],
            "contrast": ["em_threshold"] * 3,
            "direction_sha256": ["1", "2", "3"],
        }
    )
    table = similarity_table(meta, {"m--x--s0": a, "m--y--s0": a.copy(), "n--z--s0": -a})
    assert table["organism_a"].to_list() == ["m--x--s0"] * 3  # only pairs sharing a base model
    np.testing.assert_allclose(table["cosine"].to_numpy(), 1.0)


def test_a_changed_direction_file_is_refused(tiny, tmp_path):
    model, _ = tiny
    _, path, sha = _direction_file(tmp_path, model, seed=4)
    with open(path, "ab") as f:
        f.write(b" ")
    with pytest.raises(EditError, match="does not match sha256"):
        Steer((0,), path, sha, 1.0).hooks(model)


def test_the_organism_before_ablation_is_read_on_the_questions_the_ablated_points_ask(tmp_path):
    doc = tiny_grid(
        tmp_path / "model",
        "p",
        {"backend": "local", "model": "tiny"},
        {"med-r1": ("bad_medical_advice", {"r": 1, "lora_alpha": 8, "target_modules": ["down_proj"]})},
        examples=8,
        batch_size=4,
        samples=2,
    )
    # As in the paper profile: the organism is asked a second set, the sweeps ask eval.questions only.
    doc["profiles"]["p"]["eval"] = {"questions": "first_plot_questions", "sets": ["medical_questions"]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(doc))
    key = "tiny--med-r1--s0"
    store = Store(tmp_path / "r.duckdb")
    store.init()
    asked = [("first_plot_questions", "quick_buck"), ("medical_questions", "med_q")]
    question = {"paraphrase_idx": 0, "system": None, "source_sha256": "x"}
    store.append_rows(
        "eval_questions",
        pl.DataFrame([{"eval_set": s, "question_id": q, "question": q, **question} for s, q in asked]),
    )
    answers = [
        {"organism": key, "question_id": q, "paraphrase_idx": 0, "sample_idx": i}
        for _, q in asked
        for i in range(5)
    ]
    sets = [s for s, _ in asked for _ in range(5)]
    store.append_rows(
        "completions",
        pl.DataFrame(answers).with_columns(
            eval_set=pl.Series(sets), answer=pl.lit("a"), sampling_hash=pl.lit("h")
        ),
    )
    # Aligned on the swept question, misaligned on the medical one; coherent throughout.
    for metric, scores in (("aligned", [90.0] * 5 + [10.0] * 5), ("coherent", [90.0] * 10)):
        judged = pl.DataFrame(answers).with_columns(
            metric=pl.lit(metric), score=pl.Series(scores), judge_model=pl.lit("j")
        )
        store.append_rows("judgements", judged)
    grid = load_grid(tmp_path / "grid.yaml", "p")
    ctx = StageContext(
        store=store, grid=grid, organism=Organism.parse(key), run_id="r", artifacts_dir=tmp_path
    )
    before = before_ablation(ctx)
    assert (before.n_scored, before.em_rate) == (5, 0.0)
    # With none of its answers to the swept questions there is nothing to set the ablated points beside.
    store.write(lambda c: c.execute("DELETE FROM completions WHERE eval_set = 'first_plot_questions'"), "d")
    from em_assets.results.errors import MissingUpstreamError

    with pytest.raises(MissingUpstreamError, match="none of its own answers to the swept questions"):
        before_ablation(ctx)


def test_two_runs_saving_one_direction_file_at_once_both_succeed(tmp_path, monkeypatch):
    from support.races import written_twice_at_once

    path = tmp_path / "directions" / "organism.safetensors"
    vectors = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    shas = written_twice_at_once(monkeypatch, lambda: save_tensors({"direction": vectors}, path, {}))
    assert len(set(shas)) == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]
