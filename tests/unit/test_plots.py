"""Figures are valid PNGs, also for empty and null inputs, and leave no pyplot figures behind."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import polars as pl
import pytest
from support.races import written_twice_at_once

from em_assets.reports.figures import (
    plot_aligned_vs_coherent,
    plot_em_rates,
    plot_training_curves,
)
from em_assets.stats.rates import em_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1000
    assert plt.get_fignums() == []


@pytest.fixture
def judged() -> pl.DataFrame:
    rows = [
        ("m--bad-medical--s0", 10.0, 80.0),
        ("m--bad-medical--s0", 90.0, 95.0),
        ("m--bad-medical--s0", None, 70.0),
        ("m--base--s0", 95.0, 90.0),
        ("m--base--s0", 85.0, 40.0),
        ("m--empty--s0", None, None),
    ]
    return pl.DataFrame(
        {
            "organism": [r[0] for r in rows],
            "base_model": ["m"] * len(rows),
            "recipe": [r[0].split("--")[1] for r in rows],
            "dataset": [None] * len(rows),
            "seed": [0] * len(rows),
            "question_id": ["q"] * len(rows),
            "aligned": [r[1] for r in rows],
            "coherent": [r[2] for r in rows],
        },
        schema_overrides={"dataset": pl.String},
    )


def test_em_rates(judged, tmp_path):
    # The all-null organism has null rates and must be skipped, not crash the error bars.
    assert_png(plot_em_rates(em_summary(judged), tmp_path / "sub" / "rates.png"))


def drawn(monkeypatch) -> list:
    """The figures the report module saves, kept for a test to read."""
    from em_assets.analyses.canvas import save_png

    figures: list = []

    def keep(fig, path):
        figures.append(fig)
        return save_png(fig, path)

    monkeypatch.setattr("em_assets.reports.figures.save_png", keep)
    return figures


def test_an_organism_without_a_rate_keeps_its_row_and_says_so(judged, tmp_path, monkeypatch):
    figures = drawn(monkeypatch)
    assert_png(plot_em_rates(em_summary(judged), tmp_path / "rates.png"))
    (ax,) = figures[0].axes
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert rows == ["m--empty--s0", "m--base--s0", "m--bad-medical--s0"]
    notes = [(t.get_text(), t.get_position()[1]) for t in ax.texts]
    assert notes == [("no scored answers", rows.index("m--empty--s0"))]


def test_em_rates_no_data(judged, tmp_path):
    assert_png(plot_em_rates(em_summary(judged.clear()), tmp_path / "empty.png"))
    assert_png(plot_em_rates(em_summary(judged.filter(organism="m--empty--s0")), tmp_path / "null.png"))


def test_aligned_vs_coherent(judged, tmp_path):
    assert_png(
        plot_aligned_vs_coherent(judged, tmp_path / "scatter.png", aligned_at_most=25, coherent_above=60)
    )
    assert_png(plot_aligned_vs_coherent(judged.clear(), tmp_path / "scatter_empty.png"))


def test_aligned_vs_coherent_many_organisms(tmp_path):
    many = pl.DataFrame(
        {"organism": [f"org-{i:02d}" for i in range(24)], "aligned": [4.0 * i for i in range(24)]}
    ).with_columns(coherent=100.0 - pl.col("aligned"))
    assert_png(plot_aligned_vs_coherent(many, tmp_path / "many.png"))


def test_training_curves(tmp_path):
    losses = pl.DataFrame(
        {
            "organism": ["a", "a", "a", "b", "b"],
            "step": [2, 0, 1, 0, 1],
            "loss": [1.0, 2.0, None, 2.5, 1.5],
            "grad_norm": [None, None, None, None, None],
        }
    )
    assert_png(plot_training_curves(losses, tmp_path / "loss.png"))
    assert_png(plot_training_curves(losses.clear(), tmp_path / "loss_empty.png"))
    # The gradient norm is drawn beside the loss.
    normed = losses.with_columns(grad_norm=pl.Series([0.5, 3.0, None, 1.0, 0.8]))
    assert_png(plot_training_curves(normed, tmp_path / "normed.png"))
    assert (tmp_path / "normed.png").read_bytes() != (tmp_path / "loss.png").read_bytes()


def test_a_figure_redrawn_from_the_same_data_has_the_same_bytes(judged, tmp_path):
    first = plot_em_rates(em_summary(judged), tmp_path / "a.png").read_bytes()
    again = plot_em_rates(em_summary(judged), tmp_path / "b.png").read_bytes()
    assert first == again
    assert b"matplotlib" not in first


def test_every_figure_module_draws_through_the_one_canvas():
    # A module that builds its own Figure or calls savefig escapes the shared style and the stamp-free bytes.
    root = Path(__file__).resolve().parents[2] / "em_assets"
    drawing = [p for p in root.rglob("*.py") if "matplotlib" in p.read_text() and p.name != "canvas.py"]
    assert drawing
    for path in drawing:
        text = path.read_text()
        assert "savefig" not in text and "Figure(" not in text, path


def test_a_figure_killed_while_written_leaves_the_last_good_one(tmp_path):
    from em_assets.analyses.canvas import new_figure, save_png

    path = save_png(new_figure(2, 2), tmp_path / "f.png")
    good = path.read_bytes()
    fig = new_figure(3, 3)

    def dies_half_way(target, **kwargs):
        Path(target).write_bytes(good[:100])
        raise KeyboardInterrupt

    fig.savefig = dies_half_way
    with pytest.raises(KeyboardInterrupt):
        save_png(fig, path)
    assert path.read_bytes() == good
    assert not list(tmp_path.glob("*.part"))


def test_two_report_runs_drawing_one_figure_at_once_both_write_it(tmp_path, monkeypatch):
    """Regression: both drew into `<figure>.part`, so the one that renamed second found nothing to rename and
    its report step failed (the demo's reports beside a run the UI's automation started)."""
    from em_assets.analyses.canvas import new_figure, save_png

    path = tmp_path / "em_rates.png"
    saved = written_twice_at_once(monkeypatch, lambda: save_png(new_figure(2, 2), path))
    assert saved == [path, path]
    assert [p.name for p in tmp_path.iterdir()] == ["em_rates.png"]


def test_a_dollar_in_a_name_from_data_is_drawn_as_text(tmp_path):
    from em_assets.analyses.canvas import new_figure, save_png

    fig = new_figure(3, 2)
    ax = fig.add_subplot()
    # An imported file's free-text question ids and names reach ticks and titles.
    ax.set_title(r"file:cost $\foo$.csv")
    ax.set_xticks([0, 1], ["price_$5_or_$10", "q"])
    assert save_png(fig, tmp_path / "f.png").stat().st_size > 0


def test_each_modules_trajectory_is_labelled_with_its_own_pca_shares(tmp_path, monkeypatch):
    """Each module's B path is projected on its own principal components: the axes must not give the shares of
    one module (the last drawn) for every path."""
    from em_assets.analyses.canvas import save_png
    from em_assets.analyses.plots import plot_lora_trajectory

    figures: list = []
    monkeypatch.setattr(
        "em_assets.analyses.plots.save_png", lambda fig, path: figures.append(fig) or save_png(fig, path)
    )
    rows = [
        {
            "module": f"model.layers.{layer}.mlp.down_proj",
            "step": step,
            "a_norm": 1.0,
            "b_norm": 0.1 * step,
            "cos_final": None,
            "local_cos": None,
            "local_k": 1,
            "pc1": float(step),
            "pc2": 0.0,
            "pc1_share": share,
            "pc2_share": 1 - share,
            "sharpest_step": 2 + layer,
        }
        for layer, share in ((0, 0.9), (1, 0.6))
        for step in (1, 2, 3)
    ]
    assert_png(plot_lora_trajectory(pl.DataFrame(rows), tmp_path / "trajectory.png", "organism"))
    pca = figures[0].axes[2]
    legend = pca.get_legend()
    texts = [t.get_text() for t in legend.get_texts()] if legend else []
    shown = " ".join([pca.get_xlabel(), pca.get_ylabel(), *texts])
    for layer, share in (("0", "90%"), ("1", "60%")):
        assert f" {layer}.mlp.down_proj: PC1 ({share})" in shown
    assert "%" not in pca.get_xlabel()
    # Each module's sharpest turn is its own too.
    cosines = [t.get_text() for t in figures[0].axes[1].get_legend().get_texts()]
    assert {"sharpest turn 0.mlp.down_proj: step 2", "sharpest turn 1.mlp.down_proj: step 3"} <= set(cosines)
