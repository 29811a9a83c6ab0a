"""What every organism stage needs: where results go, the grid, the organism, and a logger."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em_assets.grid.schema import GridConfig, Organism
from em_assets.results.store import Store


@dataclass
class StageContext:
    """What every organism stage needs: where results go, the grid, the organism, and a logger."""

    store: Store
    grid: GridConfig
    organism: Organism
    run_id: str
    artifacts_dir: Path
    log: Any = field(default_factory=lambda: logging.getLogger("em_assets"))
    device: str | None = None
    cache_dir: Path | None = None
    # The upstream mirror the experiment resource names (None: EM_DATA_MIRROR, else download).
    data_mirror: str | None = None

    def __post_init__(self) -> None:
        # Every stage reads the organism's sampling from the grid; its base model may bring its own settings.
        sampling = self.grid.sampling_for(self.organism.base_model)
        if sampling is not self.grid.sampling:
            self.grid = self.grid.model_copy(update={"sampling": sampling})

    @property
    def key(self) -> str:
        return self.organism.key
