"""Train a small CLIP-architecture encoder on easy-VQA, contrastively, for offline routing.

The method routes on CLIP image embeddings (`openai/clip-vit-base-patch16` by default). Where no
real CLIP weights can be downloaded, a randomly initialised encoder only groups images by raw
pixels, so its routes carry little meaning. This script builds a small `CLIPModel` from a
`CLIPConfig` (64 px images, a few transformer layers) and trains it for a minute or two on the
easy-VQA training images paired with captions made from their answers ("a red circle"). The
image embeddings it then produces separate colours and shapes, as a real CLIP's would.

Input is the InternVL jsonl of the training split (one multi-turn conversation per image) that
`datamodules/prepare_easyvqa.py` writes. Each image's colour and shape are read from its own
question-answer pairs; an image whose answers name neither is left out and counted.

Output is a directory that `CLIPModel.from_pretrained` and `CLIPProcessor.from_pretrained` load
offline, so it is a drop-in `--clip-model DIR` for `clustering/extract_features.py` and
`clustering/split_dataset.py`. Beside the weights, `demo_clip_metrics.json` records the loss
curve, the held-out retrieval accuracy of colour and shape, the caption counts and the timing.

Usage:
    python clustering/train_demo_clip.py --input-jsonl runs/demo/data/train.jsonl \
        --images-dir runs/demo/data --output-dir runs/demo/clip
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

logger = logging.getLogger(__name__)

# The easy-VQA vocabulary (`easy_vqa.get_answers()` minus yes/no). Fixed here, not read from the
# data, so the tokenizer and the caption set do not depend on which subset a run sees.
COLORS: tuple[str, ...] = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
METRICS_FILE = "demo_clip_metrics.json"

_WORD = re.compile(r"[a-z]+")


@dataclass
class CaptionedImage:
    """One training image with the colour and shape that its answers name (None when unknown)."""

    path: Path
    color: str | None
    shape: str | None

    @property
    def caption(self) -> str:
        """Return the caption text, for example "a red circle", "a red shape" or "a circle"."""
        if self.shape is None:
            return f"a {self.color} shape"
        if self.color is None:
            return f"a {self.shape}"
        return f"a {self.color} {self.shape}"


@dataclass
class TrainConfig:
    """Model size and optimisation settings; every field is a command-line option."""

    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    projection_dim: int = 32
    steps: int = 500
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    holdout_fraction: float = 0.1
    seed: int = 0


def parse_color_shape(conversations: list[dict]) -> tuple[str | None, str | None]:
    """Read an image's colour and shape from its easy-VQA question-answer pairs.

    An open answer ("what color is the shape?" -> "blue") names the colour or shape directly. An
    open question may name the other one ("what is the blue shape?"). A yes/no answer names them
    when it is positive: "yes" to "is there a red shape?", or "no" to "is there not a red shape?".

    Returns:
        (color, shape), each None when no pair names it.
    """
    color: str | None = None
    shape: str | None = None
    turns = [turn for turn in conversations if turn.get("from") in ("human", "gpt")]
    for question_turn, answer_turn in zip(turns[::2], turns[1::2], strict=False):
        question_words = _WORD.findall(question_turn["value"].replace("<image>", " ").lower())
        answer = answer_turn["value"].strip().lower()
        question_colors = [w for w in question_words if w in COLORS]
        question_shapes = [w for w in question_words if w in SHAPES]
        if answer in COLORS:
            color = answer
            shape = question_shapes[0] if question_shapes else shape
        elif answer in SHAPES:
            shape = answer
            color = question_colors[0] if question_colors else color
        elif answer in ("yes", "no"):
            negated = "not" in question_words or question_words[:2] == ["is", "no"]
            if (answer == "yes") != negated:
                color = question_colors[0] if question_colors else color
                shape = question_shapes[0] if question_shapes else shape
    return color, shape


def load_captioned_images(
    input_jsonl: Path, images_dir: Path, max_images: int | None = None
) -> tuple[list[CaptionedImage], dict[str, int]]:
    """Read the training jsonl and return one captioned image per unique image path.

    Records that share an image are merged, so an image's colour and shape may come from several
    records. Returns the images (in first-seen order) and counts: records read, images found,
    images with no colour and no shape (left out).
    """
    merged: dict[str, CaptionedImage] = {}
    n_records = 0
    with input_jsonl.open() as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{input_jsonl}:{line_number}: invalid JSON ({error}). "
                    "HINT: pass the jsonl that datamodules/prepare_easyvqa.py writes."
                ) from error
            image = record.get("image")
            if isinstance(image, list):
                image = image[0] if image else None
            if not image:
                continue
            if max_images is not None and image not in merged and len(merged) >= max_images:
                continue
            n_records += 1
            color, shape = parse_color_shape(record.get("conversations", []))
            entry = merged.setdefault(image, CaptionedImage(images_dir / image, None, None))
            entry.color = entry.color or color
            entry.shape = entry.shape or shape
    images = list(merged.values())
    kept = [image for image in images if image.color or image.shape]
    counts = {"records": n_records, "images": len(images), "images_without_caption": len(images) - len(kept)}
    if not kept:
        raise ValueError(
            f"{input_jsonl}: no image has an answer that names a colour or a shape "
            f"({n_records} records read). HINT: this trainer is for easy-VQA conversations."
        )
    return kept, counts


def all_captions() -> list[str]:
    """Return every caption the parser can produce, so the tokenizer covers all of them."""
    captions = [f"a {color} {shape}" for color in COLORS for shape in SHAPES]
    captions += [f"a {color} shape" for color in COLORS] + [f"a {shape}" for shape in SHAPES]
    return captions


def build_tokenizer() -> CLIPTokenizer:
    """Train a byte-level BPE `CLIPTokenizer` on the caption set, offline.

    The vocabulary is the 256 byte-level symbols plus about 50 merges, enough that every caption
    word is one token.
    """
    base = CLIPTokenizer()
    return base.train_new_from_iterator(all_captions() * 4, vocab_size=320)


def build_processor(config: TrainConfig) -> CLIPProcessor:
    """Build the processor: CLIP's resize, centre crop and normalisation at `image_size` pixels."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=build_tokenizer())


def build_model(config: TrainConfig, tokenizer: CLIPTokenizer) -> CLIPModel:
    """Build a randomly initialised `CLIPModel` of the configured size."""
    max_caption_tokens = max(len(tokenizer(caption)["input_ids"]) for caption in all_captions())
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": config.hidden_size,
        "intermediate_size": 2 * config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "max_position_embeddings": max(16, max_caption_tokens),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": 2 * config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
    }
    clip_config = CLIPConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=config.projection_dim
    )
    return CLIPModel(clip_config)


def preprocess_images(images: list[CaptionedImage], processor: CLIPProcessor) -> torch.Tensor:
    """Load and preprocess every image once. Returns pixel values, (N, 3, S, S) float32."""
    chunks = []
    for start in range(0, len(images), 256):
        pil_images = []
        for image in images[start : start + 256]:
            with Image.open(image.path) as handle:
                pil_images.append(handle.convert("RGB"))
        chunks.append(processor.image_processor(images=pil_images, return_tensors="pt")["pixel_values"])
    return torch.cat(chunks)


def contrastive_loss(
    image_embeds: torch.Tensor,
    caption_embeds: torch.Tensor,
    caption_index: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch in which many images share a caption.

    With 24 possible captions, a batch of 128 images repeats captions, and CLIP's usual loss
    would treat an image's duplicate captions as negatives. Here each distinct caption appears
    once: image-to-text is cross-entropy over the distinct captions, and text-to-image gives each
    caption equal target mass on every image that carries it.

    Args:
        image_embeds: (B, P) L2-normalised image embeddings.
        caption_embeds: (C, P) L2-normalised embeddings of the C distinct captions in the batch.
        caption_index: (B,) int64, the row of `caption_embeds` that belongs to each image.
        logit_scale: scalar, the log of the inverse temperature (CLIP's learnable parameter).
    """
    logits = logit_scale.exp() * image_embeds @ caption_embeds.T  # (B, C)
    image_to_text = F.cross_entropy(logits, caption_index)
    targets = F.one_hot(caption_index, caption_embeds.shape[0]).T.float()  # (C, B)
    targets = targets / targets.sum(dim=1, keepdim=True)
    text_to_image = -(targets * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


@torch.no_grad()
def retrieval_accuracy(
    model: CLIPModel, processor: CLIPProcessor, pixel_values: torch.Tensor, images: list[CaptionedImage]
) -> dict[str, float]:
    """Score zero-shot retrieval: each image picks the nearest of the 24 full captions.

    Returns the share of images whose picked caption has the right colour, the right shape, and
    both (counting only images whose colour, or shape, is known).
    """
    model.eval()
    full_captions = [(color, shape) for color in COLORS for shape in SHAPES]
    text = processor.tokenizer([f"a {c} {s}" for c, s in full_captions], padding=True, return_tensors="pt")
    caption_embeds = F.normalize(model.get_text_features(**text).pooler_output, dim=-1)
    image_embeds = torch.cat(
        [
            F.normalize(model.get_image_features(pixel_values=chunk).pooler_output, dim=-1)
            for chunk in pixel_values.split(256)
        ]
    )
    picked = (image_embeds @ caption_embeds.T).argmax(dim=1).tolist()
    color_hits = [full_captions[p][0] == im.color for p, im in zip(picked, images, strict=True) if im.color]
    shape_hits = [full_captions[p][1] == im.shape for p, im in zip(picked, images, strict=True) if im.shape]
    both_hits = [
        full_captions[p] == (im.color, im.shape)
        for p, im in zip(picked, images, strict=True)
        if im.color and im.shape
    ]
    model.train()
    return {
        "color_accuracy": float(np.mean(color_hits)) if color_hits else float("nan"),
        "shape_accuracy": float(np.mean(shape_hits)) if shape_hits else float("nan"),
        "color_and_shape_accuracy": float(np.mean(both_hits)) if both_hits else float("nan"),
        "n_images": len(images),
    }


def train(images: list[CaptionedImage], config: TrainConfig) -> tuple[CLIPModel, CLIPProcessor, dict]:
    """Train the encoder and return it, its processor and the training metrics.

    Images are split once, by seed, into a training part and a held-out part of
    `holdout_fraction` for the retrieval accuracy.
    """
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    processor = build_processor(config)
    model = build_model(config, processor.tokenizer)

    start = time.perf_counter()
    pixel_values = preprocess_images(images, processor)  # (N, 3, S, S)
    preprocess_seconds = time.perf_counter() - start

    order = rng.permutation(len(images))
    n_holdout = int(round(config.holdout_fraction * len(images))) if len(images) >= 20 else 0
    holdout_rows, train_rows = order[:n_holdout], order[n_holdout:]
    captions = sorted({image.caption for image in images})
    caption_ids = torch.tensor([captions.index(image.caption) for image in images])
    caption_tokens = processor.tokenizer(captions, padding=True, return_tensors="pt")

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    train_rows_tensor = torch.as_tensor(train_rows)
    batch_size = min(config.batch_size, len(train_rows))
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    for step in range(config.steps):
        rows = train_rows_tensor[torch.randperm(len(train_rows_tensor))[:batch_size]]
        batch_captions, caption_index = caption_ids[rows].unique(return_inverse=True)
        image_embeds = F.normalize(
            model.get_image_features(pixel_values=pixel_values[rows]).pooler_output, dim=-1
        )
        text_embeds = model.get_text_features(
            input_ids=caption_tokens["input_ids"][batch_captions],
            attention_mask=caption_tokens["attention_mask"][batch_captions],
        ).pooler_output
        loss = contrastive_loss(
            image_embeds, F.normalize(text_embeds, dim=-1), caption_index, model.logit_scale
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 50 == 0 or step == config.steps - 1:
            logger.info("step %d/%d loss %.4f", step + 1, config.steps, losses[-1])
    train_seconds = time.perf_counter() - start

    evaluation_rows = holdout_rows if n_holdout else train_rows
    metrics = {
        "loss_first": losses[0],
        "loss_last_10_mean": float(np.mean(losses[-10:])),
        "loss_every_10_steps": losses[::10],
        "retrieval": retrieval_accuracy(
            model, processor, pixel_values[evaluation_rows], [images[i] for i in evaluation_rows]
        ),
        "retrieval_split": "held-out" if n_holdout else "training (too few images to hold out)",
        "n_train_images": len(train_rows),
        "n_holdout_images": int(n_holdout),
        "caption_counts": {caption: int((caption_ids == i).sum()) for i, caption in enumerate(captions)},
        "preprocess_seconds": preprocess_seconds,
        "train_seconds": train_seconds,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "config": asdict(config),
    }
    return model, processor, metrics


def save_atomically(model: CLIPModel, processor: CLIPProcessor, metrics: dict, output_dir: Path) -> None:
    """Write model, processor and metrics to a temporary directory, then rename it to `output_dir`."""
    partial = output_dir.with_name(output_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    (partial / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    partial.rename(output_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input-jsonl", type=Path, required=True, help="InternVL jsonl of the training split."
    )
    parser.add_argument(
        "--images-dir", type=Path, required=True, help="Directory the jsonl image paths are relative to."
    )
    parser.add_argument(
        "--output-dir", type=Path, required=True, help="Where to save the model and processor."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")
    parser.add_argument("--max-images", type=int, default=None, help="Use only the first N unique images.")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="Input size in pixels.")
    parser.add_argument(
        "--patch-size", type=int, default=defaults.patch_size, help="ViT patch size in pixels."
    )
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size, help="Width of both towers.")
    parser.add_argument("--num-layers", type=int, default=defaults.num_layers, help="Layers in each tower.")
    parser.add_argument(
        "--num-heads", type=int, default=defaults.num_heads, help="Attention heads per layer."
    )
    parser.add_argument(
        "--projection-dim", type=int, default=defaults.projection_dim, help="Embedding dimension."
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="Optimiser steps.")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="Images per step.")
    parser.add_argument(
        "--learning-rate", type=float, default=defaults.learning_rate, help="Peak AdamW learning rate."
    )
    parser.add_argument(
        "--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay."
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=defaults.warmup_steps, help="Linear warmup steps."
    )
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        default=defaults.holdout_fraction,
        help="Share of images held out of training to measure retrieval accuracy.",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="Seed for initialisation, split and batches."
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.output_dir.exists() and any(args.output_dir.iterdir()) and not args.overwrite:
        print(
            f"error: output directory {args.output_dir} exists and is not empty. "
            "HINT: pass --overwrite to replace it.",
            file=sys.stderr,
        )
        return 2
    if not args.input_jsonl.is_file():
        print(f"error: --input-jsonl {args.input_jsonl} not found.", file=sys.stderr)
        return 2
    config = TrainConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        projection_dim=args.projection_dim,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        holdout_fraction=args.holdout_fraction,
        seed=args.seed,
    )
    images, counts = load_captioned_images(args.input_jsonl, args.images_dir, args.max_images)
    model, processor, metrics = train(images, config)
    metrics["data"] = {**counts, "input_jsonl": str(args.input_jsonl)}
    save_atomically(model, processor, metrics, args.output_dir)

    retrieval = metrics["retrieval"]
    print(
        f"trained demo CLIP on {metrics['n_train_images']} images in {metrics['train_seconds']:.1f} s "
        f"(loss {metrics['loss_first']:.3f} -> {metrics['loss_last_10_mean']:.3f}); "
        f"{metrics['retrieval_split']} retrieval on {retrieval['n_images']} images: "
        f"colour {retrieval['color_accuracy']:.3f}, shape {retrieval['shape_accuracy']:.3f}, "
        f"both {retrieval['color_and_shape_accuracy']:.3f}; saved to {args.output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
