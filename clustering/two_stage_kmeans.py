"""Two-stage clustering: FAISS spherical k-means into fine clusters, then balanced coarse clusters.

Stage 1 clusters every feature (no subsampling) into ``--n-fine-clusters`` with FAISS spherical
k-means, on GPU when faiss finds one. Stage 2 groups the fine centroids into
``--n-coarse-clusters`` experts with balanced k-means (see ``clustering/kmeans.py``). By default
each fine centroid weighs its cluster's size, so the experts' sample shares come out within
``--balance-tolerance`` of 1/K (0.01: one percentage point); ``--balance-by centroids`` balances the number of fine
centroids per expert instead, as the reference implementation does.

Routing (``clustering/router.py``) sends a feature to the expert that owns its nearest fine
centroid, so the saved fine assignments mapped through ``clustering_fine_to_coarse_mapping.npy``
are exactly the training routes.

Usage:
    python clustering/two_stage_kmeans.py features.npy --output-dir runs/clusters \
        --n-fine-clusters 1024 --n-coarse-clusters 2
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clustering import results
from clustering.kmeans import two_stage_kmeans
from clustering.router import (
    COARSE_CENTROIDS,
    FINE_ASSIGNMENTS,
    FINE_CENTROIDS,
    FINE_TO_COARSE,
    GLOBAL_MEAN,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    results.add_common_arguments(parser)
    parser.add_argument("--n-fine-clusters", type=int, default=1024, help="F, fine FAISS clusters.")
    parser.add_argument("--n-coarse-clusters", type=int, default=2, help="K, experts.")
    parser.add_argument(
        "--balance-by",
        choices=("samples", "centroids"),
        default="samples",
        help="Balance the experts' sample counts (default) or their numbers of fine centroids (reference).",
    )
    parser.add_argument(
        "--balance-tolerance",
        type=float,
        default=0.01,
        help="With --balance-by samples: allowed |share - 1/K| per expert (0.01 is one percentage point).",
    )
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Cluster, write the results directory and return its metadata."""
    start = time.perf_counter()
    output_dir = results.prepare_output_dir(args.output_dir, args.overwrite)
    raw = results.load_features(args.features)
    features, mean = results.center_features(raw, args.subtract_mean)
    load_seconds = time.perf_counter() - start

    clustering = two_stage_kmeans(
        features,
        n_fine_clusters=args.n_fine_clusters,
        n_coarse_clusters=args.n_coarse_clusters,
        n_iter=args.n_iter,
        seed=args.seed,
        balance_by=args.balance_by,
        balance_tolerance=args.balance_tolerance,
    )
    fine, coarse = clustering.fine, clustering.coarse
    results.save_array(output_dir, FINE_CENTROIDS, fine.centroids)
    results.save_array(output_dir, FINE_ASSIGNMENTS, fine.assignments)
    results.save_array(output_dir, COARSE_CENTROIDS, coarse.centroids)
    results.save_array(output_dir, FINE_TO_COARSE, clustering.fine_to_coarse)
    if mean is not None:
        results.save_array(output_dir, GLOBAL_MEAN, mean)

    n_fine, n_coarse = args.n_fine_clusters, args.n_coarse_clusters
    fine_cosine = np.einsum("nd,nd->n", features, fine.centroids[fine.assignments])  # (N,)
    coarse_cosine = np.einsum("nd,nd->n", features, coarse.centroids[clustering.coarse_assignments])
    summary = results.size_summary(clustering.coarse_assignments, n_coarse)
    fine_sizes = np.bincount(fine.assignments, minlength=n_fine)
    worst_share_error = max(abs(share - 1 / n_coarse) for share in summary["shares"])
    metadata: dict[str, Any] = {
        "method": "two_stage",
        "arguments": vars(args),
        "n_samples": len(features),
        "dim": features.shape[1],
        "n_fine_clusters": n_fine,
        "n_coarse_clusters": n_coarse,
        "subtract_mean": bool(args.subtract_mean),
        "cluster_sizes": summary["sizes"],
        "cluster_shares": summary["shares"],
        "balance_ratio": summary["balance_ratio"],
        "max_share_error": worst_share_error,
        "fine_centroids_per_cluster": np.bincount(clustering.fine_to_coarse, minlength=n_coarse).tolist(),
        "fine_cluster_sizes": {
            "min": int(fine_sizes.min()),
            "max": int(fine_sizes.max()),
            "empty": int((fine_sizes == 0).sum()),
        },
        "mean_cosine_to_fine_centroid": float(fine_cosine.mean()),
        "mean_cosine_to_coarse_centroid": float(coarse_cosine.mean()),
        "fine_stats": fine.stats,
        "coarse_stats": coarse.stats,
        "timings": {"load": load_seconds, "fine": fine.seconds, "coarse": coarse.seconds},
        "versions": results.library_versions(),
    }
    if args.balance_by == "samples" and worst_share_error > args.balance_tolerance:
        logging.getLogger(__name__).warning(
            "Coarse shares %s miss 1/K by %.2f points (tolerance %.2f); the largest fine cluster holds %d samples.",
            summary["shares"],
            100 * worst_share_error,
            100 * args.balance_tolerance,
            fine_sizes.max(),
        )
    if args.plot_samples:
        metadata["timings"]["plot"] = results_plot(features, clustering.coarse_assignments, output_dir, args)
    metadata["timings"]["total"] = time.perf_counter() - start
    results.save_metadata(output_dir, metadata)
    return metadata


def results_plot(
    features: np.ndarray, labels: np.ndarray, output_dir: Path, args: argparse.Namespace
) -> float:
    from clustering.plots import plot_tsne

    title = f"two-stage: {args.n_fine_clusters} fine -> {args.n_coarse_clusters} experts"
    return plot_tsne(features, labels, output_dir / results.TSNE_PLOT, args.plot_samples, args.seed, title)[
        "seconds"
    ]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    problems = results.check_common_arguments(parser, args)
    if args.n_fine_clusters < 1 or args.n_coarse_clusters < 1:
        problems.append(
            f"--n-fine-clusters and --n-coarse-clusters must be >= 1, got {args.n_fine_clusters} and {args.n_coarse_clusters}"
        )
    elif args.n_coarse_clusters > args.n_fine_clusters:
        problems.append(
            f"--n-coarse-clusters ({args.n_coarse_clusters}) must not exceed --n-fine-clusters ({args.n_fine_clusters})"
        )
    if not 0 < args.balance_tolerance < 1:
        problems.append(f"--balance-tolerance must be in (0, 1), got {args.balance_tolerance}")
    if problems:
        parser.error("; ".join(problems))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metadata = run(args)
    print(
        f"two-stage: {metadata['n_samples']} samples -> {metadata['n_fine_clusters']} fine -> "
        f"{metadata['n_coarse_clusters']} experts, sizes {metadata['cluster_sizes']} "
        f"(balance ratio {metadata['balance_ratio']:.4f}), mean cosine to fine centroid "
        f"{metadata['mean_cosine_to_fine_centroid']:.4f}, {metadata['timings']['total']:.1f} s -> {args.output_dir}"
    )
    return metadata


if __name__ == "__main__":
    main()
