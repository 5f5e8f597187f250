"""t-SNE scatter plot of a sample of clustered features, coloured by cluster."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def plot_tsne(
    features: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    n_samples: int = 5000,
    seed: int = 0,
    title: str = "",
) -> dict[str, float | int]:
    """Embed up to ``n_samples`` rows (at most 10000) with scikit-learn's TSNE and save a PNG.

    Args:
        features: (N, D) unit rows.
        labels: (N,) int cluster of each row; colours the points.
        path: output .png file.
        n_samples: rows drawn at random (seeded) from the N; all when N is smaller.
        seed: seed of the sample and of TSNE.

    Returns:
        ``{"points": plotted rows, "seconds": time}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    start = time.perf_counter()
    n_samples = min(n_samples, 10_000, len(features))
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(features), size=n_samples, replace=False))
    sample = features[rows]
    # PCA to 50 dimensions first, the usual step before t-SNE on high-dimensional embeddings.
    if sample.shape[1] > 50 and n_samples > 50:
        sample = PCA(n_components=50, random_state=seed).fit_transform(sample)
    perplexity = float(min(30, max(2, (n_samples - 1) // 3)))
    embedded = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        sample
    )

    figure, axes = plt.subplots(figsize=(7, 7))
    sample_labels = labels[rows]
    colours = plt.get_cmap("tab20" if labels.max() >= 10 else "tab10")
    for cluster in np.unique(sample_labels):
        mask = sample_labels == cluster
        axes.scatter(
            embedded[mask, 0], embedded[mask, 1], s=3, color=colours(cluster % colours.N), label=str(cluster)
        )
    if len(np.unique(sample_labels)) <= 20:
        axes.legend(markerscale=4, fontsize=7, title="cluster", loc="best")
    axes.set_title(title or f"t-SNE of {n_samples} features")
    axes.set_xticks([])
    axes.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return {"points": int(n_samples), "seconds": time.perf_counter() - start}
