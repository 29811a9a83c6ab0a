"""Experiment: fit_probe end to end on the mirror's reference files with the demo grid's probe spec (cold
feature cache), timed; the head is left in data/cache/judge/head/."""

import time
from pathlib import Path

from features import reference

from em_assets.grid.load import load_grid
from em_assets.judging.probe import ProbeFit, fit_probe
from em_assets.models.hub import resolve


def fit_demo_head(spec, path) -> ProbeFit:
    """fit_probe as the demo calls it, its features cached in data/cache/judge/fitcache."""
    return fit_probe(
        path,
        reference(),
        spec,
        Path("data/cache/judge/head"),
        "cpu",
        None,
        Path("data/cache/judge/fitcache"),
        {"aligned": 30, "coherent": 50},
    )


def main() -> None:
    grid = load_grid("data/grid.yaml", "demo")
    path = resolve("smollm2", grid.probe.source).path
    # The first fit fills the feature cache; the second reads it.
    for label in ("cold", "with the feature cache"):
        t = time.perf_counter()
        fit = fit_demo_head(grid.probe, path)
        print(
            f"fit_probe {label}: {fit.n_answers} rows, {fit.seconds:.0f} s (wall {time.perf_counter() - t:.0f} s)"
        )
    print(f"sign weights {fit.head.sign_weights}")


if __name__ == "__main__":
    main()
