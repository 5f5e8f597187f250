"""The easy-VQA demo, reduced to a few hundred records and a few steps, through `scripts/demo.py`.

The run goes through the same stages and commands as `make demo` (every script and `cli.py` run as a
subprocess), so this test checks that the parts fit together: every stage's outputs exist, the shard
manifests account for every record, each system's predictions answer every test question once, and
the results file contains every system. A second invocation must reuse every finished stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO = REPO_ROOT / "scripts" / "demo.py"

REDUCED_ARGS = [
    "--max-train-images", "60",
    "--max-test-images", "6",
    "--clip-steps", "4",
    "--clip-batch-size", "32",
    "--fine-clusters", "6",
    "--dense-steps", "2",
    "--batch-size", "4",
    "--num-workers", "0",
    "--eval-batch-size", "32",
]  # fmt: skip

STAGES = [
    "prepare",
    "clip",
    "features",
    "cluster",
    "split-train",
    "split-test",
    "fit-dense-seed0",
    "fit-expert0-seed0",
    "fit-expert1-seed0",
    "test-dense-seed0",
    "test-top1-seed0",
    "test-soft-seed0",
]


def run_demo(output_dir: Path) -> subprocess.CompletedProcess[str]:
    # One BLAS/OpenMP thread per process: the stages run one after another, and the test suite shares
    # the machine's cores with other work.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(DEMO), "--output-dir", str(output_dir), *REDUCED_ARGS],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    output_dir = tmp_path_factory.mktemp("demo")
    completed = run_demo(output_dir)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    return output_dir, completed


@pytest.mark.slow
def test_demo_stage_outputs(demo_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    output_dir, _ = demo_run
    for stage in STAGES:
        marker = output_dir / "stages" / f"{stage}.json"
        assert marker.is_file(), f"stage {stage} left no done marker"
    assert (output_dir / "clip" / "config.json").is_file()
    assert (output_dir / "clip" / "demo_clip_metrics.json").is_file()
    n_images = len(read_jsonl(output_dir / "data" / "train.jsonl"))
    features = np.load(output_dir / "features" / "train" / "features.npy")
    assert features.shape[0] == n_images
    assert np.allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-4)
    for name in (
        "clustering_fine_centroids.npy",
        "clustering_fine_to_coarse_mapping.npy",
        "clustering_metadata.json",
    ):
        assert (output_dir / "clusters" / name).is_file(), name
    for model in ("dense", "expert0", "expert1"):
        assert (output_dir / "checkpoints" / f"{model}-seed0" / "last.ckpt").is_file(), model
        events = list((output_dir / "tensorboard" / f"{model}-seed0").glob("version_*/events.out.tfevents.*"))
        assert events, f"no TensorBoard events for {model}"


@pytest.mark.slow
def test_demo_manifests_account_for_records(demo_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    output_dir, _ = demo_run
    for split in ("train", "test"):
        n_lines = len(read_jsonl(output_dir / "data" / f"{split}.jsonl"))
        manifest = json.loads((output_dir / "shards" / split / "manifest.json").read_text())
        written = sum(row["samples"] for row in manifest["experts"])
        assert manifest["total_records"] == n_lines, split
        assert written + len(manifest["skipped"]) == n_lines, split
        assert manifest["n_experts"] == 2, split


@pytest.mark.slow
def test_demo_predictions_cover_questions_once(
    demo_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    output_dir, _ = demo_run
    results = json.loads((output_dir / "results.json").read_text())
    question_ids = sorted(str(r["question_id"]) for r in read_jsonl(output_dir / "data" / "test.jsonl"))
    routes = shard_routes(output_dir / "shards" / "test")
    assert sorted(routes) == question_ids
    for system in ("dense", "top1", "soft"):
        records = read_jsonl(Path(results["seeds"]["0"][system]["predictions"]))
        answered = sorted(r["question_id"] for r in records)
        assert answered == question_ids, system
    # In top-1 mode every question is answered by the expert that the split routed it to.
    top1 = read_jsonl(Path(results["seeds"]["0"]["top1"]["predictions"]))
    assert all(r["expert"] == routes[r["question_id"]] for r in top1)
    assert set(routes.values()) <= {0, 1}


def shard_routes(split_dir: Path) -> dict[str, int]:
    """Return question_id -> expert, as written into the evaluation shards by the split."""
    routes = {}
    for shard in sorted(split_dir.glob("expert-*/shard-*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".json"):
                    sample = json.loads(archive.extractfile(member).read())
                    routes[str(sample["question_id"])] = int(sample["expert"])
    return routes


@pytest.mark.slow
def test_demo_results_hold_every_system(demo_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    output_dir, completed = demo_run
    results = json.loads((output_dir / "results.json").read_text())
    n_questions = len(read_jsonl(output_dir / "data" / "test.jsonl"))
    for baseline in ("majority", "majority_per_type", "question_prior"):
        assert results["systems"][baseline]["scores"]["n"] == n_questions, baseline
    seed = results["seeds"]["0"]
    for system in ("dense", "top1", "soft"):
        scores = seed[system]["scores"]
        assert scores["n"] == n_questions, system
        assert 0.0 <= scores["all"] <= 1.0, system
    routed = [seed[f"expert{k}_routed"]["scores"]["n"] for k in range(2)]
    assert sum(routed) == n_questions
    assert results["clusters"]["test_questions"] == routed
    assert seed["gap_top1_minus_dense"] == pytest.approx(
        seed["top1"]["scores"]["all"] - seed["dense"]["scores"]["all"]
    )
    # The majority answer of easy-VQA's training set is "yes", right on about half the yes/no questions.
    assert results["systems"]["majority"]["answer"] == "yes"
    assert "| dense | 0 |" in (output_dir / "results.md").read_text()
    assert "| soft ensemble | 0 |" in completed.stdout
    for stage in STAGES:
        assert stage in results["stage_seconds"], stage


@pytest.mark.slow
def test_demo_experts_compute_matched(demo_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    output_dir, _ = demo_run
    results = json.loads((output_dir / "results.json").read_text())
    samples = results["clusters"]["train_samples"]
    dense_steps = int(REDUCED_ARGS[REDUCED_ARGS.index("--dense-steps") + 1])
    assert results["optimizer_steps"]["dense"] == dense_steps
    for k, n_k in enumerate(samples):
        # p_k * K * S steps at batch B / K, at least one.
        expected = max(1, round(n_k / sum(samples) * len(samples) * dense_steps))
        assert results["optimizer_steps"][f"expert{k}"] == expected, k


@pytest.mark.slow
def test_demo_rerun_reuses_stages(demo_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    output_dir, _ = demo_run
    before = json.loads((output_dir / "results.json").read_text())
    completed = run_demo(output_dir)
    assert completed.returncode == 0, completed.stderr[-4000:]
    after = json.loads((output_dir / "results.json").read_text())
    assert sorted(after["stages_reused"]) == sorted(STAGES)
    assert after["seeds"] == before["seeds"]


def conversation(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    turns = []
    for question, answer in pairs:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ((("<image>\nwhat is the blue shape?", "rectangle"),), ("blue", "rectangle")),
        ((("what color is the shape?", "teal"),), ("teal", None)),
        ((("what is the color of the circle?", "red"),), ("red", "circle")),
        ((("is there a red shape?", "yes"),), ("red", None)),
        ((("is there not a red shape?", "yes"),), (None, None)),
        ((("is there not a triangle?", "no"),), (None, "triangle")),
        ((("is no green shape present?", "no"),), ("green", None)),
        (
            (("does the image contain a circle?", "no"), ("what shape is present?", "triangle")),
            (None, "triangle"),
        ),
    ],
)
def test_parse_color_shape_cases(
    pairs: tuple[tuple[str, str], ...], expected: tuple[str | None, str | None]
) -> None:
    from clustering.train_demo_clip import parse_color_shape

    assert parse_color_shape(conversation(*pairs)) == expected


def test_contrastive_loss_prefers_matching_captions() -> None:
    import torch
    import torch.nn.functional as F

    from clustering.train_demo_clip import contrastive_loss

    captions = F.normalize(torch.eye(3, 4), dim=-1)  # (C, P): three orthogonal caption embeddings
    caption_index = torch.tensor([0, 0, 1, 2])  # two images share caption 0
    matching = captions[caption_index]  # (B, P): each image on its own caption
    shuffled = captions[torch.tensor([1, 2, 0, 0])]
    scale = torch.tensor(2.0)
    assert contrastive_loss(matching, captions, caption_index, scale) < contrastive_loss(
        shuffled, captions, caption_index, scale
    )
    # With a large scale and matching embeddings, image-to-text goes to 0, and text-to-image goes to
    # log(2) for caption 0 (two images with equal target mass) and 0 for the others: log(2) / 3 over
    # the 3 captions. The loss is the mean of the two terms.
    floor = contrastive_loss(matching, captions, caption_index, torch.tensor(10.0))
    assert floor.item() == pytest.approx(torch.log(torch.tensor(2.0)).item() / 3 / 2, abs=1e-3)
