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

    @property
    def key(self) -> str:
        return self.organism.key
