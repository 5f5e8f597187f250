"""Two tiny experts trained to answer differently, and evaluation batches routed between them.

Shared by the ensemble and routing-callback tests. Expert 0 learns to answer "circle" and
expert 1 learns to answer "red" to every question, so an answer shows which expert produced it.
Both use the ``internvl-tiny`` preset and one processor. Building them takes a few seconds, so
`build_routed_experts` caches the result for the whole test process.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.chat import ConversationEncoder
from datamodules.collate import EvalCollator
from lightning_modules.internvl_module import InternVLExpert
from lightning_modules.presets import build_small_processor

EXPERT_ANSWERS = ("circle", "red")
QUESTIONS = (
    "What shape is in the image?",
    "What color is the shape?",
    "Is there a shape?",
    "Which shape do you see here?",
    "What is the color of this shape?",
    "Name the shape.",
)
TRAIN_STEPS = 20


@dataclass
class RoutedExperts:
    """Paths of the trained experts and the pieces needed to build batches for them."""

    root: Path
    processor_dir: Path
    checkpoints: list[Path]
    """Expert 0 as a Lightning ``.ckpt``, expert 1 as a ``save_pretrained`` directory."""
    clustering_dir: Path
    """Single-stage clustering results with two centroids."""
    encoder: ConversationEncoder
    centroids: np.ndarray
    """(2, 8) unit centroids of the clustering results."""


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8))


def _conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


def make_eval_batch(
    experts: RoutedExperts,
    routes: list[int],
    route_scores: list[list[float]] | None = None,
    benchmark: str = "easyvqa",
    start: int = 0,
) -> dict[str, Any]:
    """Build an evaluation batch with the real encoder and collator; row i is routed to ``routes[i]``.

    The references are the routed expert's answer, so a correct route scores 1. Without
    ``route_scores`` each row gets cosines 0.9 for its route and 0.1 for the other expert.
    """
    samples = []
    collator = EvalCollator(experts.encoder.pad_token_id)
    for i, route in enumerate(routes):
        index = start + i
        question = QUESTIONS[index % len(QUESTIONS)]
        answer = EXPERT_ANSWERS[route]
        pixel_values, tiles = experts.encoder.encode_images([_image(1000 + index)])
        text = experts.encoder.encode_text(_conversation(question, answer), tiles)
        scores = (
            route_scores[i] if route_scores is not None else [0.9 if k == route else 0.1 for k in range(2)]
        )
        samples.append(
            {
                "input_ids": text.input_ids,
                "labels": text.labels,
                "prompt_ids": text.prompt_ids,
                "pixel_values": pixel_values,
                "question_id": f"q{index:03d}",
                "question": question,
                "gt_answers": [answer],
                "benchmark": benchmark,
                "question_type": "",
                "expert": route,
                "route_scores": scores,
            }
        )
    return collator(samples)


class _RepeatBatch(torch.utils.data.Dataset):
    """A dataset of `length` copies of one collated batch (the loader uses batch_size=None)."""

    def __init__(self, batch: dict[str, Any], length: int) -> None:
        self.batch = batch
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batch


def _train_expert(
    experts_root: Path, processor_dir: Path, encoder: ConversationEncoder, k: int
) -> InternVLExpert:
    L.seed_everything(k, verbose=False)
    module = InternVLExpert(
        preset="internvl-tiny",
        processor_name_or_path=str(processor_dir),
        learning_rate=5e-3,
        warmup_ratio=0.0,
        max_new_tokens=6,
        expert_id=k,
        log_throughput=False,
    )
    samples = []
    for index, question in enumerate(QUESTIONS):
        pixel_values, tiles = encoder.encode_images([_image(index)])
        text = encoder.encode_text(_conversation(question, EXPERT_ANSWERS[k]), tiles)
        samples.append({"input_ids": text.input_ids, "labels": text.labels, "prompt_ids": text.prompt_ids,
                        "pixel_values": pixel_values})  # fmt: skip
    from datamodules.collate import TrainCollator

    batch = TrainCollator(encoder.pad_token_id)(samples)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=TRAIN_STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=experts_root,
    )
    trainer.fit(module, DataLoader(_RepeatBatch(batch, TRAIN_STEPS), batch_size=None))
    trainer.save_checkpoint(experts_root / f"expert-{k}.ckpt")
    return module


_CACHE: dict[str, RoutedExperts] = {}


def build_routed_experts() -> RoutedExperts:
    """Train (once per process) the two experts and write their checkpoints and clustering results."""
    if "experts" in _CACHE:
        return _CACHE["experts"]
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="routed-experts-"))
    processor_dir = root / "processor"
    texts = [f"{q} {a}" for q in QUESTIONS for a in EXPERT_ANSWERS] * 4
    processor = build_small_processor(texts, processor_dir, vocab_size=400)
    encoder = ConversationEncoder(processor, max_length=256)

    checkpoints = []
    for k in range(2):
        module = _train_expert(root, processor_dir, encoder, k)
        if k == 0:
            checkpoints.append(root / "expert-0.ckpt")
        else:
            export_dir = root / "expert-1-hf"
            module.model.save_pretrained(export_dir)
            processor.save_pretrained(export_dir)
            checkpoints.append(export_dir)

    clustering_dir = root / "clusters"
    clustering_dir.mkdir()
    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((2, 8)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    np.save(clustering_dir / "clustering_centroids.npy", centroids)
    np.save(clustering_dir / "clustering_assignments.npy", np.array([0, 1], dtype=np.int64))

    experts = RoutedExperts(
        root=root,
        processor_dir=processor_dir,
        checkpoints=checkpoints,
        clustering_dir=clustering_dir,
        encoder=encoder,
        centroids=centroids,
    )
    _CACHE["experts"] = experts
    return experts


def make_eval_split(experts: RoutedExperts, routes: list[int], output_dir: Path, start: int = 0) -> Path:
    """Write an evaluation split whose question i is routed to ``routes[i]``, with ``split_dataset.py``.

    Each image's feature is its route's centroid plus small noise, given to the split through
    ``--features``, so the real router decides the routes. Returns the split directory.
    """
    from clustering.split_dataset import main as split_main

    source_dir = output_dir / "source"
    images_dir = source_dir / "images"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(start)
    records, keys, features = [], [], []
    for i, route in enumerate(routes):
        index = start + i
        name = f"{index:04d}.png"
        _image(1000 + index).save(images_dir / name)
        question = QUESTIONS[index % len(QUESTIONS)]
        answer = EXPERT_ANSWERS[route]
        records.append(
            {
                "id": index,
                "image": name,
                "conversations": _conversation(question, answer),
                "question_id": f"q{index:03d}",
                "question": question,
                "gt_answers": [answer],
                "benchmark": "easyvqa",
            }
        )
        keys.append(name)
        features.append(experts.centroids[route] + 0.05 * rng.standard_normal(experts.centroids.shape[1]))
    (source_dir / "eval.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (source_dir / "keys.txt").write_text("".join(key + "\n" for key in keys))
    np.save(source_dir / "features.npy", np.asarray(features, dtype=np.float32))
    split_dir = output_dir / "split"
    split_main(
        [
            "--input-jsonl", str(source_dir / "eval.jsonl"),
            "--images-dir", str(images_dir),
            "--clustering-results-dir", str(experts.clustering_dir),
            "--output-dir", str(split_dir),
            "--features", str(source_dir / "features.npy"),
            "--keys", str(source_dir / "keys.txt"),
            "--image-tokens", str(experts.encoder.image_seq_length),
        ]
    )  # fmt: skip
    return split_dir
