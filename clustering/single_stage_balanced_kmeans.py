"""Single-stage clustering: balanced spherical k-means straight on the features, exact sizes.

Cluster sizes differ by at most 1. The assignment step solves the size-constrained assignment
through Newton's method on its K-variable (entropy-smoothed) dual, then rounds to exact sizes;
``clustering/kmeans.py`` explains the algorithm and why it was chosen. Runs on CUDA when visible.

The saved ``clustering_assignments.npy`` is the balanced assignment. The router sends a feature
to its nearest centroid by cosine, which can differ for points near a boundary: the metadata
reports how many training points the router sends elsewhere and the sizes it would produce.

Usage:
    python clustering/single_stage_balanced_kmeans.py features.npy --output-dir runs/clusters --n-clusters 8
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from clustering import results
from clustering.kmeans import balanced_spherical_kmeans, check_cluster_count
from clustering.router import ASSIGNMENTS, CENTROIDS, GLOBAL_MEAN


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    results.add_common_arguments(parser)
    parser.add_argument("--n-clusters", type=int, required=True, help="K, experts.")
    parser.add_argument("--device", default=None, help="torch device; CUDA when visible, else CPU.")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Cluster, write the results directory and return its metadata."""
    start = time.perf_counter()
    output_dir = results.prepare_output_dir(args.output_dir, args.overwrite)
    raw = results.load_features(args.features)
    features, mean = results.center_features(raw, args.subtract_mean)
    check_cluster_count(args.n_clusters, len(features))
    load_seconds = time.perf_counter() - start

    clustering = balanced_spherical_kmeans(
        features, args.n_clusters, n_iter=args.n_iter, seed=args.seed, device=args.device
    )
    results.save_array(output_dir, CENTROIDS, clustering.centroids)
    results.save_array(output_dir, ASSIGNMENTS, clustering.assignments)
    if mean is not None:
        results.save_array(output_dir, GLOBAL_MEAN, mean)

    similarities = features @ clustering.centroids.T  # (N, K)
    own = similarities[np.arange(len(features)), clustering.assignments]
    routed = similarities.argmax(axis=1)
    summary = results.size_summary(clustering.assignments, args.n_clusters)
    routed_summary = results.size_summary(routed, args.n_clusters)
    metadata: dict[str, Any] = {
        "method": "single_stage",
        "arguments": vars(args),
        "n_samples": len(features),
        "dim": features.shape[1],
        "n_clusters": args.n_clusters,
        "subtract_mean": bool(args.subtract_mean),
        "cluster_sizes": summary["sizes"],
        "cluster_shares": summary["shares"],
        "balance_ratio": summary["balance_ratio"],
        "mean_cosine_to_centroid": float(own.mean()),
        "router_agreement": float((routed == clustering.assignments).mean()),
        "router_cluster_sizes": routed_summary["sizes"],
        "router_balance_ratio": routed_summary["balance_ratio"],
        "iterations": len(clustering.stats),
        "stats": clustering.stats,
        "timings": {"load": load_seconds, "kmeans": clustering.seconds},
        "versions": results.library_versions(),
    }
    if args.plot_samples:
        from clustering.plots import plot_tsne

        title = f"single-stage balanced k-means, K = {args.n_clusters}"
        plot = plot_tsne(
            features,
            clustering.assignments,
            output_dir / results.TSNE_PLOT,
            args.plot_samples,
            args.seed,
            title,
        )
        metadata["timings"]["plot"] = plot["seconds"]
    metadata["timings"]["total"] = time.perf_counter() - start
    results.save_metadata(output_dir, metadata)
    return metadata


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    problems = results.check_common_arguments(parser, args)
    if args.n_clusters < 1:
        problems.append(f"--n-clusters must be >= 1, got {args.n_clusters}")
    if problems:
        parser.error("; ".join(problems))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metadata = run(args)
    print(
        f"single-stage: {metadata['n_samples']} samples -> {metadata['n_clusters']} clusters, sizes "
        f"{metadata['cluster_sizes']} (balance ratio {metadata['balance_ratio']:.4f}), mean cosine "
        f"{metadata['mean_cosine_to_centroid']:.4f}, router agreement {metadata['router_agreement']:.4f}, "
        f"{metadata['timings']['total']:.1f} s -> {args.output_dir}"
    )
    return metadata


if __name__ == "__main__":
    main()
