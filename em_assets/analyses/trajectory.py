"""Statistics of a LoRA adapter's path through training (Turner et al.'s phase-transition analysis), numpy only.

Vectors are one adapted module's flattened B (or A) matrix, one per checkpoint in step order. The local cosine
at checkpoint t compares the moves to the checkpoints k back and k ahead, with t as the origin:
cos(v[t-k] - v[t], v[t+k] - v[t]). A straight path gives -1; the sharper the turn, the higher the value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cosine similarity of two vectors; None when either is zero."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return None
    return float(np.dot(a.ravel(), b.ravel()) / (na * nb))


def local_cosines(vectors: Sequence[np.ndarray], k: int) -> list[float | None]:
    """cos(v[t-k] - v[t], v[t+k] - v[t]) per checkpoint t; None within k of either end."""
    if k < 1:
        raise ValueError(f"local cosine needs k >= 1, got {k}")
    n = len(vectors)
    return [
        cosine(vectors[t - k] - vectors[t], vectors[t + k] - vectors[t]) if k <= t < n - k else None
        for t in range(n)
    ]


def pca_2d(vectors: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each vector's coordinates on the trajectory's first two principal components, and their variance shares.

    Components beyond the trajectory's rank come out as zeros (one checkpoint: all zeros).
    """
    x = np.stack([np.asarray(v, dtype=np.float64).ravel() for v in vectors])
    centred = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    coords = np.zeros((x.shape[0], 2))
    share = np.zeros(2)
    m = min(2, s.size)
    coords[:, :m] = u[:, :m] * s[:m]
    total = float((s**2).sum())
    if total > 0:
        share[:m] = s[:m] ** 2 / total
    return coords, share


@dataclass(frozen=True)
class ModuleTrajectory:
    """One module's statistics per checkpoint (in step order) and the step of its sharpest turn."""

    module: str
    steps: list[int]
    a_norm: list[float]
    b_norm: list[float]
    cos_final: list[float | None]
    local_cos: list[float | None]
    pc1: list[float]
    pc2: list[float]
    pc_share: tuple[float, float]
    sharpest_step: int | None


def module_trajectory(
    module: str, steps: Sequence[int], a: Sequence[np.ndarray], b: Sequence[np.ndarray], k: int
) -> ModuleTrajectory:
    """Norms of A and B, cosine of B with the last (final) B, local cosine of B, and B's 2-D PCA."""
    if not len(steps) == len(a) == len(b) or not steps:
        raise ValueError(f"{module}: need one A and one B per step, got {len(steps)}, {len(a)}, {len(b)}")
    if list(steps) != sorted(set(steps)):
        raise ValueError(f"{module}: steps must increase, got {list(steps)}")
    b = [np.asarray(v, dtype=np.float64).ravel() for v in b]
    local = local_cosines(b, k)
    coords, share = pca_2d(b)
    turns = [(c, s) for c, s in zip(local, steps, strict=True) if c is not None]
    return ModuleTrajectory(
        module=module,
        steps=list(steps),
        a_norm=[float(np.linalg.norm(v)) for v in a],
        b_norm=[float(np.linalg.norm(v)) for v in b],
        cos_final=[cosine(v, b[-1]) for v in b],
        local_cos=local,
        pc1=coords[:, 0].tolist(),
        pc2=coords[:, 1].tolist(),
        pc_share=(float(share[0]), float(share[1])),
        sharpest_step=max(turns)[1] if turns else None,
    )
