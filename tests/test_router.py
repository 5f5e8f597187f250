"""Router: loading both kinds of results directory, scores, top-1 routes, soft weights, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clustering.router import Router, prepare_features
from clustering.synthetic import make_sphere_blobs


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _write_single_stage(directory: Path, centroids: np.ndarray, mean: np.ndarray | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "clustering_centroids.npy", centroids)
    np.save(directory / "clustering_assignments.npy", np.zeros(3, dtype=np.int64))
    if mean is not None:
        np.save(directory / "clustering_global_mean.npy", mean)
    return directory


def _write_two_stage(
    directory: Path, fine: np.ndarray, mapping: np.ndarray, coarse: np.ndarray | None
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "clustering_fine_centroids.npy", fine)
    np.save(directory / "clustering_fine_to_coarse_mapping.npy", mapping)
    np.save(directory / "clustering_fine_assignments.npy", np.zeros(3, dtype=np.int64))
    if coarse is not None:
        np.save(directory / "clustering_coarse_centroids.npy", coarse)
    return directory


@pytest.fixture
def two_stage_dir(tmp_path: Path) -> Path:
    # Six fine centroids on the axes of R^3 (+x, -x, +y, -y, +z, -z); expert 0 owns x and z, expert 1 owns y.
    fine = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 2], [0, 0, -2]], dtype=np.float32)
    mapping = np.array([0, 0, 1, 1, 0, 0])
    coarse = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
    return _write_two_stage(tmp_path / "two", fine, mapping, coarse)


def test_two_stage_scores_take_max_over_owned(two_stage_dir: Path) -> None:
    router = Router.from_dir(two_stage_dir)
    assert router.kind == "two_stage"
    assert router.n_experts == 2
    assert router.n_centroids == 6

    features = np.array([[0.9, 0.1, 0.0], [0.0, -1.0, 0.2], [0.0, 0.3, -3.0]], dtype=np.float32)
    unit = _unit(features)
    scores = router.scores(features)
    assert scores.shape == (3, 2)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores[0], [unit[0, 0], unit[0, 1]], rtol=1e-6)
    np.testing.assert_allclose(scores[1], [unit[1, 2], -unit[1, 1]], rtol=1e-6)
    np.testing.assert_allclose(scores[2], [-unit[2, 2], unit[2, 1]], rtol=1e-6)

    routes = router.route(features)
    assert routes.experts.tolist() == [0, 1, 0]
    assert routes.experts.dtype == np.int64
    np.testing.assert_allclose(routes.similarity, scores.max(axis=1), rtol=1e-6)
    assert router.nearest_centroids(features).tolist() == [0, 3, 5]


def test_single_stage_route_is_nearest_centroid(tmp_path: Path) -> None:
    centroids = _unit(np.random.default_rng(0).standard_normal((5, 16)))
    router = Router.from_dir(_write_single_stage(tmp_path, centroids))
    assert router.kind == "single_stage"
    assert router.n_experts == 5

    features = np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32)
    expected = (_unit(features) @ centroids.T).argmax(axis=1)
    routes = router.route(features)
    assert np.array_equal(routes.experts, expected)
    assert np.array_equal(routes.experts, router.scores(features).argmax(axis=1))


def test_global_mean_is_subtracted(tmp_path: Path) -> None:
    centroids = np.array([[1, 0], [0, 1]], dtype=np.float32)
    mean = np.array([0.0, 0.9], dtype=np.float32)
    router = Router.from_dir(_write_single_stage(tmp_path, centroids, mean))
    # (0.6, 0.8) is closer to (0, 1), but minus the mean it is (0.6, -0.1): nearest to (1, 0).
    routes = router.route(np.array([[0.6, 0.8]], dtype=np.float32))
    assert routes.experts.tolist() == [0]
    np.testing.assert_allclose(routes.similarity, [0.6 / np.hypot(0.6, 0.1)], rtol=1e-6)


def test_weights_softmax_and_top_k(two_stage_dir: Path) -> None:
    router = Router.from_dir(two_stage_dir)
    features = np.array([[0.9, 0.1, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)
    scores = router.scores(features)

    weights = router.weights(features, temperature=10.0)
    expected = np.exp(10 * scores) / np.exp(10 * scores).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)

    top1 = router.weights(features, temperature=10.0, top_k=1)
    assert top1.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    uniform = router.weights(features, temperature=0.0)
    np.testing.assert_allclose(uniform, 0.5)
    # top_k ranks by the cosines, so at T = 0 it still keeps the nearest expert, not expert 0.
    nearest = router.weights(features, temperature=0.0, top_k=1)
    assert nearest.argmax(axis=1).tolist() == router.route(features).experts.tolist()
    assert nearest.max(axis=1).tolist() == [1.0, 1.0]


def test_weights_reject_bad_arguments(two_stage_dir: Path) -> None:
    router = Router.from_dir(two_stage_dir)
    features = np.ones((1, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="temperature"):
        router.weights(features, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k must be in"):
        router.weights(features, temperature=1.0, top_k=3)
    with pytest.raises(ValueError, match="top_k must be in"):
        router.weights(features, temperature=1.0, top_k=0)


def test_reference_naming_loads(tmp_path: Path) -> None:
    """A directory laid out like the authors' two-stage output, metadata included, loads and routes."""
    features, labels = make_sphere_blobs(600, 32, n_blobs=4, seed=3)
    fine = np.stack([features[labels == b].mean(axis=0) for b in range(4)])  # (4, 32), not normalised
    mapping = np.array([1, 0, 1, 0], dtype=np.int32)
    coarse = np.stack([fine[mapping == k].mean(axis=0) for k in range(2)])
    directory = _write_two_stage(tmp_path / "authors", fine, mapping, coarse)
    np.save(directory / "clustering_fine_assignments.npy", labels.astype(np.int32))
    (directory / "clustering_metadata.json").write_text(
        json.dumps({"n_fine_clusters": 4, "n_coarse_clusters": 2, "n_samples": 600, "dim": 32})
    )

    router = Router.from_dir(directory)
    assert router.n_experts == 2
    assert router.metadata["n_fine_clusters"] == 4
    assert np.array_equal(router.nearest_centroids(features), labels)
    assert np.array_equal(router.route(features).experts, mapping[labels])


def test_float64_and_int_inputs_accepted(tmp_path: Path) -> None:
    router = Router.from_dir(_write_single_stage(tmp_path, np.eye(3, dtype=np.float64)))
    assert router.route(np.array([[0, 2, 1]])).experts.tolist() == [1]
    assert router.scores(np.zeros((0, 3))).shape == (0, 3)


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (np.ones(3, dtype=np.float32), "must be a 2-D"),
        (np.ones((2, 3, 1), dtype=np.float32), "must be a 2-D"),
        (np.ones((2, 4), dtype=np.float32), "dimension 4 but the centroids have dimension 3"),
        (
            np.array([[1, 0, 0], [np.nan, 0, 0]], dtype=np.float32),
            r"NaN or infinite values in 1 row\(s\) \(1\)",
        ),
        (
            np.array([[np.inf, 0, 0], [1, 0, 0]], dtype=np.float32),
            r"NaN or infinite values in 1 row\(s\) \(0\)",
        ),
        (
            np.array([[1, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=np.float32),
            r"all-zero values in 2 row\(s\) \(1, 2\)",
        ),
        (np.array([["a", "b", "c"]]), "must contain numbers"),
    ],
)
def test_bad_features_rejected(two_stage_dir: Path, features: np.ndarray, message: str) -> None:
    router = Router.from_dir(two_stage_dir)
    with pytest.raises(ValueError, match=message):
        router.route(features)


def test_row_equal_to_mean_rejected() -> None:
    mean = np.array([1.0, 0.0], dtype=np.float32)
    with pytest.raises(ValueError, match=r"equal the global mean in 1 row\(s\) \(0\)"):
        prepare_features(np.array([[2.0, 0.0], [0.0, 1.0]]), mean)


def test_missing_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        Router.from_dir(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="contains neither"):
        Router.from_dir(tmp_path / "empty")
    lonely = tmp_path / "no_mapping"
    lonely.mkdir()
    np.save(lonely / "clustering_fine_centroids.npy", np.eye(3, dtype=np.float32))
    with pytest.raises(FileNotFoundError, match="clustering_fine_to_coarse_mapping.npy"):
        Router.from_dir(lonely)


@pytest.mark.parametrize(
    ("mapping", "coarse", "message"),
    [
        (np.array([0, 1]), None, "mapping has 2 entries but there are 3 fine centroids"),
        (np.array([0, 1, 2]), np.eye(2, 3), r"values outside \[0, 2\) at fine clusters \[2\]"),
        (np.array([0, -1, 1]), None, r"values outside \[0, 2\) at fine clusters \[1\]"),
        (np.array([0, 0, 0]), np.eye(2, 3), r"experts \[1\] own no centroid"),
        (np.array([0.0, 1.0, 1.0]), None, "1-D integer array"),
        (np.array([0, 1, 1]), np.eye(2, 4), "expected \\(K, D\\)"),
    ],
)
def test_inconsistent_two_stage_rejected(
    tmp_path: Path, mapping: np.ndarray, coarse: np.ndarray | None, message: str
) -> None:
    directory = _write_two_stage(tmp_path / "bad", np.eye(3, dtype=np.float32), mapping, coarse)
    with pytest.raises(ValueError, match=message):
        Router.from_dir(directory)


def test_bad_centroids_and_mean_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NaN or infinite"):
        Router.from_dir(
            _write_single_stage(tmp_path / "nan", np.array([[1, 0], [np.nan, 1]], dtype=np.float32))
        )
    with pytest.raises(ValueError, match="all-zero rows"):
        Router.from_dir(_write_single_stage(tmp_path / "zero", np.array([[1, 0], [0, 0]], dtype=np.float32)))
    with pytest.raises(ValueError, match="global mean must be a finite \\(2,\\) vector"):
        Router.from_dir(_write_single_stage(tmp_path / "mean", np.eye(2, dtype=np.float32), np.zeros(3)))
    with pytest.raises(ValueError, match="must be \\(K, D\\)"):
        Router.from_dir(_write_single_stage(tmp_path / "flat", np.ones(4, dtype=np.float32)))


def test_metadata_disagreeing_k_rejected(two_stage_dir: Path) -> None:
    (two_stage_dir / "clustering_metadata.json").write_text(json.dumps({"n_coarse_clusters": 3}))
    with pytest.raises(ValueError, match="number of experts disagrees"):
        Router.from_dir(two_stage_dir)


def test_pickled_array_rejected(tmp_path: Path) -> None:
    directory = tmp_path / "pickled"
    directory.mkdir()
    np.save(directory / "clustering_centroids.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="Pickled arrays are not loaded"):
        Router.from_dir(directory)
