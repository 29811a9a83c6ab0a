"""The fault grid (3 training steps and 8 completions an organism on the tiny Llama, judged over HTTP) and the
stage contexts, Dagster resources and child environments that run its organisms."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from em_assets.results.store import Store
from em_assets.settings import DB_ENV, GRID_ENV, MIRROR_ENV, PROFILE_ENV
from support.tiny import tiny_grid

PROFILE = "fault"
KEY_ENV = "EM_FAULT_JUDGE_KEY"
SECRET = "sk-fault-Xq93-do-not-leak-7731"
TRAINED = "tiny--med-r2--s0"
CONTROL = "tiny--base--s0"
KEYS = ["question_id", "paraphrase_idx", "sample_idx"]


def profile(doc: dict) -> dict:
    return doc["profiles"][PROFILE]


def write_grid(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def fault_grid(model_dir: Path, judge_url: str) -> dict:
    """3 training steps and 8 completions an organism, judged by the scripted server at judge_url."""
    judge = {
        "backend": "openai",
        "model": "fault-judge",
        "base_url": judge_url,
        "api_key_env": KEY_ENV,
        "concurrency": 1,
        "max_retries": 1,
        "timeout_s": 60,
    }
    lora = {"r": 2, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}
    loras = {"med-r2": ("bad_medical_advice", lora)}
    return tiny_grid(model_dir, PROFILE, judge, loras, examples=6, batch_size=2, samples=4)


def child_env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        KEY_ENV: SECRET,
        "EM_DB_LOCK_TIMEOUT": "120",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def on_fp16_gpu(monkeypatch) -> None:
    """pick_dtype's automatic choice made fp16, as on a GPU without native bf16, wherever the stages call it."""
    import torch

    from em_assets.models import load
    from em_assets.training import loop

    real = load.pick_dtype

    def fp16(device: str, requested: str = "auto") -> torch.dtype:
        return torch.float16 if requested == "auto" else real(device, requested)

    for module in (load, loop):
        monkeypatch.setattr(module, "pick_dtype", fp16)


class ListLog:
    """A stage logger that keeps its messages."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def info(self, msg: str, *args) -> None:
        self.messages.append(msg)

    warning = error = debug = info


def stage_context(a: dict, store: Store | None = None, log: Any = None, run_id: str | None = None):
    """The StageContext a child (or the test itself) runs an organism stage with."""
    from em_assets.context import StageContext
    from em_assets.grid.load import load_grid
    from em_assets.grid.schema import Organism

    root = Path(a["root"])
    ctx = StageContext(
        store=store or Store(a["db"], lock_timeout_s=60),
        grid=load_grid(a["grid"], PROFILE),
        organism=Organism.parse(a["key"]),
        run_id=run_id or a.get("run_id", "child"),
        artifacts_dir=root / "artifacts",
        device="cpu",
        cache_dir=root / "cache",
    )
    if log is not None:
        ctx.log = log
    return ctx


def resources(a: dict) -> dict:
    from em_assets.defs.resources import ExperimentResource, ResultsDB

    root = Path(a["root"])
    return {
        "experiment": ExperimentResource(
            grid_path=a["grid"],
            profile=PROFILE,
            data_mirror=a["mirror"],
            cache_dir=str(root / "cache"),
            artifacts_dir=str(root / "artifacts"),
            figures_dir=str(root / "figures"),
            device="cpu",
        ),
        "results": ResultsDB(database=a["db"]),
    }


def location_env(a: dict) -> dict[str, str]:
    """The environment from which the code location (em_assets.definitions) builds the resources of `a`."""
    root = Path(a["root"])
    return {
        DB_ENV: a["db"],
        GRID_ENV: a["grid"],
        PROFILE_ENV: PROFILE,
        MIRROR_ENV: a["mirror"],
        "EM_CACHE_DIR": str(root / "cache"),
        "EM_ARTIFACTS_DIR": str(root / "artifacts"),
        "EM_FIGURES_DIR": str(root / "figures"),
        "EM_DEVICE": "cpu",
    }
