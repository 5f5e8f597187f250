"""Route CLIP image features to experts by cosine similarity to the cluster centroids.

One `Router` serves both kinds of clustering results directory:

- two-stage: ``clustering_fine_centroids.npy`` (F, D) and ``clustering_fine_to_coarse_mapping.npy``
  (F,) int. A feature goes to the expert that owns its nearest fine centroid.
  ``clustering_coarse_centroids.npy`` (K, D) is checked when present but not used for routing.
- single-stage: ``clustering_centroids.npy`` (K, D). A feature goes to its nearest centroid.

Either kind may hold ``clustering_global_mean.npy`` (D,): features are then L2-normalised,
centred on that mean and L2-normalised again, as they were before clustering. The same names are
written by the authors' public clustering scripts, so their results directories load here too.

Train splits, evaluation splits and inference all route through this class, so a sample lands on
the same expert everywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

log = logging.getLogger(__name__)

FINE_CENTROIDS = "clustering_fine_centroids.npy"
FINE_ASSIGNMENTS = "clustering_fine_assignments.npy"
COARSE_CENTROIDS = "clustering_coarse_centroids.npy"
FINE_TO_COARSE = "clustering_fine_to_coarse_mapping.npy"
CENTROIDS = "clustering_centroids.npy"
ASSIGNMENTS = "clustering_assignments.npy"
GLOBAL_MEAN = "clustering_global_mean.npy"
METADATA = "clustering_metadata.json"

# Rows per matrix product in `Router.scores`: 65536 x 1024 float32 similarities are 256 MiB.
_CHUNK_ROWS = 65536
# A row whose norm is below this is treated as all-zero: it has no direction to route by.
_MIN_NORM = 1e-12


class Routes(NamedTuple):
    """Top-1 routing decision for N features."""

    experts: np.ndarray
    """(N,) int64 expert ids in [0, K)."""
    similarity: np.ndarray
    """(N,) float32 cosine between each feature and the nearest centroid its expert owns."""


def _describe_rows(rows: np.ndarray, limit: int = 5) -> str:
    listed = ", ".join(str(int(r)) for r in rows[:limit])
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"{len(rows)} row(s) ({listed}{more})"


def check_feature_matrix(features: Any, name: str = "features", dim: int | None = None) -> np.ndarray:
    """Validate an (N, D) feature matrix and return it as C-contiguous float32.

    Raises ``ValueError`` that lists every problem found: a wrong number of dimensions, a
    dimension other than ``dim``, and the indices of rows with NaN, infinite or all-zero values.
    N = 0 is accepted here; callers that need points check N themselves.
    """
    array = np.asarray(features)
    if array.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D (N, D) array, got shape {array.shape}. "
            "HINT: pass one row per image; reshape a single vector with features[None, :]."
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name} must contain numbers, got dtype {array.dtype}.")
    array = np.ascontiguousarray(array, dtype=np.float32)

    problems = []
    if dim is not None and array.shape[1] != dim:
        problems.append(
            f"{name} have dimension {array.shape[1]} but the centroids have dimension {dim}. "
            "HINT: embed the images with the same CLIP model that produced the clustering."
        )
    if array.shape[0] > 0 and array.shape[1] > 0:
        non_finite = np.flatnonzero(~np.isfinite(array).all(axis=1))
        if len(non_finite):
            problems.append(
                f"{name} contain NaN or infinite values in {_describe_rows(non_finite)}. "
                "HINT: re-extract those images or drop those rows."
            )
        with np.errstate(invalid="ignore", over="ignore"):
            norms = np.linalg.norm(array, axis=1)
        zero = np.flatnonzero(norms < _MIN_NORM)
        if len(zero):
            problems.append(
                f"{name} contain all-zero values in {_describe_rows(zero)}; a zero vector has no "
                "direction for cosine similarity. HINT: re-extract those images or drop those rows."
            )
    elif array.shape[1] == 0:
        problems.append(f"{name} have shape {array.shape}: each row needs at least one value.")
    if problems:
        raise ValueError("\n".join(problems))
    return array


def l2_normalize(array: np.ndarray) -> np.ndarray:
    """Return (N, D) ``array`` with each row scaled to unit L2 norm (float32, a new array)."""
    norms = np.linalg.norm(array, axis=1, keepdims=True)  # (N, 1)
    return (array / np.maximum(norms, _MIN_NORM)).astype(np.float32, copy=False)


def prepare_features(
    features: Any, global_mean: np.ndarray | None = None, name: str = "features", dim: int | None = None
) -> np.ndarray:
    """Validate features, normalise them and, with ``global_mean`` (D,), centre and re-normalise.

    This is the exact transform that clustering applies before fitting and that `Router` applies
    before scoring. Returns an (N, D) float32 array of unit rows. Rows that become zero after
    centring (a feature equal to the mean) raise ``ValueError``.
    """
    array = l2_normalize(check_feature_matrix(features, name=name, dim=dim))
    if global_mean is None:
        return array
    centred = array - global_mean[None, :]  # (N, D)
    norms = np.linalg.norm(centred, axis=1)
    zero = np.flatnonzero(norms < 1e-6)
    if len(zero):
        raise ValueError(
            f"{name} equal the global mean in {_describe_rows(zero)}, so they have no direction "
            "after centring. HINT: drop those rows or cluster without --subtract-mean."
        )
    return l2_normalize(centred)


@dataclass(frozen=True)
class _Arrays:
    centroids: np.ndarray  # (M, D) unit rows
    owner: np.ndarray  # (M,) int64 expert of each centroid
    n_experts: int
    global_mean: np.ndarray | None  # (D,)


class Router:
    """Top-1 and soft routing of features to K experts by cosine similarity to centroids.

    Args:
        centroids: (M, D) centroids; rows are L2-normalised on load. M = K for single-stage
            results and M = F fine centroids for two-stage results.
        owner: (M,) expert id of each centroid, in [0, n_experts). Every expert must own at
            least one centroid.
        n_experts: K.
        global_mean: optional (D,) mean subtracted from normalised features before scoring.
        kind: ``"two_stage"`` or ``"single_stage"``, for logs and metadata only.
        metadata: the parsed ``clustering_metadata.json``, or an empty dict.
    """

    def __init__(
        self,
        centroids: np.ndarray,
        owner: np.ndarray,
        n_experts: int,
        global_mean: np.ndarray | None = None,
        kind: str = "single_stage",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._arrays = _validate_arrays(centroids, owner, n_experts, global_mean, source="Router arguments")
        self.kind = kind
        self.metadata = metadata or {}
        # Centroid columns sorted by owner, so that a per-expert max is one np.maximum.reduceat.
        self._order = np.argsort(self._arrays.owner, kind="stable")
        counts = np.bincount(self._arrays.owner, minlength=n_experts)
        self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)

    @property
    def fingerprint(self) -> str:
        """A 16-hex-digit SHA-256 digest of the routing arrays (centroids, owners, global mean).

        Two routers with the same fingerprint send every feature to the same expert. Splits record
        it in their manifest, so that evaluation can check that a split was routed by the
        clustering it is evaluated with.
        """
        digest = hashlib.sha256()
        arrays = self._arrays
        for array in (arrays.centroids, arrays.owner, arrays.global_mean):
            if array is not None:
                contiguous = np.ascontiguousarray(array)
                digest.update(f"{contiguous.dtype.str}{contiguous.shape}".encode())
                digest.update(contiguous.tobytes())
        return digest.hexdigest()[:16]

    @classmethod
    def from_dir(cls, results_dir: str | Path) -> Router:
        """Load a two-stage or single-stage clustering results directory.

        Two-stage is recognised by ``clustering_fine_centroids.npy``; single-stage by
        ``clustering_centroids.npy``. Raises ``FileNotFoundError`` when neither is there or a
        file that the kind needs is missing, and ``ValueError`` when the arrays disagree.
        """
        results_dir = Path(results_dir)
        if not results_dir.is_dir():
            raise FileNotFoundError(
                f"Clustering results directory {results_dir} not found. HINT: pass the --output-dir "
                "of two_stage_kmeans.py or single_stage_balanced_kmeans.py."
            )
        metadata = _load_metadata(results_dir / METADATA)
        global_mean = _load_array(results_dir / GLOBAL_MEAN) if (results_dir / GLOBAL_MEAN).exists() else None

        if (results_dir / FINE_CENTROIDS).exists():
            kind = "two_stage"
            mapping_path = results_dir / FINE_TO_COARSE
            if not mapping_path.exists():
                raise FileNotFoundError(
                    f"{results_dir} has {FINE_CENTROIDS} but not {FINE_TO_COARSE}, so fine clusters "
                    "cannot be mapped to experts. HINT: re-run two_stage_kmeans.py into an empty directory."
                )
            centroids = _load_array(results_dir / FINE_CENTROIDS)
            owner = _load_array(mapping_path)
            coarse_path = results_dir / COARSE_CENTROIDS
            coarse = _load_array(coarse_path) if coarse_path.exists() else None
            n_experts = _two_stage_n_experts(results_dir, owner, coarse, centroids, metadata)
        elif (results_dir / CENTROIDS).exists():
            kind = "single_stage"
            centroids = _load_array(results_dir / CENTROIDS)
            if centroids.ndim != 2:
                raise ValueError(f"{results_dir / CENTROIDS} must be (K, D), got shape {centroids.shape}.")
            n_experts = centroids.shape[0]
            owner = np.arange(n_experts)
        else:
            present = sorted(p.name for p in results_dir.iterdir())
            raise FileNotFoundError(
                f"{results_dir} contains neither {FINE_CENTROIDS} (two-stage) nor {CENTROIDS} (single-stage); "
                f"found {present or 'nothing'}. HINT: pass the --output-dir of a clustering run."
            )

        arrays = _validate_arrays(centroids, owner, n_experts, global_mean, source=str(results_dir))
        router = cls(arrays.centroids, arrays.owner, arrays.n_experts, arrays.global_mean, kind, metadata)
        log.info(
            "Loaded %s router from %s: %d experts, %d centroids of dimension %d%s",
            kind,
            results_dir,
            router.n_experts,
            router.n_centroids,
            router.dim,
            ", with global mean" if global_mean is not None else "",
        )
        return router

    @property
    def n_experts(self) -> int:
        """Number of experts K."""
        return self._arrays.n_experts

    @property
    def n_centroids(self) -> int:
        """Number of centroids M (F fine centroids for two-stage, K for single-stage)."""
        return self._arrays.centroids.shape[0]

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return self._arrays.centroids.shape[1]

    @property
    def centroids(self) -> np.ndarray:
        """(M, D) float32 unit centroids (read-only view)."""
        view = self._arrays.centroids.view()
        view.flags.writeable = False
        return view

    @property
    def owner(self) -> np.ndarray:
        """(M,) int64 expert id of each centroid (read-only view)."""
        view = self._arrays.owner.view()
        view.flags.writeable = False
        return view

    @property
    def global_mean(self) -> np.ndarray | None:
        """(D,) float32 mean subtracted before scoring, or None."""
        return self._arrays.global_mean

    def prepare(self, features: Any) -> np.ndarray:
        """Validate (N, D) features and apply the clustering transform; returns (N, D) float32."""
        return prepare_features(features, self._arrays.global_mean, dim=self.dim)

    def centroid_similarities(self, features: Any) -> np.ndarray:
        """Return the (N, M) float32 cosine between each feature and each centroid."""
        prepared = self.prepare(features)
        return prepared @ self._arrays.centroids.T  # (N, M)

    def nearest_centroids(self, features: Any) -> np.ndarray:
        """Return the (N,) int64 index of each feature's nearest centroid (fine centroid for two-stage)."""
        prepared = self.prepare(features)
        out = np.empty(len(prepared), dtype=np.int64)
        for start in range(0, len(prepared), _CHUNK_ROWS):
            sims = prepared[start : start + _CHUNK_ROWS] @ self._arrays.centroids.T  # (n, M)
            out[start : start + _CHUNK_ROWS] = sims.argmax(axis=1)
        return out

    def scores(self, features: Any) -> np.ndarray:
        """Return (N, K) float32 scores: per expert, the max cosine over the centroids it owns."""
        prepared = self.prepare(features)
        out = np.empty((len(prepared), self.n_experts), dtype=np.float32)
        sorted_centroids = self._arrays.centroids[self._order]  # (M, D), grouped by expert
        for start in range(0, len(prepared), _CHUNK_ROWS):
            sims = prepared[start : start + _CHUNK_ROWS] @ sorted_centroids.T  # (n, M)
            if len(sims):
                out[start : start + _CHUNK_ROWS] = np.maximum.reduceat(sims, self._starts, axis=1)
        return out

    def route(self, features: Any) -> Routes:
        """Return each feature's top-1 expert and its cosine; ``experts == scores(f).argmax(1)``."""
        scores = self.scores(features)
        experts = scores.argmax(axis=1).astype(np.int64)
        similarity = np.take_along_axis(scores, experts[:, None], axis=1)[:, 0]
        return Routes(experts=experts, similarity=similarity)

    def weights(self, features: Any, temperature: float, top_k: int | None = None) -> np.ndarray:
        """Return (N, K) float32 soft-routing weights ``softmax_k(temperature * scores)``.

        Args:
            features: (N, D) CLIP image embeddings.
            temperature: T >= 0 multiplying the cosines; T = 0 gives uniform weights and large T
                approaches top-1 routing.
            top_k: keep only the k experts with the highest scores per row, as in
                `routing_weights`; None keeps all K.
        """
        scores = torch.from_numpy(self.scores(features))  # (N, K)
        return routing_weights(scores, temperature, top_k).numpy()


def routing_weights(
    route_scores: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    available: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return soft-routing weights ``w_k = softmax_k(temperature * route_scores)``.

    Args:
        route_scores: (B, K) cosine similarities.
        temperature: T >= 0. T = 0 gives uniform weights, a large T approaches top-1 routing.
        top_k: keep the k experts with the highest scores per row (ties go to the lower expert
            id), set the other weights to 0 and renormalise; None keeps all. The ranking uses the
            scores, so T = 0 with ``top_k`` is the uniform mixture of the k nearest experts.
        available: (K,) bool, experts that may receive weight; None means all of them.

    Returns:
        (B, K) float32 weights, each row summing to 1.
    """
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}.")
    n_experts = route_scores.shape[1]
    logits = temperature * route_scores.float()  # (B, K)
    if available is not None:
        if not bool(available.any()):
            raise ValueError("no expert is available to route to.")
        logits = logits.masked_fill(~available.to(logits.device)[None, :], float("-inf"))
    n_available = n_experts if available is None else int(available.sum())
    if top_k is not None:
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, {n_experts}] (the number of experts), got {top_k}.")
        if top_k < n_available:
            # Rank by the scores, not by T * scores, so that T = 0 keeps the k nearest experts.
            # A stable sort keeps the lower expert id first among equal scores.
            ranking = route_scores.float()
            if available is not None:
                ranking = ranking.masked_fill(~available.to(ranking.device)[None, :], float("-inf"))
            order = torch.sort(-ranking, dim=1, stable=True).indices  # (B, K)
            logits = logits.scatter(1, order[:, top_k:], float("-inf"))
    return torch.softmax(logits, dim=1)


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:
        raise ValueError(
            f"{path} is not a plain .npy array ({error}). Pickled arrays are not loaded."
        ) from error
    except (OSError, EOFError) as error:
        raise ValueError(
            f"{path} could not be read as .npy ({error}). HINT: re-run the clustering."
        ) from error


def _load_metadata(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}.") from error
    if not isinstance(metadata, dict):
        raise ValueError(f"{path} must contain a JSON object, got {type(metadata).__name__}.")
    return metadata


def _two_stage_n_experts(
    results_dir: Path,
    mapping: np.ndarray,
    coarse: np.ndarray | None,
    fine: np.ndarray,
    metadata: dict[str, Any],
) -> int:
    """Return K from the coarse centroids, the metadata or the mapping, and check they agree."""
    if mapping.ndim != 1 or not np.issubdtype(mapping.dtype, np.integer):
        raise ValueError(
            f"{results_dir / FINE_TO_COARSE} must be a 1-D integer array, got shape {mapping.shape} "
            f"and dtype {mapping.dtype}."
        )
    candidates: dict[str, int] = {}
    if coarse is not None:
        if coarse.ndim != 2 or (fine.ndim == 2 and coarse.shape[1] != fine.shape[1]):
            raise ValueError(
                f"{results_dir / COARSE_CENTROIDS} has shape {coarse.shape}, expected (K, D) with D equal to "
                f"the fine centroids' dimension (shape {fine.shape})."
            )
        candidates[COARSE_CENTROIDS] = coarse.shape[0]
    if isinstance(metadata.get("n_coarse_clusters"), int):
        candidates[f"{METADATA} n_coarse_clusters"] = metadata["n_coarse_clusters"]
    if len(set(candidates.values())) > 1:
        raise ValueError(f"{results_dir}: the number of experts disagrees between files: {candidates}.")
    if candidates:
        return next(iter(candidates.values()))
    return int(mapping.max()) + 1 if len(mapping) else 0


def _validate_arrays(
    centroids: np.ndarray,
    owner: np.ndarray,
    n_experts: int,
    global_mean: np.ndarray | None,
    source: str,
) -> _Arrays:
    """Check the router arrays against each other; report every problem in one ``ValueError``."""
    centroids = np.asarray(centroids)
    owner = np.asarray(owner)
    problems = []
    if centroids.ndim != 2 or centroids.shape[0] == 0 or centroids.shape[1] == 0:
        raise ValueError(
            f"{source}: centroids must be a non-empty (M, D) array, got shape {centroids.shape}."
        )
    non_finite = np.flatnonzero(~np.isfinite(centroids).all(axis=1))
    if len(non_finite):
        problems.append(f"centroids contain NaN or infinite values in {_describe_rows(non_finite)}.")
    else:
        zero = np.flatnonzero(np.linalg.norm(centroids, axis=1) < _MIN_NORM)
        if len(zero):
            problems.append(f"centroids contain all-zero rows: {_describe_rows(zero)}.")
    if n_experts < 1:
        problems.append(f"the number of experts must be >= 1, got {n_experts}.")
    if owner.ndim != 1 or not np.issubdtype(owner.dtype, np.integer):
        problems.append(
            f"the fine-to-coarse mapping must be a 1-D integer array, got shape {owner.shape}, dtype {owner.dtype}."
        )
    elif len(owner) != len(centroids):
        problems.append(
            f"the fine-to-coarse mapping has {len(owner)} entries but there are {len(centroids)} fine centroids."
        )
    elif n_experts >= 1:
        out_of_range = np.flatnonzero((owner < 0) | (owner >= n_experts))
        if len(out_of_range):
            problems.append(
                f"the fine-to-coarse mapping has values outside [0, {n_experts}) at fine clusters "
                f"{out_of_range[:5].tolist()} (values {owner[out_of_range[:5]].tolist()})."
            )
        else:
            empty = np.flatnonzero(np.bincount(owner, minlength=n_experts) == 0)
            if len(empty):
                problems.append(
                    f"experts {empty.tolist()} own no centroid, so no feature could be routed to them."
                )
    if global_mean is not None:
        global_mean = np.asarray(global_mean)
        if global_mean.shape != (centroids.shape[1],) or not np.isfinite(global_mean).all():
            problems.append(
                f"the global mean must be a finite ({centroids.shape[1]},) vector, got shape {global_mean.shape}."
            )
    if problems:
        raise ValueError(
            f"Inconsistent clustering results in {source}:\n- "
            + "\n- ".join(problems)
            + "\nHINT: re-run the clustering script into an empty directory (or with --overwrite)."
        )
    return _Arrays(
        centroids=l2_normalize(centroids.astype(np.float32)),
        owner=owner.astype(np.int64),
        n_experts=int(n_experts),
        global_mean=None if global_mean is None else global_mean.astype(np.float32),
    )
