"""k-means library and the two clustering scripts: recovery, balance, determinism, routing, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score

from clustering import single_stage_balanced_kmeans, two_stage_kmeans
from clustering.kmeans import (
    balanced_assignment,
    balanced_spherical_kmeans,
    equal_capacities,
    faiss_spherical_kmeans,
)
from clustering.kmeans import two_stage_kmeans as two_stage_library
from clustering.router import Router
from clustering.synthetic import make_sphere_blobs


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def unequal_blobs() -> tuple[np.ndarray, np.ndarray]:
    return make_sphere_blobs(4000, 32, n_blobs=6, spread=0.5, masses=[1, 2, 3, 1, 4, 2], seed=5)


def test_equal_capacities_differ_by_one() -> None:
    assert equal_capacities(10, 4).tolist() == [3, 3, 2, 2]
    assert equal_capacities(8, 4).tolist() == [2, 2, 2, 2]


def test_balanced_assignment_is_optimal() -> None:
    """On a small problem the assignment matches the exact optimum of the expanded Hungarian problem."""
    generator = torch.Generator().manual_seed(0)
    for n_points, n_clusters in [(61, 3), (40, 4), (30, 2)]:
        scores = torch.rand(n_points, n_clusters, generator=generator)
        assignments, _, _ = balanced_assignment(scores)
        capacities = equal_capacities(n_points, n_clusters)
        assert np.bincount(assignments.numpy(), minlength=n_clusters).tolist() == capacities.tolist()

        slots = np.repeat(np.arange(n_clusters), capacities)  # one column per unit of capacity
        rows, columns = linear_sum_assignment(scores.numpy()[:, slots], maximize=True)
        optimum = scores.numpy()[rows, slots[columns]].sum()
        achieved = scores.gather(1, assignments[:, None]).sum().item()
        assert achieved == pytest.approx(optimum, abs=0.02 * n_points / 30)


def test_balanced_kmeans_recovers_blobs() -> None:
    features, labels = make_sphere_blobs(2003, 32, n_blobs=4, spread=0.3, seed=1)
    result = balanced_spherical_kmeans(features, 4, n_iter=20, seed=0)
    assert adjusted_rand_score(labels, result.assignments) >= 0.95
    sizes = np.bincount(result.assignments, minlength=4)
    assert sizes.max() - sizes.min() <= 1
    assert sizes.sum() == 2003
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, rtol=1e-5)
    assert result.stats[0]["iteration"] == 0
    assert result.stats[-1]["mean_cosine"] > 0.9


def test_balanced_kmeans_exact_sizes_on_unequal_blobs(unequal_blobs) -> None:
    features, _ = unequal_blobs
    for n_clusters in (3, 7):
        result = balanced_spherical_kmeans(features, n_clusters, n_iter=10, seed=2)
        sizes = np.bincount(result.assignments, minlength=n_clusters)
        assert sizes.max() - sizes.min() <= 1
        assert sizes.sum() == len(features)


def test_balanced_kmeans_same_seed_same_result(unequal_blobs) -> None:
    features, _ = unequal_blobs
    first = balanced_spherical_kmeans(features, 5, n_iter=5, seed=3)
    second = balanced_spherical_kmeans(features, 5, n_iter=5, seed=3)
    assert np.array_equal(first.assignments, second.assignments)
    np.testing.assert_array_equal(first.centroids, second.centroids)


def test_faiss_kmeans_recovers_blobs() -> None:
    features, labels = make_sphere_blobs(3000, 32, n_blobs=5, spread=0.3, masses=[1, 3, 2, 1, 5], seed=4)
    result = faiss_spherical_kmeans(features, 5, n_iter=20, seed=1)
    assert adjusted_rand_score(labels, result.assignments) >= 0.95
    assert 19 <= len(result.stats) <= 20  # faiss 1.15 records 19 entries for niter=20
    assert result.stats[-1]["mean_cosine"] > 0.9


def test_two_stage_sample_shares_within_tolerance(unequal_blobs) -> None:
    features, _ = unequal_blobs
    for n_coarse in (2, 3):
        result = two_stage_library(features, n_fine_clusters=128, n_coarse_clusters=n_coarse, seed=0)
        shares = np.bincount(result.coarse_assignments, minlength=n_coarse) / len(features)
        assert np.abs(shares - 1 / n_coarse).max() <= 0.01, shares


def test_two_stage_centroid_balance(unequal_blobs) -> None:
    features, _ = unequal_blobs
    result = two_stage_library(
        features, n_fine_clusters=101, n_coarse_clusters=4, seed=0, balance_by="centroids"
    )
    per_coarse = np.bincount(result.fine_to_coarse, minlength=4)
    assert per_coarse.max() - per_coarse.min() <= 1


def _save_features(tmp_path: Path, features: np.ndarray, name: str = "features.npy") -> Path:
    path = tmp_path / name
    np.save(path, features)
    return path


def test_two_stage_script_and_router(tmp_path: Path, unequal_blobs) -> None:
    features, _ = unequal_blobs
    path = _save_features(tmp_path, features)
    out = tmp_path / "two"
    metadata = two_stage_kmeans.main(
        [str(path), "--output-dir", str(out), "--n-fine-clusters", "128", "--n-coarse-clusters", "3",
         "--subtract-mean", "--plot-samples", "200"]
    )  # fmt: skip
    for name in (
        "clustering_fine_centroids.npy",
        "clustering_fine_assignments.npy",
        "clustering_coarse_centroids.npy",
        "clustering_fine_to_coarse_mapping.npy",
        "clustering_global_mean.npy",
        "clustering_metadata.json",
        "clustering_tsne.png",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "clustering_metadata.json").read_text())
    assert saved["cluster_sizes"] == metadata["cluster_sizes"]
    assert sum(saved["cluster_sizes"]) == len(features)
    assert max(abs(share - 1 / 3) for share in saved["cluster_shares"]) <= 0.01
    assert saved["max_share_error"] <= 0.01
    assert saved["arguments"]["n_fine_clusters"] == 128
    assert "faiss" in saved["versions"]
    assert 0 < saved["mean_cosine_to_fine_centroid"] <= 1

    router = Router.from_dir(out)
    fine_assignments = np.load(out / "clustering_fine_assignments.npy")
    mapping = np.load(out / "clustering_fine_to_coarse_mapping.npy")
    assert router.n_experts == 3
    assert (router.nearest_centroids(features) == fine_assignments).mean() >= 0.999
    routes = router.route(features)
    assert (routes.experts == mapping[fine_assignments]).mean() >= 0.999
    assert np.bincount(routes.experts, minlength=3).tolist() == pytest.approx(saved["cluster_sizes"], abs=5)


def test_single_stage_script_and_router(tmp_path: Path, unequal_blobs) -> None:
    features, _ = unequal_blobs
    path = _save_features(tmp_path, features[:3999])
    out = tmp_path / "one"
    args = [str(path), "--output-dir", str(out), "--n-clusters", "4", "--plot-samples", "0", "--seed", "7"]
    metadata = single_stage_balanced_kmeans.main(args)
    sizes = metadata["cluster_sizes"]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == 3999
    assert metadata["balance_ratio"] == pytest.approx(1000 / 999)

    router = Router.from_dir(out)
    centroids = np.load(out / "clustering_centroids.npy")
    nearest = (features[:3999] @ centroids.T).argmax(axis=1)
    assert np.array_equal(router.route(features[:3999]).experts, nearest)
    agreement = (nearest == np.load(out / "clustering_assignments.npy")).mean()
    assert metadata["router_agreement"] == pytest.approx(agreement)

    again = single_stage_balanced_kmeans.main([*args, "--overwrite"])
    assert again["cluster_sizes"] == sizes


def test_two_stage_script_same_seed(tmp_path: Path, unequal_blobs) -> None:
    features, _ = unequal_blobs
    path = _save_features(tmp_path, features)
    outputs = []
    for name in ("a", "b"):
        two_stage_kmeans.main(
            [
                str(path),
                "--output-dir",
                str(tmp_path / name),
                "--n-fine-clusters",
                "32",
                "--plot-samples",
                "0",
                "--seed",
                "11",
            ]
        )
        outputs.append(np.load(tmp_path / name / "clustering_fine_to_coarse_mapping.npy"))
        outputs.append(np.load(tmp_path / name / "clustering_fine_assignments.npy"))
    assert np.array_equal(outputs[0], outputs[2])
    assert np.array_equal(outputs[1], outputs[3])


BAD_FEATURES = [
    (
        "nan",
        np.array([[1, 0], [np.nan, 1], [0, 1]], dtype=np.float32),
        r"NaN or infinite values in 1 row\(s\) \(1\)",
    ),
    (
        "inf",
        np.array([[1, 0], [0, 1], [np.inf, 1]], dtype=np.float32),
        r"NaN or infinite values in 1 row\(s\) \(2\)",
    ),
    ("zero", np.array([[1, 0], [0, 0], [0, 1]], dtype=np.float32), r"all-zero values in 1 row\(s\) \(1\)"),
    ("flat", np.ones(6, dtype=np.float32), "must be a 2-D"),
    ("cube", np.ones((2, 3, 4), dtype=np.float32), "must be a 2-D"),
    ("no_rows", np.zeros((0, 4), dtype=np.float32), "has no rows"),
]


@pytest.mark.parametrize(("name", "array", "message"), BAD_FEATURES, ids=[case[0] for case in BAD_FEATURES])
def test_scripts_reject_bad_features(tmp_path: Path, name: str, array: np.ndarray, message: str) -> None:
    path = _save_features(tmp_path, array, f"{name}.npy")
    with pytest.raises(ValueError, match=message):
        single_stage_balanced_kmeans.main(
            [str(path), "--output-dir", str(tmp_path / "one"), "--n-clusters", "2"]
        )
    with pytest.raises(ValueError, match=message):
        two_stage_kmeans.main([str(path), "--output-dir", str(tmp_path / "two"), "--n-fine-clusters", "2"])


def test_scripts_reject_bad_files_and_counts(tmp_path: Path) -> None:
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        single_stage_balanced_kmeans.main(
            [str(empty), "--output-dir", str(tmp_path / "a"), "--n-clusters", "2"]
        )
    with pytest.raises(FileNotFoundError, match="not found"):
        two_stage_kmeans.main([str(tmp_path / "absent.npy"), "--output-dir", str(tmp_path / "b")])

    path = _save_features(tmp_path, make_sphere_blobs(20, 8, 2, seed=0)[0])
    with pytest.raises(ValueError, match="n_clusters=21 is larger than the number of points"):
        single_stage_balanced_kmeans.main(
            [str(path), "--output-dir", str(tmp_path / "c"), "--n-clusters", "21"]
        )
    with pytest.raises(ValueError, match="n_fine_clusters=30 is larger than the number of points"):
        two_stage_kmeans.main([str(path), "--output-dir", str(tmp_path / "d"), "--n-fine-clusters", "30"])
    with pytest.raises(SystemExit):
        single_stage_balanced_kmeans.main(
            [str(path), "--output-dir", str(tmp_path / "e"), "--n-clusters", "0"]
        )
    with pytest.raises(SystemExit):
        two_stage_kmeans.main(
            [
                str(path),
                "--output-dir",
                str(tmp_path / "f"),
                "--n-fine-clusters",
                "4",
                "--n-coarse-clusters",
                "5",
            ]
        )
    with pytest.raises(ValueError, match="n_clusters must be >= 1"):
        balanced_spherical_kmeans(np.eye(3, dtype=np.float32), 0)


def test_scripts_refuse_non_empty_output(tmp_path: Path) -> None:
    path = _save_features(tmp_path, make_sphere_blobs(40, 8, 2, seed=0)[0])
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty. HINT: pass --overwrite"):
        single_stage_balanced_kmeans.main([str(path), "--output-dir", str(out), "--n-clusters", "2"])
    with pytest.raises(FileExistsError, match="not empty. HINT: pass --overwrite"):
        two_stage_kmeans.main([str(path), "--output-dir", str(out), "--n-fine-clusters", "4"])
    assert (out / "keep.txt").exists()
