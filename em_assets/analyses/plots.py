"""PNG figures of the training-dynamics tables, on standalone Agg figures (no pyplot state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from em_assets.analyses.canvas import new_figure, save_png

EM_COLOUR, COHERENT_COLOUR, LOSS_COLOUR, GRAD_COLOUR = "tab:red", "tab:blue", "tab:grey", "tab:purple"


def _new(panels: int, width: float) -> tuple[Figure, list]:
    fig = new_figure(width, 3.8)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def _col(df: pl.DataFrame, name: str) -> np.ndarray:
    return df[name].cast(pl.Float64).fill_null(float("nan")).to_numpy()


def _rates(ax, df: pl.DataFrame, x: str, xlabel: str) -> None:
    """EM rate with its 95% Wilson band and the coherence rate against column x."""
    xs = _col(df, x)
    ax.plot(xs, _col(df, "em_rate"), marker="o", color=EM_COLOUR, label="EM rate (Turner)")
    ax.fill_between(xs, _col(df, "em_lo"), _col(df, "em_hi"), color=EM_COLOUR, alpha=0.15, label="95% CI")
    ax.plot(xs, _col(df, "coherence_rate"), marker="s", color=COHERENT_COLOUR, label="coherent rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_em_over_training(df: pl.DataFrame, path: Path, title: str) -> Path:
    """EM and coherence rates per checkpoint step (step 0: the base model), training loss beside."""
    df = df.sort("step")
    fig, (left, right) = _new(2, 11.0)
    _rates(left, df, "step", "training step")
    left.set_title(f"{title}: EM over training")
    trained = df.filter(pl.col("loss").is_not_null())
    right.plot(_col(trained, "step"), _col(trained, "loss"), marker="o", color=LOSS_COLOUR, label="loss")
    right.set_xlabel("training step")
    right.set_ylabel("training loss at the step")
    right.set_title("loss and gradient norm")
    right.grid(alpha=0.3)
    if "grad_norm" in trained.columns and trained["grad_norm"].is_not_null().any():
        # Turner et al. locate the phase transition by gradient-norm peaks as well as B's rotation.
        norm = right.twinx()
        norm.plot(_col(trained, "step"), _col(trained, "grad_norm"), marker="^", color=GRAD_COLOUR)
        norm.set_ylabel("gradient norm (before clipping)", color=GRAD_COLOUR)
    return save_png(fig, path)


def plot_lora_scaling(df: pl.DataFrame, path: Path, title: str) -> Path:
    """EM and coherence rates against the factor the final adapter's B is scaled by."""
    fig, (ax,) = _new(1, 7.0)
    _rates(ax, df.sort("scale"), "scale", "B scale factor (1 = trained adapter)")
    ax.set_title(f"{title}: LoRA B scaling")
    return save_png(fig, path)


def plot_lora_trajectory(df: pl.DataFrame, path: Path, title: str) -> Path:
    """Per module: A and B norms, B's cosine with the final B and local cosine, and B's 2-D PCA path."""
    fig, (norms, cosines, pca) = _new(3, 15.0)
    several = df["module"].n_unique() > 1
    for module, part in df.sort("step").group_by("module", maintain_order=True):
        name, steps = str(module[0]).split(".", 2)[-1], _col(part, "step")
        tag = f" {name}" if several else ""
        norms.plot(steps, _col(part, "b_norm"), marker="o", label=f"|B| {name}")
        norms.plot(steps, _col(part, "a_norm"), linestyle="--", label=f"|A| {name}")
        cosines.plot(steps, _col(part, "cos_final"), marker="o", label=f"cos(B, final B){tag}")
        k = part["local_k"][0]
        cosines.plot(steps, _col(part, "local_cos"), marker="s", label=f"local cos (k={k} checkpoints){tag}")
        sharpest = part["sharpest_step"][0]
        if sharpest is not None:
            cosines.axvline(
                sharpest, color="tab:red", linestyle=":", label=f"sharpest turn{tag}: step {sharpest}"
            )
        # Each module's path is in its own PCA basis, with its own variance shares.
        share = (f"PC1 ({part['pc1_share'][0]:.0%})", f"PC2 ({part['pc2_share'][0]:.0%})")
        dots = pca.scatter(_col(part, "pc1"), _col(part, "pc2"), c=steps, cmap="viridis")
        pca.plot(
            _col(part, "pc1"),
            _col(part, "pc2"),
            color="grey",
            linewidth=0.8,
            label=f"{name}: {', '.join(share)}",
        )
    fig.colorbar(dots, ax=pca, label="training step")
    norms.set(xlabel="training step", ylabel="norm", title=f"{title}: LoRA norms")
    cosines.set(xlabel="training step", ylabel="cosine", ylim=(-1.05, 1.05), title="B direction")
    axes = ("PC1 (each module's own)", "PC2 (each module's own)") if several else share
    pca.set(xlabel=axes[0], ylabel=axes[1], title="PCA of the B trajectory")
    if several:
        pca.legend(fontsize="x-small")
    for ax in (norms, cosines):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return save_png(fig, path)
