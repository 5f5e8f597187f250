"""Shared parts of the clustering scripts: reading features, the output directory, metadata."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from clustering.router import METADATA, check_feature_matrix, l2_normalize

TSNE_PLOT = "clustering_tsne.png"


def load_features(path: str | Path) -> np.ndarray:
    """Read an (N, D) features .npy file and validate it; returns float32 (not yet normalised).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for an empty or unreadable
    file, a pickled or non-2-D array, N = 0, and rows with NaN, infinite or all-zero values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Features file {path} not found. HINT: run clustering/extract_features.py first."
        )
    if path.stat().st_size == 0:
        raise ValueError(
            f"Features file {path} is empty (0 bytes). HINT: re-run clustering/extract_features.py."
        )
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        raise ValueError(f"{path} is not a plain .npy array ({error}).") from error
    except (OSError, EOFError) as error:
        raise ValueError(
            f"{path} could not be read as .npy ({error}). HINT: re-run feature extraction."
        ) from error
    if array.ndim == 2 and array.shape[0] == 0:
        raise ValueError(
            f"{path} has no rows (shape {array.shape}). HINT: check the extraction's failed.jsonl."
        )
    return check_feature_matrix(array, name=f"features in {path}")


def center_features(features: np.ndarray, subtract_mean: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """L2-normalise rows and, with ``subtract_mean``, centre them on their mean and re-normalise.

    Returns (prepared (N, D) float32, global mean (D,) or None). The router applies the same
    transform with the saved mean, so routes match the clustering.
    """
    normalized = l2_normalize(features)
    if not subtract_mean:
        return normalized, None
    mean = normalized.mean(axis=0, dtype=np.float64).astype(np.float32)  # (D,)
    centred = normalized - mean
    zero = np.flatnonzero(np.linalg.norm(centred, axis=1) < 1e-6)
    if len(zero):
        raise ValueError(
            f"{len(zero)} feature rows (first: {zero[:5].tolist()}) equal the global mean, so they have no "
            "direction after centring. HINT: drop them or cluster without --subtract-mean."
        )
    return l2_normalize(centred), mean


def prepare_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    """Create ``output_dir``; raise ``FileExistsError`` if it is non-empty and ``overwrite`` is False."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"--output-dir {output_dir} exists and is not a directory.")
    if output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"--output-dir {output_dir} is not empty. HINT: pass --overwrite to replace its contents, "
                "or choose another directory."
            )
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def save_array(output_dir: Path, name: str, array: np.ndarray) -> None:
    """Write ``array`` to ``output_dir / name`` through a temporary file (no pickles)."""
    tmp = output_dir / (name + ".tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    os.replace(tmp, output_dir / name)


def save_metadata(output_dir: Path, metadata: dict[str, Any]) -> None:
    tmp = output_dir / (METADATA + ".tmp")
    tmp.write_text(json.dumps(metadata, indent=2, default=_json_default))
    os.replace(tmp, output_dir / METADATA)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def size_summary(assignments: np.ndarray, n_clusters: int) -> dict[str, Any]:
    """Return cluster sizes, shares and the balance ratio (max size / min size) of an assignment."""
    sizes = np.bincount(assignments, minlength=n_clusters)
    smallest = int(sizes.min())
    return {
        "sizes": sizes.tolist(),
        "shares": (sizes / sizes.sum()).round(6).tolist(),
        "balance_ratio": float(sizes.max() / smallest) if smallest > 0 else float("inf"),
    }


def library_versions() -> dict[str, str]:
    import faiss
    import sklearn
    import torch

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "faiss": getattr(faiss, "__version__", "unknown"),
        "scikit-learn": sklearn.__version__,
    }


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options that both clustering scripts share."""
    parser.add_argument("features", help="features.npy from extract_features.py: (N, D) float32.")
    parser.add_argument(
        "--output-dir", required=True, help="Results directory (must be empty unless --overwrite)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Random seed of the initial centroids.")
    parser.add_argument("--n-iter", type=int, default=20, help="k-means iterations per stage.")
    parser.add_argument(
        "--subtract-mean",
        action="store_true",
        help="Centre the normalised features on their mean and re-normalise before clustering; saves the mean.",
    )
    parser.add_argument(
        "--plot-samples",
        type=int,
        default=5000,
        help="Points in the t-SNE plot (at most 10000; 0 skips the plot).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output-dir.")


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    problems = []
    if args.n_iter < 1:
        problems.append(f"--n-iter must be >= 1, got {args.n_iter}")
    if not 0 <= args.plot_samples <= 10_000:
        problems.append(f"--plot-samples must be in [0, 10000], got {args.plot_samples}")
    return problems
