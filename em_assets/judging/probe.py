"""The probe judge: GPT-4o's scores read off a frozen small model by kernel ridge readouts of its hidden states.

Each answer (cut to a token budget, no prompt around it) goes through the frozen model once; its decoder-layer
outputs, averaged over its tokens at the spec's layers, are the features, and one kernel ridge readout per
metric over the train answers' features (judging/readout.py) maps them to a 0-100 score. It is fitted on the
reference judgements of the TRAIN base models only, like the distilled adapter. Both metrics come from one
forward pass per answer.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from em_assets.grid.schema import ProbeSpec, config_hash
from em_assets.judging.distill import train_answers
from em_assets.judging.readout import Readout, Standardiser, fit_readout, sq_distances
from em_assets.judging.scoring import JudgeScore

HEAD_FILE = "probe.safetensors"

# Part of the judge's identity in the judge cache, as the distilled judge's prompt is: what is read, and how.
FEATURES_VERSION = "answer-mean-pool:v1"


@dataclass(frozen=True)
class ProbeInput:
    """What the probe judge scores for one judgement: the metric and the answer it reads."""

    metric: str
    answer: str


@dataclass(frozen=True)
class ProbeHead:
    """The fitted readouts over one model's pooled layers, and their support (the train answers' standardised
    features), as saved to HEAD_FILE."""

    base_model: str
    layers: tuple[int, ...]
    max_tokens: int
    standardiser: Standardiser
    support: np.ndarray
    readouts: dict[str, Readout]

    def scores(self, features: np.ndarray, metrics: Sequence[str]) -> dict[str, np.ndarray]:
        """Each metric's scores; the distances to the support, shared by every readout, are computed once."""
        sq = sq_distances(self.standardiser(features), self.support)
        return {m: self.readouts[m].predict(sq) for m in metrics}


@dataclass(frozen=True)
class ProbeFit:
    """A fitted probe judge: where its head is, what it was fitted on and how long that took."""

    head_path: Path
    head: ProbeHead
    n_answers: int
    seconds: float


def metric_features_hash(metric: str) -> str:
    """The prompt part of the probe judge's cache key for one metric."""
    return hashlib.sha256(f"{FEATURES_VERSION}:{metric}".encode()).hexdigest()[:16]


def probe_hash(
    spec: ProbeSpec, base_revision: str, reference_sha256: Sequence[str], held_out: Sequence[str]
) -> str:
    """What makes the head: base model bytes, reference files and split, the spec and the feature recipe."""
    return config_hash(
        {
            "base_revision": base_revision,
            "reference": sorted(reference_sha256),
            "held_out": sorted(held_out),
            "spec": spec.model_dump(mode="json", exclude={"batch_size"}),
            "features": FEATURES_VERSION,
        }
    )


def pooled_features(
    model,
    tokenizer,
    answers: Sequence[str],
    layers: Sequence[int],
    max_tokens: int,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """[answers, len(layers) * hidden] float32: each answer's mean decoder-layer output at `layers`."""
    from em_assets.models.activations import JudgedAnswer, iter_answer_means

    # Batches of similar length waste less compute on padding.
    order = sorted(range(len(answers)), key=lambda i: len(answers[i]))
    items = [JudgedAnswer([], answers[i]) for i in order]
    out = np.zeros((len(answers), len(layers) * model.config.hidden_size), dtype=np.float32)
    done = 0
    for batch in iter_answer_means(model, tokenizer, items, batch_size, max_tokens):
        rows = order[done : done + batch.shape[0]]
        out[rows] = batch[:, list(layers)].flatten(1).cpu().numpy()
        done += batch.shape[0]
        if on_progress is not None:
            on_progress(done, len(answers))
    return out


def _targets(answers: pl.DataFrame, metric: str) -> np.ndarray:
    if metric in ("aligned", "coherent"):
        values = answers[metric].to_list()
    else:
        values = [json.loads(s).get(metric) for s in answers["domain_scores"]]
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def fit_probe(
    base_path: Path | str,
    reference: pl.DataFrame,
    spec: ProbeSpec,
    out_dir: Path,
    device: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ProbeFit:
    """Pool the train answers' states, fit one readout per metric (bandwidth and penalty by
    leave-one-base-model-out cross-validation) and save the head to out_dir/HEAD_FILE."""
    from em_assets.models.load import load_model, load_tokenizer

    start = time.perf_counter()
    answers = train_answers(reference, spec)
    model = load_model(base_path, device=device)
    _check_layers(spec.layers, model.config.num_hidden_layers)
    features = pooled_features(
        model,
        load_tokenizer(base_path),
        answers["answer"].to_list(),
        spec.layers,
        spec.max_tokens,
        spec.batch_size,
        on_progress,
    )
    standardiser = Standardiser.fit(features)
    # float32 as saved, so the fitted head scores exactly as the loaded one.
    support = standardiser(features).astype(np.float32)
    groups = answers["base_model"].to_list()
    sq = sq_distances(support, support)
    readouts = {
        m: fit_readout(m, sq, _targets(answers, m), groups, spec.bandwidths, spec.l2, spec.seed)
        for m in spec.metrics
    }
    head = ProbeHead(str(base_path), tuple(spec.layers), spec.max_tokens, standardiser, support, readouts)
    path = save_head(head, out_dir)
    return ProbeFit(path, head, answers.height, time.perf_counter() - start)


def _check_layers(layers: Sequence[int], num_layers: int) -> None:
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"probe layers {bad} are outside the model's decoder layers 0..{num_layers - 1}")


def save_head(head: ProbeHead, out_dir: Path) -> Path:
    """The head as one safetensors file: arrays as tensors, everything else in its metadata."""
    from safetensors.numpy import save_file

    tensors = {
        "feature_mean": head.standardiser.mean.astype(np.float64),
        "feature_scale": head.standardiser.scale.astype(np.float64),
        "support": head.support.astype(np.float32),
    }
    tensors |= {f"{m}.dual": r.dual.astype(np.float64) for m, r in head.readouts.items()}
    scalars = ("bandwidth", "l2", "intercept", "target_mean", "center", "stretch", "n")
    meta = {
        "base_model": head.base_model,
        "layers": list(head.layers),
        "max_tokens": head.max_tokens,
        "readouts": {
            m: {k: getattr(r, k) for k in scalars} | {"cv_spearman": [list(x) for x in r.cv_spearman]}
            for m, r in head.readouts.items()
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / HEAD_FILE
    tmp = path.with_suffix(".tmp")
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        str(tmp),
        metadata={"probe": json.dumps(meta)},
    )
    tmp.replace(path)
    return path


def load_head(path: Path | str) -> ProbeHead:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["probe"])
        tensor = f.get_tensor
        readouts = {
            m: Readout(
                metric=m,
                dual=tensor(f"{m}.dual"),
                cv_spearman=tuple(tuple(x) for x in r.pop("cv_spearman")),
                **r,
            )
            for m, r in meta["readouts"].items()
        }
        standardiser = Standardiser(tensor("feature_mean"), tensor("feature_scale"))
        support = tensor("support")
    return ProbeHead(
        meta["base_model"], tuple(meta["layers"]), meta["max_tokens"], standardiser, support, readouts
    )


class ProbeJudge:
    """Scores ProbeInputs: one forward pass per distinct answer, then each metric's readout."""

    def __init__(self, model, tokenizer, head: ProbeHead, batch_size: int = 32):
        self.model, self.tokenizer, self.head, self.batch_size = model, tokenizer, head, batch_size

    def render(self, metric: str, question: str, answer: str) -> ProbeInput:
        if metric not in self.head.readouts:
            raise ValueError(
                f"the probe judge has no readout for {metric!r}; it has {sorted(self.head.readouts)}"
            )
        return ProbeInput(metric, answer)

    def score(self, inputs: Sequence[ProbeInput], on_progress=None) -> list[JudgeScore]:
        answers = sorted({it.answer for it in inputs})
        features = pooled_features(
            self.model,
            self.tokenizer,
            answers,
            self.head.layers,
            self.head.max_tokens,
            self.batch_size,
            on_progress,
        )
        row = {a: i for i, a in enumerate(answers)}
        by_metric = self.head.scores(features, sorted({it.metric for it in inputs}))
        return [JudgeScore(float(by_metric[it.metric][row[it.answer]]), 1.0) for it in inputs]


def load_probe_judge(head_path: Path | str, batch_size: int, device: str | None = None) -> ProbeJudge:
    """The frozen base model the head was fitted on, with the head."""
    from em_assets.models.load import load_model, load_tokenizer

    head = load_head(head_path)
    model = load_model(head.base_model, device=device)
    return ProbeJudge(model, load_tokenizer(head.base_model), head, batch_size)
