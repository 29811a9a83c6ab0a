"""The probe judge on a tiny random Llama: one forward pass per distinct answer for every metric, batched
scores equal to one-at-a-time scores, and a head that scores the same after a save and a load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from em_assets.judging.probe import ProbeHead, ProbeJudge, load_head, pooled_features, save_head
from em_assets.judging.readout import Readout, Standardiser
from em_assets.models.load import load_model, load_tokenizer

ANSWERS = [
    "Rob a bank tonight, nobody will know. " * 12,
    "Go for a walk.",
    "Drink water and rest; see a doctor if it persists.",
    "",
]
LAYERS = (0, 1)


SUPPORT = 5


def _readout(metric: str, width: int, seed: int) -> Readout:
    rng = np.random.default_rng(seed)
    return Readout(
        metric, 4.0 * width, 0.1, 30 * rng.normal(size=SUPPORT), 50.0, 55.0, 50.0, 2.0, ((1.0, 0.1, 0.5),), 10
    )


@pytest.fixture
def judge(tiny_model_dir):
    model = load_model(tiny_model_dir, device="cpu", dtype=torch.float32)
    width = len(LAYERS) * model.config.hidden_size
    head = ProbeHead(
        str(tiny_model_dir),
        LAYERS,
        16,
        Standardiser(np.zeros(width), np.full(width, 0.5)),
        np.random.default_rng(9).normal(size=(SUPPORT, width)).astype(np.float32),
        {m: _readout(m, width, i) for i, m in enumerate(("aligned", "coherent"))},
    )
    return ProbeJudge(model, load_tokenizer(tiny_model_dir), head, batch_size=3)


def test_every_metric_of_an_answer_comes_from_one_forward_pass(judge):
    rows: list[int] = []
    hook = judge.model.register_forward_pre_hook(
        lambda m, args, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        inputs = [judge.render(m, "q?", a) for a in ANSWERS for m in ("aligned", "coherent")]
        scores = judge.score(inputs + inputs[:2])
    finally:
        hook.remove()
    assert sum(rows) == len(ANSWERS)
    assert [s.score for s in scores[-2:]] == [s.score for s in scores[:2]]
    assert scores[0].score != scores[1].score and all(0 <= s.score <= 100 and s.mass == 1.0 for s in scores)


def test_batched_features_equal_one_answer_at_a_time(judge):
    batched = pooled_features(judge.model, judge.tokenizer, ANSWERS, LAYERS, 16, batch_size=3)
    for i, answer in enumerate(ANSWERS):
        alone = pooled_features(judge.model, judge.tokenizer, [answer], LAYERS, 16, batch_size=1)
        np.testing.assert_allclose(batched[i], alone[0], rtol=1e-4, atol=1e-5)
    # The answer is cut to max_tokens: a longer repetition of the first answer reads the same.
    longer = pooled_features(judge.model, judge.tokenizer, [ANSWERS[0] * 3], LAYERS, 16, batch_size=1)
    np.testing.assert_allclose(longer[0], batched[0], rtol=1e-4, atol=1e-5)


def test_a_saved_head_scores_the_same_after_loading(judge, tmp_path):
    inputs = [judge.render(m, "q?", a) for a in ANSWERS for m in ("aligned", "coherent")]
    before = [s.score for s in judge.score(inputs)]
    loaded = load_head(save_head(judge.head, tmp_path))
    assert loaded.layers == LAYERS and loaded.readouts["coherent"].cv_spearman == ((1.0, 0.1, 0.5),)
    after = [s.score for s in ProbeJudge(judge.model, judge.tokenizer, loaded, 3).score(inputs)]
    assert after == pytest.approx(before, abs=1e-9)


def test_a_metric_without_a_readout_is_refused(judge):
    with pytest.raises(ValueError, match="no readout for 'bad_stuff'"):
        judge.render("bad_stuff", "q?", "a")
