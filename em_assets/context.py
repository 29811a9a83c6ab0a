"""What every organism stage needs: where results go, the grid, the organism, and a logger."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em_assets.grid.schema import GridConfig, Organism, RecipeSpec, adapter_config_hash
from em_assets.results import queries
from em_assets.results.errors import MissingUpstreamError
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

    def trained_hash(self, recipe: RecipeSpec, base_revision: str, dtype: str) -> str:
        """The config hash of the weights the organism's recipe trains, with its datasets as the store holds them."""
        dataset = queries.training_dataset(self.store, recipe.dataset)
        kl = queries.training_dataset(self.store, recipe.kl.dataset) if recipe.kl else None
        return adapter_config_hash(
            base_revision, dataset["sha256"], recipe, self.organism.seed, dtype, kl["sha256"] if kl else None
        )

    def current_adapter(self) -> dict:
        """The organism's lora_adapters row; for a recipe that trains, refused unless the grid's recipe as it
        now stands trained it (a retraining that failed leaves the last one, whose answers would carry the new
        recipe's name)."""
        from em_assets.models.load import dtype_name  # torch stays off the definitions' load path

        row = queries.adapter_row(self.store, self.key)
        recipe = self.grid.recipes.get(self.organism.recipe)
        if recipe is None or recipe.kind != "train" or recipe.dataset is None:
            return row
        base = queries.base_model_row(self.store, self.organism.base_model)
        if row["config_hash"] != self.trained_hash(recipe, base["revision"], dtype_name(self.device)):
            raise MissingUpstreamError(
                f"organism {self.key}: its adapter was trained with other settings than its recipe's now "
                "(a training of these has not finished); materialise lora_adapter first"
            )
        return row
