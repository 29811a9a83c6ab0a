"""The probe judge: GPT-4o's scores read off a frozen small model by kernel ridge readouts of its hidden states
and of signs of degenerate text.

Each answer (cut to a token budget) goes through the frozen model once as the assistant's reply to its question
under the chat template, and each distinct question once alone (judging/answer_features.py): the answer's
decoder-layer outputs averaged over its tokens, the model's likelihood of its tokens, repetition and emptiness,
and how far the answer's states lie from its question's. One kernel ridge readout per metric
(judging/readout.py) maps them to a 0-100 score; a metric's kernel adds the signs to the states with a weight
chosen by cross-validation. It is fitted on the reference judgements of the TRAIN base models only, with
corruptions of those answers (judging/incoherent.py) and hand-rated answers of the demo's model and organisms as the
incoherent end, like the distilled adapter never seeing a held-out base model. Every metric comes from one
forward pass per answer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from em_assets.grid.schema import ProbeSpec, config_hash, dtype_fields
from em_assets.judging.answer_features import QA, SCALARS, AnswerFeatures, QuestionReading, answer_features
from em_assets.judging.distill import train_answers
from em_assets.judging.incoherent import read_ratings, training_set
from em_assets.judging.readout import Readout, Standardiser, fit_readout, linear_ridge, sq_distances
from em_assets.judging.scoring import JudgeScore
from em_assets.models.chat import rendering_fields
from em_assets.results.artifacts import file_version, write_atomically

HEAD_FILE = "probe.safetensors"
# The cross-validation group of the hand-rated answers (samples of the demo's model and its organisms).
RATED_GROUP = "hand-rated"
# A metric's readout of the reference answers alone, from their states alone: it grades answers as GPT-4o does
# (a readout with signs and the incoherent end separates degenerate text but ranks the reference answers less
# well).
GRADE = "@reference"
# The ridge penalty of the linear model of the signs (standardised, some 2,700 rows: a light one).
LINEAR_L2 = 1.0

# Part of the judge's identity in the judge cache, as the distilled judge's prompt is: what is read, and how.
FEATURES_VERSION = "answer-after-question-signs:v3"
# How the head is fitted from those features, where a change moves the head without changing what is read, and
# the corruptions it is fitted on (judging/incoherent.py, whose rows the features cache is keyed by): a head fitted
# another way is fitted again.
FIT_VERSION = "signs-mean-refitted-per-fold:loops-repeat"


@dataclass(frozen=True)
class ProbeInput:
    """What the probe judge scores for one judgement: the metric, and the question and answer it reads."""

    metric: str
    question: str
    answer: str


def relevance(hidden: np.ndarray, question: np.ndarray, n_layers: int) -> np.ndarray:
    """[answers, layers]: per pooled layer, the cosine of an answer's standardised states with its question's."""
    a, q = hidden.reshape(len(hidden), n_layers, -1), question.reshape(len(question), n_layers, -1)
    norms = np.linalg.norm(a, axis=2) * np.linalg.norm(q, axis=2)
    return (a * q).sum(axis=2) / np.maximum(norms, 1e-6)


@dataclass(frozen=True)
class ProbeHead:
    """The fitted readouts over one model's pooled layers and signs, and their support (the train answers'
    standardised features), as saved to HEAD_FILE."""

    base_model: str
    layers: tuple[int, ...]
    max_tokens: int
    standardiser: Standardiser
    support: np.ndarray
    signs_standardiser: Standardiser
    support_signs: np.ndarray
    readouts: dict[str, Readout]
    # Per metric, the weight of the signs' squared distances in its kernel, relative to the states'.
    sign_weights: dict[str, float]
    # Per metric with signs in its kernel, a linear model of the standardised signs ([signs + 1], intercept
    # last) that its kernel readout is fitted around: an answer far from every train answer (a one-word loop)
    # falls back to what its signs say, not to the mean train answer.
    linear: dict[str, np.ndarray]
    # A metric with a GRADE readout scores min(grade, readout + grade_margin): the readout with the incoherent
    # end lowers the grade only where it reads clearly lower, so it reorders the coherent answers less.
    grade_margin: float = 0.0

    def signs(self, features: AnswerFeatures) -> np.ndarray:
        """[answers, signs]: the scalar signs and each pooled layer's relevance to the question."""
        z_answer, z_question = self.standardiser(features.hidden), self.standardiser(features.question)
        return np.hstack([features.scalars, relevance(z_answer, z_question, len(self.layers))])

    def distances(self, features: AnswerFeatures) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Squared distances of the states and of the standardised signs to the support, and the standardised
        signs, per row."""
        sq = sq_distances(self.standardiser(features.hidden), self.support)
        signs = self.signs_standardiser(self.signs(features))
        return sq, sq_distances(signs, self.support_signs), signs

    def offset(self, signs: np.ndarray, metric: str) -> np.ndarray | float:
        weights = self.linear.get(metric)
        return 0.0 if weights is None else signs @ weights[:-1] + weights[-1]

    def kernel_distances(self, sq: np.ndarray, sq_signs: np.ndarray, metric: str) -> np.ndarray:
        # Each sign counts as much as sign_weight times an average state dimension.
        scale = self.support.shape[1] / self.support_signs.shape[1]
        return sq + self.sign_weights[metric] * scale * sq_signs

    def scores(self, features: AnswerFeatures, metrics: Sequence[str]) -> dict[str, np.ndarray]:
        """Each metric's scores; the distances to the support, shared by every readout, are computed once. A
        metric fitted with an incoherent end scores the lower of its GRADE readout's and that readout's (plus
        the margin)."""
        sq, sq_signs, signs = self.distances(features)

        def predict(name: str) -> np.ndarray:
            return self.readouts[name].predict(
                self.kernel_distances(sq, sq_signs, name), self.offset(signs, name)
            )

        return {
            m: np.minimum(predict(m) + self.grade_margin, predict(m + GRADE))
            if m + GRADE in self.readouts
            else predict(m)
            for m in metrics
        }


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
    spec: ProbeSpec,
    base_revision: str,
    reference_sha256: Sequence[str],
    held_out: Sequence[str],
    thresholds: dict[str, float],
    dtype: str,
) -> str:
    """What makes the head: base model bytes and the features' dtype, reference files and split, hand ratings,
    the spec, the feature recipe, how it is fitted and the EM thresholds its readouts calibrate at."""
    return config_hash(
        {
            "base_revision": base_revision,
            "reference": sorted(reference_sha256),
            "held_out": sorted(held_out),
            "thresholds": thresholds,
            "spec": spec.model_dump(mode="json", exclude={"batch_size"}),
            "hand_ratings": _ratings_sha256(spec),
            "features": FEATURES_VERSION,
            "fit": FIT_VERSION,
            **dtype_fields(dtype),
            **rendering_fields(),
        }
    )


def _ratings_sha256(spec: ProbeSpec) -> str | None:
    from em_assets.results.artifacts import sha256_file

    if not spec.hand_ratings:
        return None
    read_ratings(spec.hand_ratings)  # one clear error for a missing or malformed file
    return sha256_file(Path(spec.hand_ratings))


def _targets(answers: pl.DataFrame, metric: str) -> np.ndarray:
    if metric in ("aligned", "coherent"):
        values = answers[metric].to_list()
    else:
        values = [json.loads(s).get(metric) for s in answers["domain_scores"]]
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def zero_head(spec: ProbeSpec, hidden_size: int, support: int) -> ProbeHead:
    """A head of the spec's shape (its readouts, grade readouts and linear models) with zero weights over
    `support` rows: what scoring costs, without fitting (the bench)."""
    width, signs = len(spec.layers) * hidden_size, len(SCALARS) + len(spec.layers)
    weights = {m: max(spec.sign_weights.get(m, [0.0])) for m in spec.metrics}
    names = list(spec.metrics) + [m + GRADE for m, w in weights.items() if w > 0]
    return ProbeHead(
        "",
        tuple(spec.layers),
        spec.max_tokens,
        Standardiser(np.zeros(width), np.ones(width)),
        np.zeros((support, width), dtype=np.float32),
        Standardiser(np.zeros(signs), np.ones(signs)),
        np.zeros((support, signs), dtype=np.float32),
        {n: Readout(n, 1.0, 1.0, np.zeros(support), 50.0, 50.0, 50.0, 1.0, (), 0) for n in names},
        {n: weights.get(n, 0.0) for n in names},
        {m: np.zeros(signs + 1) for m, w in weights.items() if w > 0},
        spec.grade_margin,
    )


def _standardised(
    features: AnswerFeatures, n_layers: int
) -> tuple[Standardiser, np.ndarray, Standardiser, np.ndarray]:
    """The states' standardiser and the standardised train states, and the same of the signs: a head's support."""
    standardiser = Standardiser.fit(features.hidden)
    # float32 as saved, so the fitted head scores exactly as the loaded one.
    support = standardiser(features.hidden).astype(np.float32)
    raw = np.hstack([features.scalars, relevance(support, standardiser(features.question), n_layers)])
    signs_standardiser = Standardiser.fit(raw)
    return standardiser, support, signs_standardiser, signs_standardiser(raw).astype(np.float32)


def fit_head(
    base_model: str,
    features: AnswerFeatures,
    rows: pl.DataFrame,
    spec: ProbeSpec,
    thresholds: dict[str, float] | None = None,
) -> ProbeHead:
    """Readouts of every metric over the rows' features: per metric the sign weight, bandwidth and penalty whose
    leave-one-base-model-out Spearman is best, and the calibration that best transfers the rate at its threshold
    (`thresholds`, e.g. aligned 30 and coherent 50) across left-out base models."""
    scaled = _standardised(features, len(spec.layers))
    head = ProbeHead(base_model, tuple(spec.layers), spec.max_tokens, *scaled, {}, {}, {}, spec.grade_margin)
    support, support_signs = head.support, head.support_signs
    sq, sq_signs = sq_distances(support, support), sq_distances(support_signs, support_signs)
    groups, cut = rows["base_model"].to_list(), thresholds or {}
    reference = (rows["kind"] == "reference").to_numpy()

    def fit(
        name: str,
        y: np.ndarray,
        weights: Sequence[float],
        threshold: float | None,
        anchored: np.ndarray | None,
    ) -> None:
        fits = []
        for w in weights:
            head.sign_weights[name] = w
            k = head.kernel_distances(sq, sq_signs, name)
            linear = linear_ridge(support_signs, y, LINEAR_L2) if w > 0 else None
            mean_of = None if linear is None else (support_signs, LINEAR_L2)
            readout = fit_readout(
                name, k, y, groups, spec.bandwidths, spec.l2, spec.seed, threshold, mean_of, anchored
            )
            fits.append((readout, w, linear))
        best = max(fits, key=lambda f: _best_cv(f[0]))
        head.readouts[name], head.sign_weights[name] = best[0], best[1]
        if best[2] is not None:
            head.linear[name] = best[2]

    rated = (rows["kind"] == "rated").to_numpy()
    for m in spec.metrics:
        y, weights = _targets(rows, m), spec.sign_weights.get(m, [0.0])
        # The hand-rated answers choose the settings of a readout of degenerate text, for its transfer to the
        # demo model's own text; a readout of states alone is fitted on them but chosen on the base models alone,
        # as a left-out group a few dozen hand-written answers would set its penalty and calibration.
        fit(m, y, weights, cut.get(m), rated if max(weights) == 0 else None)
        # Signs in the kernel reorder the reference answers: they are graded by their states alone.
        if head.sign_weights[m] > 0 and np.isfinite(y[~reference]).any():
            fit(m + GRADE, np.where(reference, y, np.nan), [0.0], cut.get(m), None)
    return head


def _best_cv(readout: Readout) -> float:
    return max((sp for _, _, sp in readout.cv_spearman if sp is not None), default=-np.inf)


def fit_probe(
    base_path: Path | str,
    reference: pl.DataFrame,
    spec: ProbeSpec,
    out_dir: Path,
    device: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    cache_dir: Path | None = None,
    thresholds: dict[str, float] | None = None,
    base_revision: str = "",
) -> ProbeFit:
    """Read the train answers, their corruptions and the hand-rated answers (features cached under cache_dir by
    content), fit one readout per metric and save the head to out_dir/HEAD_FILE."""
    from em_assets.models.load import load_model, load_tokenizer

    start = time.perf_counter()
    ratings = read_ratings(spec.hand_ratings) if spec.hand_ratings else None
    rows = training_set(
        train_answers(reference, spec), spec.incoherent_per_kind, ratings, RATED_GROUP, spec.seed
    )
    model = load_model(base_path, device=device)
    _check_layers(spec.layers, model.config.get_text_config().num_hidden_layers)
    items = [QA(q, a) for q, a in zip(rows["question"], rows["answer"], strict=True)]
    cache = _features_cache(cache_dir, base_path, base_revision, str(model.dtype), spec, items)
    if cache is not None and cache.exists():
        features = _load_features(cache)
    else:
        features = answer_features(
            model,
            load_tokenizer(base_path),
            items,
            spec.layers,
            spec.max_tokens,
            spec.batch_size,
            on_progress,
        )
        if cache is not None:
            _save_features(features, cache)
    head = fit_head(str(base_path), features, rows, spec, thresholds)
    path = save_head(head, out_dir)
    return ProbeFit(path, head, rows.height, time.perf_counter() - start)


def _features_cache(
    cache_dir: Path | None,
    base_path: Path | str,
    revision: str,
    dtype: str,
    spec: ProbeSpec,
    items: Sequence[QA],
) -> Path | None:
    """Where the features of these items under this model and recipe are kept: named by their content, the
    model's revision (a local directory keeps its path when its weights change) and the dtype it computed in."""
    if cache_dir is None:
        return None
    named = [FEATURES_VERSION, str(base_path), revision, dtype, spec.layers, spec.max_tokens]
    digest = hashlib.sha256(json.dumps(named + list(rendering_fields().values())).encode())
    for it in items:
        digest.update(json.dumps([it.question, it.answer]).encode())
    return Path(cache_dir) / "probe_features" / f"{digest.hexdigest()[:32]}.npz"


def _save_features(features: AnswerFeatures, path: Path) -> None:
    # Names of their own (here and in save_head): two catalog runs at once (two demos) fit the same probe.
    arrays = {"hidden": features.hidden, "question": features.question, "scalars": features.scalars}
    write_atomically(path, lambda tmp: np.savez(tmp, **arrays), ".tmp.npz")


def _load_features(path: Path) -> AnswerFeatures:
    with np.load(path) as f:
        return AnswerFeatures(f["hidden"], f["question"], f["scalars"])


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
        "signs_mean": head.signs_standardiser.mean.astype(np.float64),
        "signs_scale": head.signs_standardiser.scale.astype(np.float64),
        "support_signs": head.support_signs.astype(np.float32),
    }
    tensors |= {f"{m}.dual": r.dual.astype(np.float64) for m, r in head.readouts.items()}
    tensors |= {f"{m}.knots": r.knots for m, r in head.readouts.items() if r.knots is not None}
    tensors |= {f"{m}.linear": w.astype(np.float64) for m, w in head.linear.items()}
    scalars = ("bandwidth", "l2", "intercept", "target_mean", "center", "stretch", "n", "calibration")
    meta = {
        "base_model": head.base_model,
        "layers": list(head.layers),
        "max_tokens": head.max_tokens,
        "sign_weights": head.sign_weights,
        "grade_margin": head.grade_margin,
        "readouts": {
            m: {k: getattr(r, k) for k in scalars} | {"cv_spearman": [list(x) for x in r.cv_spearman]}
            for m, r in head.readouts.items()
        },
    }
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return write_atomically(
        out_dir / HEAD_FILE, lambda tmp: save_file(arrays, str(tmp), metadata={"probe": json.dumps(meta)})
    )


def load_head(path: Path | str) -> ProbeHead:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = json.loads(f.metadata()["probe"])
        tensor, names = f.get_tensor, set(f.keys())
        readouts = {
            m: Readout(
                metric=m,
                dual=tensor(f"{m}.dual"),
                knots=tensor(f"{m}.knots") if f"{m}.knots" in names else None,
                cv_spearman=tuple(tuple(x) for x in r.pop("cv_spearman")),
                **r,
            )
            for m, r in meta["readouts"].items()
        }
        standardiser = Standardiser(tensor("feature_mean"), tensor("feature_scale"))
        signs_standardiser = Standardiser(tensor("signs_mean"), tensor("signs_scale"))
        support, support_signs = tensor("support"), tensor("support_signs")
        linear = {n.removesuffix(".linear"): tensor(n) for n in names if n.endswith(".linear")}
    return ProbeHead(
        meta["base_model"],
        tuple(meta["layers"]),
        meta["max_tokens"],
        standardiser,
        support,
        signs_standardiser,
        support_signs,
        readouts,
        meta["sign_weights"],
        linear,
        meta["grade_margin"],
    )


class ProbeJudge:
    """Scores ProbeInputs: one forward pass per distinct (question, answer) and per question, then each
    metric's readout."""

    def __init__(self, model, tokenizer, head: ProbeHead, batch_size: int = 32):
        self.model, self.tokenizer, self.head, self.batch_size = model, tokenizer, head, batch_size
        # Every organism is asked the same questions: each is read once per judge, not once per call.
        self.readings: dict[str, QuestionReading] = {}

    def render(self, metric: str, question: str, answer: str) -> ProbeInput:
        if metric not in self.head.readouts:
            raise ValueError(
                f"the probe judge has no readout for {metric!r}; it has {sorted(self.head.readouts)}"
            )
        return ProbeInput(metric, question, answer)

    def order(self, inputs: Sequence[ProbeInput]) -> list[int]:
        """Inputs by answer length, one answer's metrics together: a chunk of similar lengths pads its batches
        less (score_chunks)."""
        return sorted(range(len(inputs)), key=lambda i: (len(inputs[i].answer), inputs[i].answer))

    def features(self, items: Sequence[QA], on_progress=None) -> AnswerFeatures:
        head = self.head
        return answer_features(
            self.model,
            self.tokenizer,
            items,
            head.layers,
            head.max_tokens,
            self.batch_size,
            on_progress,
            self.readings,
        )

    def score(self, inputs: Sequence[ProbeInput], on_progress=None) -> list[JudgeScore]:
        items = sorted({QA(it.question, it.answer) for it in inputs}, key=lambda qa: (qa.question, qa.answer))
        row = {qa: i for i, qa in enumerate(items)}
        by_metric = self.head.scores(self.features(items, on_progress), sorted({it.metric for it in inputs}))
        return [
            JudgeScore(float(by_metric[it.metric][row[QA(it.question, it.answer)]]), 1.0) for it in inputs
        ]


def load_probe_judge(head_path: Path | str, batch_size: int, device: str | None = None) -> ProbeJudge:
    """The frozen base model the head was fitted on, with the head; one process's steps share it (and its
    questions' readings) while the head file is unchanged."""
    return _loaded_judge(file_version(head_path), batch_size, device)


# One judge: every step of a run (the demo runs them all in one process) judges with the grid's one probe.
@functools.lru_cache(maxsize=1)
def _loaded_judge(version: tuple[str, int, int, int, int], batch_size: int, device: str | None) -> ProbeJudge:
    from em_assets.models.load import load_model, load_tokenizer

    head = load_head(version[0])
    model = load_model(head.base_model, device=device)
    return ProbeJudge(model, load_tokenizer(head.base_model), head, batch_size)
