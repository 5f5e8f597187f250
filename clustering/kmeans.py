"""Spherical k-means (FAISS) and balanced spherical k-means (torch, CPU or GPU).

Both work on L2-normalised rows and maximise the mean cosine between each point and its centroid.

Balanced assignment algorithm
-----------------------------
Each balanced k-means iteration solves an assignment problem: give every point one cluster so
that cluster k receives its capacity c_k (or a target mass, for weighted points) and the summed
cosine is maximal. This is a transportation problem with only K destinations, so its dual has
only K variables, the cluster prices p: at the optimum each point takes ``argmax_k(s_ik - p_k)``.

We find p by Newton's method on the entropy-smoothed dual
``D(p) = tau * sum_i w_i logsumexp_k((s_ik - p_k) / tau) + sum_k c_k p_k``. Its gradient is
``c - (soft cluster masses)`` and its K x K Hessian costs one (K, N) @ (N, K) product, so each
step is a few O(N K) passes and a handful of steps suffice, starting from the previous
iteration's prices. ``tau`` goes down a short schedule to ``tau_final`` (1e-3 in cosine units by
default), where the hard assignment ``argmax(s - p)`` misses the capacities by a few points at
most. A rounding step then makes the sizes exact: an over-full cluster keeps the points that
prefer it most, and the released points fill the remaining capacity in order of preference.

Why not the alternatives: the Hungarian algorithm is O(N^3) on the expanded problem; auction
algorithms and min-cost flow update prices one bid or one augmenting path at a time, which is
O(N) Python-level steps per iteration on CPU (the auction-based package the original authors
used takes about 21 s for N = 100k, K = 8); greedy assignment by sorted similarity is not
optimal and sorts N K pairs per iteration. Any assignment of the form ``argmax(s - p)`` is
optimal for the sizes it produces, so the result here is optimal up to the few rounding moves.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass
class KMeansResult:
    """Outcome of a k-means run.

    Attributes:
        centroids: (K, D) float32 unit centroids.
        assignments: (N,) int64 cluster of each point (balanced for balanced k-means, nearest
            centroid for FAISS k-means).
        stats: one dict per iteration; keys are documented by the function that returns it.
        seconds: wall-clock time of the whole run.
    """

    centroids: np.ndarray
    assignments: np.ndarray
    stats: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def check_cluster_count(n_clusters: int, n_points: int, name: str = "n_clusters") -> None:
    """Raise ``ValueError`` unless 1 <= n_clusters <= n_points."""
    if n_clusters < 1:
        raise ValueError(f"{name} must be >= 1, got {n_clusters}.")
    if n_clusters > n_points:
        raise ValueError(
            f"{name}={n_clusters} is larger than the number of points ({n_points}). "
            f"HINT: lower {name} or embed more images."
        )


def equal_capacities(n_points: int, n_clusters: int) -> np.ndarray:
    """Return (K,) int64 sizes that add up to N and differ by at most 1 (the first N % K get one more)."""
    capacities = np.full(n_clusters, n_points // n_clusters, dtype=np.int64)
    capacities[: n_points % n_clusters] += 1
    return capacities


# ---------------------------------------------------------------------------------------------
# FAISS spherical k-means


def faiss_spherical_kmeans(
    features: np.ndarray,
    n_clusters: int,
    n_iter: int = 20,
    seed: int = 0,
    use_gpu: bool | None = None,
) -> KMeansResult:
    """Run FAISS spherical k-means on every point (no subsampling) and assign each to its nearest centroid.

    Args:
        features: (N, D) float32 unit rows.
        n_clusters: K, in [1, N].
        n_iter: Lloyd iterations.
        seed: FAISS random seed for the initial centroids.
        use_gpu: run on all visible GPUs; None means "when faiss sees a GPU".

    Returns:
        `KMeansResult` whose stats hold FAISS's per-iteration ``obj`` (summed cosine), ``time``
        (s since start), ``time_search``, ``imbalance_factor`` and ``nsplit`` (empty clusters
        split), plus ``mean_cosine`` (obj / N).
    """
    import faiss

    check_cluster_count(n_clusters, len(features))
    if use_gpu is None:
        use_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    start = time.perf_counter()
    features = np.ascontiguousarray(features, dtype=np.float32)
    n_points, dim = features.shape
    kmeans = faiss.Kmeans(
        dim,
        n_clusters,
        niter=n_iter,
        spherical=True,
        seed=seed,
        gpu=bool(use_gpu),
        # FAISS samples max_points_per_centroid * K points by default; this keeps all of them.
        max_points_per_centroid=math.ceil(n_points / n_clusters) + 1,
        min_points_per_centroid=1,
        verbose=False,
    )
    kmeans.train(features)
    _, nearest = kmeans.index.search(features, 1)  # (N, 1)
    stats = [
        dict(entry, iteration=i, mean_cosine=entry["obj"] / n_points)
        for i, entry in enumerate(kmeans.iteration_stats)
    ]
    return KMeansResult(
        centroids=F.normalize(torch.from_numpy(kmeans.centroids), dim=1).numpy(),
        assignments=nearest[:, 0].astype(np.int64),
        stats=stats,
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------
# Balanced assignment


@dataclass
class AssignmentStats:
    """Diagnostics of one balanced assignment."""

    newton_steps: int
    """Newton steps over all smoothing levels."""
    max_mass_error: float
    """max_k |soft mass - target| after the last step, in points (or weight units)."""
    moved: int
    """Points the rounding step moved away from ``argmax(s - p)``."""


def _soft_masses(scores_t: torch.Tensor, prices: torch.Tensor, weights: torch.Tensor | None, tau: float):
    """Return the soft assignment softmax_k((s - p) / tau) as (K, N) and the soft cluster masses (K,).

    It takes the scores transposed, (K, N): on CPU a softmax over the first axis of a (K, N) tensor
    ran about 6x faster than over the last axis of (N, K) for K = 8 (N = 100k, 2 threads).
    """
    soft = torch.softmax((scores_t - prices[:, None]) / tau, dim=0)  # (K, N)
    return soft, (soft.sum(dim=1) if weights is None else soft @ weights)


def solve_prices(
    scores: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    prices: torch.Tensor | None = None,
    tau_final: float = 1e-3,
    max_steps_per_level: int = 8,
) -> tuple[torch.Tensor, int, float]:
    """Find cluster prices p so that ``argmax(scores - p)`` gives each cluster about its target mass.

    Args:
        scores: (N, K) cosines.
        targets: (K,) target masses, summing to ``weights.sum()``.
        weights: (N,) positive point weights.
        prices: (K,) warm start, for example the previous iteration's prices; zeros when None.
        tau_final: smallest smoothing temperature, in cosine units.
        max_steps_per_level: Newton steps allowed at each temperature.

    Returns:
        (prices (K,), Newton steps taken, max |soft mass - target| at the end).
    """
    n_clusters = scores.shape[1]
    cold = prices is None
    prices = torch.zeros(n_clusters, dtype=scores.dtype, device=scores.device) if cold else prices.clone()
    # A cold start walks tau down from about 0.05 by factors of 4; a warm start needs only the last levels.
    levels = [tau_final * 4**i for i in range(int(math.log(0.05 / tau_final, 4)), -1, -1)]
    if not cold:
        levels = levels[-2:]
    # The rounding step fixes the last few points, so a mass error of a fraction of a point per
    # 10k is close enough.
    tolerance = 0.5 * float(weights.min()) + 1e-4 * float(targets.min())
    # Unit weights skip an (N, K) product in every step.
    mass_weights = None if bool((weights == 1).all()) else weights
    identity = torch.eye(n_clusters, dtype=scores.dtype, device=scores.device)
    scores_t = scores.T.contiguous()  # (K, N), the layout `_soft_masses` is fast on
    steps = 0
    error = float("inf")
    for tau in levels:
        soft, masses = _soft_masses(scores_t, prices, mass_weights, tau)
        for _ in range(max_steps_per_level):
            gradient = targets - masses  # (K,) gradient of the smoothed dual
            error = float(gradient.abs().max())
            if error <= tolerance:
                break
            weighted_soft = soft if mass_weights is None else soft * weights[None, :]  # (K, N)
            hessian = (torch.diag(masses) - weighted_soft @ soft.T) / tau  # (K, K), null space: ones
            damping = 1e-6 * float(hessian.diagonal().max()) + 1e-12
            direction = -torch.linalg.solve(hessian + damping * identity, gradient)
            direction -= direction.mean()
            # Near-singular Hessians (few points near a boundary) give huge steps: cap the price move.
            direction *= min(1.0, 10 * tau / float(direction.abs().max()))
            # Damped Newton: halve the step until the mass error falls. The dual value itself is
            # a sum of N terms and too coarse in float32 to compare steps with.
            step = 1.0
            improved = False
            for _ in range(10):
                candidate = prices + step * direction
                new_soft, new_masses = _soft_masses(scores_t, candidate, mass_weights, tau)
                if float((targets - new_masses).abs().sum()) < float(gradient.abs().sum()):
                    improved = True
                    break
                step *= 0.5
            steps += 1
            if not improved:
                break
            prices, soft, masses = candidate, new_soft, new_masses
        error = float((targets - masses).abs().max())
    return prices - prices.mean(), steps, error


def _round_to_capacities(
    adjusted: torch.Tensor, assignments: torch.Tensor, capacities: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Make cluster sizes equal ``capacities`` exactly, moving as few low-preference points as needed.

    An over-full cluster keeps the points with the largest lead of ``adjusted`` over their second
    choice and releases the rest. Released points then propose to their best cluster that still
    has room, and each cluster accepts its best proposers up to its room. Every round fills at
    least one cluster or places every proposer, so it ends within K rounds.
    """
    n_points, n_clusters = adjusted.shape
    counts = torch.bincount(assignments, minlength=n_clusters)
    if torch.equal(counts, capacities):
        return assignments, 0
    assignments = assignments.clone()
    top2 = adjusted.topk(2, dim=1).values if n_clusters > 1 else adjusted.repeat(1, 2)
    lead = top2[:, 0] - top2[:, 1]  # (N,)
    released = []
    for cluster in torch.nonzero(counts > capacities).flatten().tolist():
        members = torch.nonzero(assignments == cluster).flatten()
        excess = int(counts[cluster] - capacities[cluster])
        released.append(members[torch.topk(lead[members], excess, largest=False).indices])
    free = torch.cat(released)
    assignments[free] = -1
    room = capacities - torch.bincount(assignments[assignments >= 0], minlength=n_clusters)
    while len(free):
        open_clusters = room > 0
        preference = adjusted[free].masked_fill(~open_clusters[None, :], -torch.inf)  # (R, K)
        proposal = preference.argmax(dim=1)
        placed = torch.zeros(len(free), dtype=torch.bool, device=adjusted.device)
        for cluster in torch.unique(proposal).tolist():
            proposers = torch.nonzero(proposal == cluster).flatten()
            accept = proposers
            if len(proposers) > room[cluster]:
                accept = proposers[torch.topk(preference[proposers, cluster], int(room[cluster])).indices]
            assignments[free[accept]] = cluster
            room[cluster] -= len(accept)
            placed[accept] = True
        free = free[~placed]
    return assignments, int(sum(len(r) for r in released))


def _balance_weighted(
    scores: torch.Tensor,
    assignments: torch.Tensor,
    weights: torch.Tensor,
    targets: torch.Tensor,
    tolerance: float,
) -> tuple[torch.Tensor, int]:
    """Move weighted points between clusters until every cluster mass is within ``tolerance`` of its target.

    Each move takes the point with the smallest cosine loss out of the most over-full cluster into
    an under-full one, among points light enough to reduce the total deviation. The total
    deviation falls with every move, so the loop ends. It stops early when no single move helps
    (every candidate is heavier than the gap) and leaves the best balance reached.
    """
    n_clusters = scores.shape[1]
    assignments = assignments.clone()
    masses = torch.zeros(n_clusters, dtype=weights.dtype, device=weights.device).index_add_(
        0, assignments, weights
    )
    moved = 0
    for _ in range(4 * len(assignments)):
        deviation = masses - targets
        if float(deviation.abs().max()) <= tolerance:
            break
        source = int(deviation.argmax())
        best = None
        for destination in torch.argsort(deviation).tolist():
            if deviation[destination] >= 0:
                break
            limit = deviation[source] - deviation[destination]  # excess + deficit
            candidates = torch.nonzero((assignments == source) & (weights < limit)).flatten()
            if len(candidates) == 0:
                continue
            loss = scores[candidates, source] - scores[candidates, destination]
            choice = int(loss.argmin())
            if best is None or loss[choice] < best[0]:
                best = (float(loss[choice]), int(candidates[choice]), destination)
        if best is None:
            break
        _, point, destination = best
        assignments[point] = destination
        masses[source] -= weights[point]
        masses[destination] += weights[point]
        moved += 1
    return assignments, moved


def balanced_assignment(
    scores: torch.Tensor,
    weights: torch.Tensor | None = None,
    prices: torch.Tensor | None = None,
    weighted_tolerance: float = 0.01,
    tau_final: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor, AssignmentStats]:
    """Assign N points to K clusters of equal size (or equal weight) maximising the summed score.

    Args:
        scores: (N, K) float cosines.
        weights: (N,) positive point weights, or None for unit weights. With unit weights the
            sizes come out exactly equal (differing by at most 1). With weights, each cluster's
            share of the total weight is brought within ``weighted_tolerance`` of 1/K where
            possible (points heavier than the gap can make it impossible).
        prices: (K,) warm start from a previous call.
        weighted_tolerance: allowed |share - 1/K| for weighted points (0.01 is one percentage point).
        tau_final: smallest smoothing temperature of `solve_prices`.

    Returns:
        assignments (N,) int64, prices (K,), and `AssignmentStats`.
    """
    n_points, n_clusters = scores.shape
    if weights is None:
        capacities = torch.from_numpy(equal_capacities(n_points, n_clusters)).to(scores.device)
        unit = torch.ones(n_points, dtype=scores.dtype, device=scores.device)
        prices, steps, error = solve_prices(scores, capacities.to(scores.dtype), unit, prices, tau_final)
        adjusted = scores - prices  # (N, K)
        assignments, moved = _round_to_capacities(adjusted, adjusted.argmax(dim=1), capacities)
    else:
        total = weights.sum()
        targets = torch.full(
            (n_clusters,), float(total) / n_clusters, dtype=scores.dtype, device=scores.device
        )
        prices, steps, error = solve_prices(scores, targets, weights, prices, tau_final)
        tolerance = weighted_tolerance * float(total)
        assignments, moved = _balance_weighted(
            scores, (scores - prices).argmax(dim=1), weights, targets, tolerance
        )
    return assignments, prices, AssignmentStats(newton_steps=steps, max_mass_error=error, moved=moved)


# ---------------------------------------------------------------------------------------------
# Balanced spherical k-means


def _kmeans_plus_plus(
    features: torch.Tensor, weights: torch.Tensor, n_clusters: int, generator: torch.Generator
) -> torch.Tensor:
    """Pick K initial centroids by k-means++ on cosine distance (1 - cos), weighted by ``weights``."""
    n_points = len(features)
    first = int(torch.multinomial(weights, 1, generator=generator))
    chosen = [first]
    distance = (1.0 - features @ features[first]).clamp_min(0)  # (N,)
    for _ in range(1, n_clusters):
        probabilities = distance * weights
        if float(probabilities.sum()) <= 0:  # every point coincides with a chosen centroid
            remaining = torch.ones(n_points, dtype=features.dtype)
            remaining[chosen] = 0
            probabilities = remaining
        index = int(torch.multinomial(probabilities, 1, generator=generator))
        chosen.append(index)
        distance = torch.minimum(distance, (1.0 - features @ features[index]).clamp_min(0))
    return features[chosen].clone()


def balanced_spherical_kmeans(
    features: np.ndarray | torch.Tensor,
    n_clusters: int,
    n_iter: int = 20,
    seed: int = 0,
    weights: np.ndarray | None = None,
    weighted_tolerance: float = 0.01,
    device: str | torch.device | None = None,
    init_sample: int = 20_000,
) -> KMeansResult:
    """Balanced spherical k-means: exact equal sizes (unit weights) or equal masses (weights).

    Alternates the balanced assignment described in the module docstring with the centroid update
    ``c_k = normalize(sum of w_i x_i over cluster k)``. Stops after ``n_iter`` iterations or when an
    iteration changes no assignment (a fixed point).

    Args:
        features: (N, D) unit rows (float32).
        n_clusters: K, in [1, N].
        n_iter: maximum iterations (>= 1).
        seed: seeds the k-means++ initialisation (on a sample of ``init_sample`` points).
        weights: (N,) positive weights (for example the sizes of fine clusters), or None.
        weighted_tolerance: allowed |share - 1/K| when ``weights`` is given.
        device: torch device; CUDA when visible, else CPU, when None.

    Returns:
        `KMeansResult`. Each stats entry has ``iteration``, ``mean_cosine`` (weighted mean cosine of
        points to their assigned centroid, before the centroid update), ``changed`` (assignments
        that differ from the previous iteration), ``newton_steps``, ``max_mass_error``,
        ``moved_by_rounding`` and ``seconds`` (since the start).
    """
    start = time.perf_counter()
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}.")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    points = torch.as_tensor(features, dtype=torch.float32).to(device)
    n_points = len(points)
    check_cluster_count(n_clusters, n_points)
    point_weights = None
    if weights is not None:
        point_weights = torch.as_tensor(np.asarray(weights, dtype=np.float32)).to(device)
        if point_weights.shape != (n_points,) or not bool((point_weights > 0).all()):
            raise ValueError(
                f"weights must be ({n_points},) positive values, got shape {tuple(point_weights.shape)}."
            )
    unit_weights = torch.ones(n_points, device=device) if point_weights is None else point_weights

    generator = torch.Generator().manual_seed(seed)
    sample = (
        torch.randperm(n_points, generator=generator)[:init_sample]
        if n_points > init_sample
        else torch.arange(n_points)
    )
    sample = sample.to(device)
    init = _kmeans_plus_plus(points[sample].cpu(), unit_weights[sample].cpu(), n_clusters, generator)
    centroids = init.to(device)

    prices = None
    assignments = None
    stats = []
    for iteration in range(n_iter):
        scores = points @ centroids.T  # (N, K)
        new_assignments, prices, assignment_stats = balanced_assignment(
            scores, point_weights, prices, weighted_tolerance
        )
        changed = n_points if assignments is None else int((new_assignments != assignments).sum())
        assignments = new_assignments
        own = scores.gather(1, assignments[:, None])[:, 0]  # (N,)
        mean_cosine = float(torch.dot(unit_weights, own) / unit_weights.sum())

        # index_add_ rather than a one-hot (K, N) @ (N, D) product: on CPU that product made a
        # packed copy of the features (peak memory 2.4x the features against 1.4x, N = 200k).
        weighted_points = points if point_weights is None else points * point_weights[:, None]  # (N, D)
        sums = torch.zeros_like(centroids).index_add_(0, assignments, weighted_points)  # (K, D)
        centroids = F.normalize(sums, dim=1)
        stats.append(
            {
                "iteration": iteration,
                "mean_cosine": mean_cosine,
                "changed": changed,
                "newton_steps": assignment_stats.newton_steps,
                "max_mass_error": assignment_stats.max_mass_error,
                "moved_by_rounding": assignment_stats.moved,
                "seconds": time.perf_counter() - start,
            }
        )
        log.debug("balanced k-means iteration %d: %s", iteration, stats[-1])
        if changed == 0:
            break
    return KMeansResult(
        centroids=centroids.cpu().numpy(),
        assignments=assignments.cpu().numpy().astype(np.int64),
        stats=stats,
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------
# Two-stage clustering


@dataclass
class TwoStageResult:
    """Fine FAISS clusters grouped into balanced coarse clusters.

    Attributes:
        fine: FAISS k-means over all points: (F, D) centroids and (N,) nearest-centroid assignments.
        coarse: balanced k-means over the F fine centroids: (K, D) centroids, (F,) assignments.
        fine_to_coarse: (F,) int64 coarse cluster of each fine cluster.
        coarse_assignments: (N,) int64 ``fine_to_coarse[fine.assignments]``, which is what the
            router returns for these points.
    """

    fine: KMeansResult
    coarse: KMeansResult
    fine_to_coarse: np.ndarray
    coarse_assignments: np.ndarray


def two_stage_kmeans(
    features: np.ndarray,
    n_fine_clusters: int = 1024,
    n_coarse_clusters: int = 2,
    n_iter: int = 20,
    seed: int = 0,
    balance_by: str = "samples",
    balance_tolerance: float = 0.01,
    use_gpu: bool | None = None,
) -> TwoStageResult:
    """FAISS spherical k-means into F fine clusters, then balanced k-means of the fine centroids into K.

    Args:
        features: (N, D) unit rows.
        balance_by: ``"samples"`` weighs each fine centroid by its cluster size, so that coarse
            sample shares come out within ``balance_tolerance`` of 1/K (0.01: one percentage
            point) unless fine clusters are too large for that. ``"centroids"`` balances the number of fine centroids
            per coarse cluster (sizes differ by at most 1), as the reference implementation does,
            and lets sample shares drift.
    """
    if balance_by not in ("samples", "centroids"):
        raise ValueError(f"balance_by must be 'samples' or 'centroids', got {balance_by!r}.")
    check_cluster_count(n_fine_clusters, len(features), "n_fine_clusters")
    check_cluster_count(n_coarse_clusters, n_fine_clusters, "n_coarse_clusters")
    fine = faiss_spherical_kmeans(features, n_fine_clusters, n_iter=n_iter, seed=seed, use_gpu=use_gpu)
    fine_sizes = np.bincount(fine.assignments, minlength=n_fine_clusters).astype(np.float64)
    weights = None
    if balance_by == "samples":
        # An empty fine cluster gets a negligible weight, because the balanced k-means needs w > 0.
        weights = np.maximum(fine_sizes, 1e-3)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    coarse = balanced_spherical_kmeans(
        fine.centroids,
        n_coarse_clusters,
        n_iter=n_iter,
        seed=seed,
        weights=weights,
        weighted_tolerance=balance_tolerance,
        device=device,
    )
    fine_to_coarse = coarse.assignments
    return TwoStageResult(
        fine=fine,
        coarse=coarse,
        fine_to_coarse=fine_to_coarse,
        coarse_assignments=fine_to_coarse[fine.assignments],
    )
