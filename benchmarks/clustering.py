"""Benchmark the clustering methods on synthetic CLIP-like features and print a table.

Data: N points in D dimensions drawn around 16 random unit centres with unequal masses (1 to 4),
projected onto the sphere (`clustering.synthetic.make_sphere_blobs`, spread 1.0 so blobs overlap).
Every method runs ``--n-iter`` iterations on ``--threads`` CPU threads:

- two-stage: FAISS spherical k-means into 1024 fine clusters, then balanced coarse k-means (K = 2),
  balanced by samples (default) and by centroids (reference behaviour);
- single-stage balanced k-means, K = 2 and 8, and K = 8 with N + 3 points (N not divisible by K);
- FAISS unbalanced spherical k-means and scikit-learn's KMeans (Lloyd, one init), K = 8.

Columns: wall time, cluster sizes as shares, balance ratio (max/min size), mean cosine of each
point to its centroid (for two-stage: to its coarse centroid). With ``--memory``, the peak
resident memory of single-stage K = 8 at ``--memory-n`` points is measured in a fresh process and
reported as a multiple of the feature matrix.

Usage:
    python benchmarks/clustering.py [--n 100000] [--dim 512] [--threads 2] [--n-iter 20] [--memory]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _row(
    name: str, seconds: float, assignments: np.ndarray, n_clusters: int, mean_cosine: float, note: str = ""
) -> str:
    sizes = np.bincount(assignments, minlength=n_clusters)
    shares = (
        "/".join(f"{100 * s / sizes.sum():.2f}" for s in sizes)
        if n_clusters <= 2
        else f"{sizes.min()}..{sizes.max()}"
    )
    ratio = sizes.max() / max(sizes.min(), 1)
    return f"| {name} | {seconds:.2f} | {shares} | {ratio:.4f} | {mean_cosine:.4f} | {note} |"


def _mean_cosine(features: np.ndarray, centroids: np.ndarray, assignments: np.ndarray) -> float:
    return float(np.einsum("nd,nd->n", features, centroids[assignments]).mean())


def run_table(args: argparse.Namespace) -> list[str]:
    import faiss
    import torch
    from sklearn.cluster import KMeans

    from clustering.kmeans import balanced_spherical_kmeans, faiss_spherical_kmeans, two_stage_kmeans
    from clustering.synthetic import make_sphere_blobs

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    features, _ = make_sphere_blobs(
        args.n + 3, args.dim, 16, spread=1.0, masses=np.linspace(1, 4, 16), seed=0
    )
    odd = features
    features = features[: args.n]
    rows = [
        "| method | seconds | shares % (K=2) or min..max size | balance ratio | mean cosine | notes |",
        "| --- | ---: | --- | ---: | ---: | --- |",
    ]

    for balance_by in ("samples", "centroids"):
        start = time.perf_counter()
        result = two_stage_kmeans(features, 1024, 2, n_iter=args.n_iter, seed=0, balance_by=balance_by)
        seconds = time.perf_counter() - start
        cosine = _mean_cosine(features, result.coarse.centroids, result.coarse_assignments)
        fine_cosine = _mean_cosine(features, result.fine.centroids, result.fine.assignments)
        note = f"fine stage {result.fine.seconds:.2f} s, mean cosine to fine centroid {fine_cosine:.4f}"
        rows.append(
            _row(
                f"two-stage 1024 -> 2, balance by {balance_by}",
                seconds,
                result.coarse_assignments,
                2,
                cosine,
                note,
            )
        )
        print(rows[-1], flush=True)

    for n_clusters, data, label in ((2, features, ""), (8, features, ""), (8, odd, f", N = {len(odd)}")):
        result = balanced_spherical_kmeans(data, n_clusters, n_iter=args.n_iter, seed=0, device="cpu")
        note = f"{len(result.stats)} iterations, {sum(s['newton_steps'] for s in result.stats)} Newton steps"
        cosine = _mean_cosine(data, result.centroids, result.assignments)
        rows.append(
            _row(
                f"single-stage balanced, K = {n_clusters}{label}",
                result.seconds,
                result.assignments,
                n_clusters,
                cosine,
                note,
            )
        )
        print(rows[-1], flush=True)

    result = faiss_spherical_kmeans(features, 8, n_iter=args.n_iter, seed=0, use_gpu=False)
    rows.append(_row("FAISS spherical k-means (unbalanced), K = 8", result.seconds, result.assignments, 8,
                     _mean_cosine(features, result.centroids, result.assignments)))  # fmt: skip
    print(rows[-1], flush=True)

    start = time.perf_counter()
    kmeans = KMeans(8, n_init=1, max_iter=args.n_iter, tol=0.0, algorithm="lloyd", random_state=0).fit(
        features
    )
    seconds = time.perf_counter() - start
    centroids = kmeans.cluster_centers_ / np.linalg.norm(kmeans.cluster_centers_, axis=1, keepdims=True)
    rows.append(_row("scikit-learn KMeans (Euclidean, unbalanced), K = 8", seconds, kmeans.labels_, 8,
                     _mean_cosine(features, centroids.astype(np.float32), kmeans.labels_), f"{kmeans.n_iter_} iterations"))  # fmt: skip
    print(rows[-1], flush=True)
    return rows


_MEMORY_PROBE = """
import resource, sys, numpy as np, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from clustering.kmeans import balanced_spherical_kmeans
balanced_spherical_kmeans(np.eye(16, 8, dtype=np.float32), 2, n_iter=1)  # load kernels before measuring
features = np.load({path!r})
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()  # current RSS
balanced_spherical_kmeans(features, 8, n_iter={n_iter}, seed=0, device="cpu")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(features.nbytes, before, after)
"""


def measure_memory(args: argparse.Namespace) -> str:
    """Peak RSS of single-stage K = 8 in a fresh process that only loads the features and clusters them."""
    import tempfile

    from clustering.synthetic import make_sphere_blobs

    features, _ = make_sphere_blobs(
        args.memory_n, args.dim, 16, spread=1.0, masses=np.linspace(1, 4, 16), seed=0
    )
    with tempfile.TemporaryDirectory() as directory:
        path = str(Path(directory) / "features.npy")
        np.save(path, features)
        del features
        code = _MEMORY_PROBE.format(root=str(Path(__file__).resolve().parent.parent), threads=args.threads,
                                    path=path, n_iter=args.n_iter)  # fmt: skip
        output = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
    nbytes, before, after = map(int, output.split())
    # "before" is the resident memory after loading torch and the features (Linux /proc), so the
    # peak's growth over it is k-means' own working memory beside the feature matrix it was given.
    growth = max(after - before, 0)
    return (
        f"single-stage K = 8, N = {args.memory_n}: features {nbytes / 2**20:.0f} MiB; k-means raised the "
        f"peak RSS by {growth / 2**20:.0f} MiB ({growth / nbytes:.2f}x the features), to {after / 2**20:.0f} MiB "
        f"for the whole process (torch included)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000, help="Points.")
    parser.add_argument("--dim", type=int, default=512, help="Feature dimension.")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch, FAISS and BLAS.")
    parser.add_argument("--n-iter", type=int, default=20, help="Iterations of every method.")
    parser.add_argument(
        "--memory", action="store_true", help="Also measure peak memory of single-stage K = 8."
    )
    parser.add_argument("--memory-n", type=int, default=200_000, help="Points for the memory measurement.")
    parser.add_argument("--memory-only", action="store_true", help="Skip the table; measure memory only.")
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs visible, {args.threads} threads; N = {args.n}, D = {args.dim}, {args.n_iter} iterations")  # fmt: skip
    from threadpoolctl import threadpool_limits

    if not args.memory_only:
        with threadpool_limits(limits=args.threads):
            rows = run_table(args)
        print()
        print("\n".join(rows))
    if args.memory or args.memory_only:
        print()
        print(measure_memory(args))


if __name__ == "__main__":
    main()
