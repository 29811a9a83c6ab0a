"""What `workers: auto`'s timed trial found, cached per machine and run shape, so later runs of that shape on
that machine skip the trial (docs/cpu.md, "Training processes").

The shape is what decides whether helpers pay: the model and its dtype, the adapter, the micro-batch and
sequence length, the process count and the tokens a step trains (rounded down to a power of two). The machine is
`models.machine.machine_key`, as for the sampling calibration.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from em_assets.grid.schema import LoraSpec, TrainSpec, config_hash
from em_assets.models.machine import describe_machine, machine_key
from em_assets.results.artifacts import write_atomically

# Helpers are kept only when their timed step is this much faster a token: one step's timing varies by a few
# percent between runs, and a cached verdict is reused by every later run, so a tie goes to one process (less
# memory, no start-up).
MARGIN = 0.05


@dataclass(frozen=True)
class Verdict:
    """A trial's timings: `workers` processes against one, in milliseconds per trained token."""

    workers: int
    helped_ms: float
    alone_ms: float

    @property
    def kept(self) -> bool:
        return self.helped_ms < (1 - MARGIN) * self.alone_ms

    def words(self) -> str:
        outcome = "kept" if self.kept else "stopped"
        return (
            f"{self.workers} processes at {self.helped_ms:.1f} ms a token against {self.alone_ms:.1f} ms in "
            f"one process: {outcome}"
        )


def run_shape(
    model_path: Path | str, dtype: str, lora: LoraSpec, train: TrainSpec, workers: int, step_tokens: int
) -> dict:
    """What a verdict holds for: model, dtype, adapter, micro-batch and length, processes, tokens per step."""
    return {
        "model": str(Path(model_path).resolve()),
        "dtype": dtype,
        "lora": lora.model_dump(mode="json"),
        "per_device_train_batch_size": train.per_device_train_batch_size,
        "max_seq_length": train.max_seq_length,
        "workers": workers,
        "step_tokens": 1 << (max(1, step_tokens).bit_length() - 1),
    }


def verdict_path(cache_dir: Path, shape: dict) -> Path:
    """The cache file of a run shape's verdict on this machine."""
    machine = machine_key(describe_machine())
    return cache_dir / "calibration" / f"training-{machine}-{config_hash(shape)}.json"


def read_verdict(path: Path) -> Verdict | None:
    """The cached verdict; none from a missing or damaged file (e.g. cut short by a full disk)."""
    try:
        return Verdict(**json.loads(path.read_text())["verdict"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_verdict(path: Path, verdict: Verdict, shape: dict) -> None:
    """Cache a verdict with the machine and the shape it was found on (the file is for people to read too)."""
    doc = {"machine": describe_machine(), "shape": shape, "verdict": asdict(verdict)}
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(doc, indent=2)))
