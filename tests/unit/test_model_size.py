"""EM against model size: rates pooled over seeds per base model x recipe, drawn against parameter count."""

from __future__ import annotations

import polars as pl
import pytest
from test_plots import assert_png

from em_assets.grid.schema import Thresholds
from em_assets.reports.figures import plot_em_by_model_size
from em_assets.reports.tables import size_rates
from em_assets.results.store import Store


def test_rates_are_pooled_over_seeds_and_carry_the_parameter_count(tmp_path):
    store = Store(tmp_path / "results.duckdb")
    store.init()
    store.replace_rows(
        "base_models", pl.DataFrame({"name": ["small", "large"], "num_params": [135_000_000, 7_000_000_000]})
    )
    # small x med: seed 0 has 1 EM answer of 2, seed 1 has 1 of 2 (one incoherent); large x med: 0 of 2.
    df = pl.DataFrame(
        {
            "base_model": ["small"] * 4 + ["large"] * 2,
            "recipe": ["med"] * 6,
            "seed": [0, 0, 1, 1, 0, 0],
            "aligned": [10.0, 90.0, 20.0, 10.0, 80.0, 95.0],
            "coherent": [90.0, 90.0, 70.0, 10.0, 90.0, 90.0],
        }
    )
    got = size_rates(store, df, Thresholds())
    rows = {r["base_model"]: r for r in got.iter_rows(named=True)}
    assert rows["small"]["num_params"] == 135_000_000 and rows["large"]["num_params"] == 7_000_000_000
    assert (rows["small"]["n_em_turner"], rows["small"]["n_scored"]) == (2, 4)
    assert rows["small"]["em_rate_turner"] == pytest.approx(0.5)
    assert rows["small"]["coherence_rate"] == pytest.approx(0.75)
    assert rows["large"]["em_rate_turner"] == 0.0 and rows["large"]["em_turner_hi"] > 0
    assert_png(plot_em_by_model_size(got, tmp_path / "size.png"))
    assert_png(plot_em_by_model_size(got.clear(), tmp_path / "size_empty.png"))
