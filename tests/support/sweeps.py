"""Helpers for tests/pipeline/test_sweep.py: a test edit, the sweep grid and catalog, and a sweep child that kills itself.

The child runs as `python tests/support/sweeps.py '<json args>'`: run_sweep over `points(...)`, SIGKILLing its own
process after the first chunk of the point `kill_at` is written, so the kill lands between two committed chunks.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

# Run as a script too: the helpers are imported as `support.*` from tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from em_assets.analyses.edits import ModelEdit
from em_assets.analyses.sweep import SweepPoint
from support.tiny import tiny_grid

PROFILE = "sweep"


KEY = "tiny--med-r1--s0"


@dataclass(frozen=True)
class ScaleDownProj(ModelEdit):
    """Scale every MLP down_proj weight: a visible change to a tiny random model's answers."""

    factor: float

    def apply(self, model) -> None:
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.data.mul_(self.factor)


def sweep_grid(model_dir: Path, backend: str = "hf") -> dict:
    """The tiny Llama, one rank-1 recipe and the control, two questions, 6-token answers, judged by itself."""
    lora = {"r": 1, "lora_alpha": 8, "target_modules": ["down_proj"], "layer_fraction": 0.5}
    doc = tiny_grid(
        model_dir,
        PROFILE,
        {"backend": "local", "model": "tiny", "batch_size": 4, "min_mass": 0.0},
        {"med-r1": ("bad_medical_advice", lora)},
        examples=8,
        batch_size=4,
        samples=2,
    )
    doc["profiles"][PROFILE]["sampling"].update(backend=backend, workers=1, batch_size=2)
    return doc


def write_grid(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def sweep_catalog(root: Path, model_dir: Path, mirror: Path, datasets: bool = False) -> dict:
    """The sweep grid under root and a database with its base model, eval questions (and datasets, to train)."""
    from em_assets.catalog import stage as catalog
    from em_assets.grid.load import load_grid
    from em_assets.results.store import Store

    a = {"root": str(root), "db": str(root / "results.duckdb")}
    a["grid"] = str(write_grid(root / "grid.yaml", sweep_grid(model_dir)))
    grid = load_grid(a["grid"], PROFILE)
    store = Store(a["db"])
    store.init()
    catalog.resolve_base_models(store, grid, root / "cache")
    if datasets:
        catalog.load_training_datasets(store, grid, str(mirror))
    catalog.load_eval_questions(store, grid, str(mirror))
    return a


def points(adapter_path: str | None, adapter_sha256: str | None, samples: int = 2) -> list[SweepPoint]:
    """Three variants: the base model, the organism's adapter, and the base model with its MLPs halved."""
    return [
        SweepPoint("test", "base", None, None, samples_per_question=samples),
        SweepPoint("test", "adapter", adapter_path, adapter_sha256, samples_per_question=samples),
        SweepPoint("test", "halved", None, None, (ScaleDownProj(0.5),), samples_per_question=samples),
    ]


def stage_context(a: dict, run_id: str):
    from em_assets.context import StageContext
    from em_assets.grid.load import load_grid
    from em_assets.grid.schema import Organism
    from em_assets.results.store import Store

    root = Path(a["root"])
    return StageContext(
        store=Store(a["db"], lock_timeout_s=60),
        grid=load_grid(a["grid"], PROFILE),
        organism=Organism.parse(KEY),
        run_id=run_id,
        artifacts_dir=root / "artifacts",
        device="cpu",
        cache_dir=root / "cache",
    )


def main(a: dict) -> None:
    import torch

    from em_assets.analyses.sweep import run_sweep

    torch.set_num_threads(1)

    def kill_at(point, phase: str, done: int, total: int) -> None:
        # The chunk before this call is committed; later chunks of the point never get written.
        if phase == "sampled" and point.setting == a["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)

    run_sweep(stage_context(a, "killed"), points(a["adapter_path"], a["adapter_sha256"]), kill_at)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
