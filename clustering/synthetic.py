"""Synthetic features on the unit sphere with planted clusters, for tests, benchmarks and the demo."""

from __future__ import annotations

import numpy as np


def make_sphere_blobs(
    n_samples: int,
    dim: int,
    n_blobs: int,
    spread: float = 0.3,
    masses: np.ndarray | list[float] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw points around ``n_blobs`` random unit centres and project them onto the sphere.

    Each point is ``normalize(centre + spread * g / sqrt(dim))`` with g standard normal, so
    ``spread`` is roughly the ratio of noise norm to centre norm. With 0.3, points have cosine
    about 0.96 to their centre, while random centres in 512-d have cosine near 0 to each other.

    Args:
        n_samples: N.
        dim: D.
        n_blobs: number of planted clusters.
        spread: noise scale relative to the unit centre.
        masses: (n_blobs,) relative blob sizes; equal when None. Sizes are rounded so they add
            up to N exactly.
        seed: seed of the NumPy generator.

    Returns:
        features: (N, D) float32 unit rows, in random order.
        labels: (N,) int64 blob id of each row.
    """
    if n_blobs < 1 or n_samples < n_blobs:
        raise ValueError(f"need 1 <= n_blobs <= n_samples, got n_blobs={n_blobs}, n_samples={n_samples}.")
    rng = np.random.default_rng(seed)
    weights = np.ones(n_blobs) if masses is None else np.asarray(masses, dtype=np.float64)
    if weights.shape != (n_blobs,) or (weights <= 0).any():
        raise ValueError(f"masses must be {n_blobs} positive numbers, got {masses}.")
    sizes = np.floor(weights / weights.sum() * n_samples).astype(np.int64)
    sizes[np.argsort(-weights)[: n_samples - sizes.sum()]] += 1  # hand out the rounding remainder

    centres = rng.standard_normal((n_blobs, dim)).astype(np.float32)  # (n_blobs, D)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.permutation(np.repeat(np.arange(n_blobs), sizes))  # (N,)
    noise = rng.standard_normal((n_samples, dim), dtype=np.float32) * np.float32(spread / np.sqrt(dim))
    features = centres[labels] + noise  # (N, D)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features.astype(np.float32, copy=False), labels.astype(np.int64)
