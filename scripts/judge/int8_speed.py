"""Experiment: the probe judge's feature pass with int8 weights (torch's dynamic quantisation of every linear layer)
against bf16 and fp32, on the bench's 96 answers of 128 tokens, one process, this machine: judgements per second
and how far each reading's features move from fp32's.
Usage: PYTHONPATH=$PWD python scripts/judge/int8_speed.py"""

import time
import warnings

import numpy as np
import torch

from em_assets.bench.run import _answers, _demo_grid, _question_pairs, load_bench_model, model_path
from em_assets.judging.answer_features import QA, AnswerFeatures, answer_features

SPEC = _demo_grid().probe
ITEMS = [QA(q, a) for q, a in _question_pairs(_answers(96))]


def timed(model, tokenizer, label: str) -> AnswerFeatures:
    """The features of ITEMS after a warm-up batch, with the rate in judgements (both metrics) per second."""
    answer_features(model, tokenizer, ITEMS[:16], SPEC.layers, SPEC.max_tokens, SPEC.batch_size)
    start = time.perf_counter()
    features = answer_features(model, tokenizer, ITEMS, SPEC.layers, SPEC.max_tokens, SPEC.batch_size)
    print(f"{label}: {len(SPEC.metrics) * len(ITEMS) / (time.perf_counter() - start):.1f} judgements/s")
    return features


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def main() -> None:
    path = str(model_path(None))
    bf16, tokenizer = load_bench_model(path, "cpu", "bfloat16")[:2]
    fp32 = load_bench_model(path, "cpu", "float32")[0]
    readings = {"bf16": timed(bf16, tokenizer, "bf16"), "fp32": timed(fp32, tokenizer, "fp32")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated; it is what is measured
        int8 = torch.ao.quantization.quantize_dynamic(fp32, {torch.nn.Linear}, dtype=torch.qint8)
    readings["int8"] = timed(int8, tokenizer, "int8 (dynamic)")
    exact = readings["fp32"]
    for name in ("bf16", "int8"):
        moved = np.abs(readings[name].scalars - exact.scalars).mean(0)
        print(
            f"{name} vs fp32: states' cosine {cosine(readings[name].hidden, exact.hidden):.5f}; signs' mean "
            f"absolute change {np.array2string(moved, precision=3)}"
        )


if __name__ == "__main__":
    main()
