"""A small routed dataset made on the fly, for the tests and the data-loading benchmark.

`write_synthetic_dataset` writes what a real run has before `split_dataset.py`: an InternVL jsonl
with image files, CLIP-like features with their keys, and a single-stage clustering directory
whose centroids route record i to expert ``i % n_experts``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clustering.router import CENTROIDS

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square")


@dataclass(frozen=True)
class SyntheticDataset:
    """Paths of a written synthetic dataset and the expert each record is planted in."""

    jsonl: Path
    images_dir: Path
    features: Path
    keys: Path
    clustering_dir: Path
    planted_experts: list[int]

    def split_arguments(self, output_dir: str | Path, *extra: str) -> list[str]:
        """Return `clustering/split_dataset.py` arguments that split this dataset into ``output_dir``
        with its precomputed features, followed by ``extra``."""
        return [
            "--input-jsonl", str(self.jsonl),
            "--images-dir", str(self.images_dir),
            "--clustering-results-dir", str(self.clustering_dir),
            "--output-dir", str(output_dir),
            "--features", str(self.features),
            "--keys", str(self.keys),
            *extra,
        ]  # fmt: skip


def make_image(rng: np.random.Generator, size: int) -> Image.Image:
    """Return a size x size RGB image: smooth colour fields plus mild noise, like a photo's statistics."""
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_conversation(rng: np.random.Generator, turns: int) -> list[dict[str, str]]:
    """Return `turns` question-answer pairs about colours and shapes, `<image>` in the first question."""
    conversation = []
    for turn in range(turns):
        color = COLORS[int(rng.integers(len(COLORS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        question = f"is there a {color} {shape}?" if turn % 2 else f"what color is the {shape}?"
        if turn % 2:
            answer = "yes" if rng.random() < 0.5 else "no"
        else:
            answer = color
        conversation.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + question})
        conversation.append({"from": "gpt", "value": answer})
    return conversation


def write_synthetic_dataset(
    directory: str | Path,
    n_records: int,
    n_experts: int = 2,
    image_size: int = 64,
    image_format: str = "png",
    feature_dim: int = 16,
    max_turns: int = 3,
    seed: int = 0,
) -> SyntheticDataset:
    """Write `n_records` single-image records, their features and a clustering into `directory`.

    Args:
        directory: created if missing; gets ``data.jsonl``, ``images/``, ``features.npy``,
            ``keys.txt`` and ``clusters/``.
        n_records: number of jsonl lines, each with one image and 1..max_turns QA turns.
        n_experts: K; record i is planted near centroid ``i % K``.
        image_size: image side in pixels.
        image_format: "png" or "jpeg" (quality 90).
        feature_dim: D of the features and centroids.
        seed: seed of every random choice, so the same arguments write the same files.
    """
    directory = Path(directory)
    images_dir = directory / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = "jpg" if image_format == "jpeg" else image_format

    centroids = rng.normal(size=(n_experts, feature_dim)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    keys, features, planted = [], [], []
    with open(directory / "data.jsonl", "w", encoding="utf-8") as handle:
        for index in range(n_records):
            relative = f"images/{index:06d}.{suffix}"
            image = make_image(rng, image_size)
            options = {"quality": 90} if image_format == "jpeg" else {}
            image.save(directory / relative, format=image_format.upper(), **options)
            turns = int(rng.integers(1, max_turns + 1))
            record = {
                "id": f"synthetic-{index}",
                "image": relative,
                "conversations": make_conversation(rng, turns),
            }
            handle.write(json.dumps(record) + "\n")
            expert = index % n_experts
            feature = centroids[expert] + 0.1 * rng.normal(size=feature_dim).astype(np.float32)
            features.append(feature / np.linalg.norm(feature))
            keys.append(relative)
            planted.append(expert)

    np.save(directory / "features.npy", np.stack(features).astype(np.float32))
    (directory / "keys.txt").write_text("\n".join(keys) + "\n", encoding="utf-8")
    clustering_dir = directory / "clusters"
    clustering_dir.mkdir(exist_ok=True)
    np.save(clustering_dir / CENTROIDS, centroids)
    return SyntheticDataset(
        jsonl=directory / "data.jsonl",
        images_dir=directory,
        features=directory / "features.npy",
        keys=directory / "keys.txt",
        clustering_dir=clustering_dir,
        planted_experts=planted,
    )
