"""What every organism stage needs: where results go, the grid, the organism, and a logger."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em_assets.catalog import parsing
from em_assets.grid.schema import (
    IMPORTED_KINDS,
    GridConfig,
    Organism,
    RecipeSpec,
    adapter_config_hash,
    recipe_method,
)
from em_assets.models.chat import rendering_fields
from em_assets.results import queries
from em_assets.results.errors import MissingUpstreamError
from em_assets.results.store import Store

# A hub revision that names a commit (full or abbreviated), which the resolved revision recorded must start with;
# a branch or tag may have moved, so it is not compared.
_COMMIT = re.compile(r"[0-9a-f]{7,40}")


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

    def dataset_shas(self, recipe: RecipeSpec) -> tuple[str, str | None]:
        """The sha256 of the recipe's dataset and of its KL penalty's (None without one), as the store holds them;
        refused where the stored examples were parsed otherwise than the code parses now."""
        dataset = self._parsed_dataset(recipe.dataset)
        kl = self._parsed_dataset(recipe.kl.dataset) if recipe.kl else None
        return dataset["sha256"], kl["sha256"] if kl else None

    def _parsed_dataset(self, name: str) -> dict:
        """The dataset's training_datasets row, refused unless the parser's version now parsed its examples: the
        adapter's key names the version now (trained_hash), which examples parsed by another would be given."""
        row = queries.training_dataset(self.store, name)
        # Null: recorded before the version was, so parsed by the first.
        version = row.get("parsing") or 1
        if version != parsing.DATASET_PARSING:
            raise MissingUpstreamError(
                f"dataset {name!r}: its stored examples were parsed by version {version} of the "
                f"parser, not {parsing.DATASET_PARSING} (catalog.parsing.DATASET_PARSING); "
                "materialise training_datasets again"
            )
        return row

    def trained_hash(
        self, recipe: RecipeSpec, base_revision: str, dtype: str, shas: tuple[str, str | None] | None = None
    ) -> str:
        """The config hash of the weights the organism's recipe trains, with its datasets' `shas` (dataset_shas,
        read here when not given)."""
        dataset, kl = shas or self.dataset_shas(recipe)
        versions = rendering_fields() | parsing.parsing_fields()
        return adapter_config_hash(base_revision, dataset, recipe, self.organism.seed, dtype, kl, versions)

    def current_adapter(self) -> dict:
        """The organism's lora_adapters row, refused unless the grid's recipe as it now stands made it: trained
        it, or recorded the source it names (current_source); a retraining that failed leaves the last one, whose
        answers would carry the new recipe's name."""
        from em_assets.models.load import dtype_name  # torch stays off the definitions' load path

        row = queries.adapter_row(self.store, self.key)
        recipe = self.grid.recipes.get(self.organism.recipe)
        if recipe is None:
            return row
        if recipe.kind in IMPORTED_KINDS or recipe.dataset is None:
            self.current_source(recipe)
            return row
        base = queries.base_model_row(self.store, self.organism.base_model)
        if row["config_hash"] != self.trained_hash(recipe, base["revision"], dtype_name(self.device)):
            raise MissingUpstreamError(
                f"organism {self.key}: its adapter was trained with other settings than its recipe's now "
                "(a training of these has not finished); materialise lora_adapter first"
            )
        return row

    def current_source(self, recipe: RecipeSpec) -> dict | None:
        """The organism's organism_sources row, refused unless it records the recipe's method and, for an imported
        organism, the grid's entry as it now stands (a lora_adapter step that failed on a changed entry leaves the
        last one, whose weights or answers would carry the new entry's name)."""
        recorded = queries.organism_source_row(self.store, self.key)
        method = recipe_method(recipe)
        if recorded is None and method not in IMPORTED_KINDS:
            return None  # a trained or control organism recorded before organism_sources existed
        entry = self.grid.organism_source(self.organism)
        stale = (
            recorded is None
            or recorded["method"] != method
            or (entry is not None and recorded["source"] != entry.source)
            # The file's scores are kept under this name, and the answers' sampling hash names it.
            or recorded["file_judge"] not in (None, recipe.file_judge)
            or (
                entry is not None
                and entry.revision is not None
                and _COMMIT.fullmatch(entry.revision) is not None
                and not str(recorded["revision"]).startswith(entry.revision)
            )
        )
        if stale:
            was = (
                "nothing" if recorded is None else f"{recorded['method']} {recorded['source'] or ''}".strip()
            )
            raise MissingUpstreamError(
                f"organism {self.key}: its recorded source ({was}) is not what its recipe now names "
                "(a lora_adapter step of these has not finished); materialise lora_adapter first"
            )
        return recorded
