"""A fully fine-tuned organism's training stage SIGKILLed at a step resumes to the weights of a run never
stopped, with the same lineage rows (see test_kills_resume.py for the LoRA organism)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.children import train_killed_at_step, train_uninterrupted
from support.db import count, organism_rows
from support.organisms import TRAINED, ListLog

from em_assets.results.artifacts import MODEL_FILE, sha256_file
from em_assets.training.stage import train_adapter


def _full(profile: dict) -> None:
    recipe = profile["recipes"]["med-r2"]
    del recipe["lora"]
    recipe["method"] = "full"


@pytest.mark.timeout(300)
def test_full_fine_tuning_killed_at_a_step_resumes_to_the_same_weights(ws, catalog_db, tmp_path):
    ws.edit(_full)
    train_killed_at_step(ws, TRAINED, 2, tmp_path / "train.log")
    adapters = ws.root / "artifacts" / "adapters" / TRAINED
    assert [p.name for p in adapters.glob("*/checkpoints/*")] == ["step-00000001"]
    assert count(ws.db, "lora_adapters", TRAINED) == 0

    log = ListLog()
    resumed = train_adapter(ws.ctx(TRAINED, "resumed", log=log))
    assert resumed.trained and resumed.resumed_from_step == 1
    assert not list(adapters.glob("*/checkpoints"))

    ref_root = tmp_path / "reference"
    reference = train_uninterrupted(ws, TRAINED, catalog_db, ref_root)
    assert reference.resumed_from_step is None and reference.config_hash == resumed.config_hash

    got = load_file(Path(resumed.adapter_path) / MODEL_FILE)
    want = load_file(Path(reference.adapter_path) / MODEL_FILE)
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert resumed.adapter_sha256 == reference.adapter_sha256

    row = organism_rows(ws.db, "lora_adapters", TRAINED).row(0, named=True)
    assert row["method"] == "full" and row["lora_config"] is None and row["steps"] == 3
    assert row["adapter_sha256"] == sha256_file(Path(row["adapter_path"]) / MODEL_FILE)
    # Every kept checkpoint is a loadable model directory pinned by its weights' sha256.
    ckpts = organism_rows(ws.db, "lora_checkpoints", TRAINED).sort("step")
    assert ckpts["step"].to_list() == [1, 2, 3]
    for path, sha in zip(ckpts["checkpoint_path"], ckpts["checkpoint_sha256"], strict=True):
        assert sha256_file(Path(path) / MODEL_FILE) == sha and (Path(path) / "config.json").exists()
    assert organism_rows(ws.db, "training_losses", TRAINED)["grad_norm"].null_count() == 0
