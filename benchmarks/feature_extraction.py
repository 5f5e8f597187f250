"""Feature extraction: `clustering/extract_features.py` end to end against the bare CLIP forward.

The inputs are `--images` JPEG files (`--width` x `--height`, quality 90) listed in an InternVL jsonl,
and a randomly initialised CLIP image tower saved as a checkpoint directory: `vit-b-16` has the
shapes of `openai/clip-vit-base-patch16` (224 px, patch 16, width 768, 12 layers, 512-d
embeddings), `tiny` is a one-layer 32 px model for smoke tests.

- bare forward: the images are read, decoded and preprocessed beforehand; only
  `clustering.features.encode_pixel_values` over batches of `--batch-size` is timed.
- extract_features.py: `extract_features.main` with `--num-workers W` for each W in `--workers`,
  timed from the call to its return, so reading, decoding, preprocessing in DataLoader workers,
  model loading, chunk writing and assembling are all included.

The table gives images/s, the ratio to the bare forward (target: at least 0.8), the largest
difference between the script's features and the bare forward's (a check that both did the same
work), the peak RSS of the main process and the peak summed RSS of the process tree (workers
included). The variants alternate in order over `--rounds` rounds and the median round is reported.

Usage:
    python benchmarks/feature_extraction.py --clip-size vit-b-16 --images 64 --workers 0,1,2
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402

from benchmarks._common import (  # noqa: E402
    PeakRSS,
    ProcessTreeRSS,
    format_table,
    limit_threads,
    machine_summary,
    median,
    parse_list,
)
from clustering import extract_features  # noqa: E402
from clustering.features import encode_pixel_values, load_clip_image_encoder, preprocess_images  # noqa: E402
from datamodules.images import decode_rgb  # noqa: E402
from datamodules.synthetic import make_image  # noqa: E402

TARGET_RATIO = 0.8

CLIP_SIZES: dict[str, dict[str, int]] = {
    # The vision tower of openai/clip-vit-base-patch16.
    "vit-b-16": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 16,
        "projection_dim": 512,
    },
    "tiny": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
        "projection_dim": 16,
    },
}


def write_clip_checkpoint(size: str, directory: Path, seed: int) -> Path:
    """Save a randomly initialised `CLIPVisionModelWithProjection` of `size` with its image processor."""
    shapes = CLIP_SIZES[size]
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**shapes)).save_pretrained(directory)
    side = shapes["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        directory
    )
    return directory


def write_images(root: Path, n: int, width: int, height: int, seed: int) -> Path:
    """Write `n` JPEG images under `root/images` and an InternVL jsonl that lists them; return the jsonl."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    jsonl = root / "data.jsonl"
    with open(jsonl, "w", encoding="utf-8") as handle:
        for index in range(n):
            relative = f"images/{index:06d}.jpg"
            image = make_image(rng, max(width, height)).resize((width, height), Image.Resampling.BILINEAR)
            image.save(root / relative, format="JPEG", quality=90)
            conversation = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "a shape"}]
            handle.write(json.dumps({"id": f"image-{index}", "image": relative, "conversations": conversation}) + "\n")
    return jsonl


def run_bare(model: Any, pixel_batches: list[torch.Tensor]) -> tuple[float, np.ndarray]:
    """Time the CLIP forward over pre-processed batches; return (seconds, (N, D) features)."""
    start = time.perf_counter()
    features = [encode_pixel_values(model, pixel_values).cpu().numpy() for pixel_values in pixel_batches]
    return time.perf_counter() - start, np.concatenate(features)


def run_script(
    root: Path, jsonl: Path, clip_dir: Path, workers: int, options: argparse.Namespace
) -> tuple[float, np.ndarray, float | None]:
    """Run extract_features.py in this process; return (seconds, features, peak summed RSS of the tree)."""
    output_dir = root / f"features-w{workers}"
    argv = [
        "--input-jsonl", str(jsonl),
        "--images-dir", str(root),
        "--output-dir", str(output_dir),
        "--clip-model", str(clip_dir),
        "--batch-size", str(options.batch_size),
        "--num-workers", str(workers),
        "--chunk-size", str(options.chunk_size),
        "--device", "cpu",
        "--overwrite",
    ]  # fmt: skip
    # The script prints one summary line and draws a progress bar; neither belongs in the table.
    with ProcessTreeRSS() as tree, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        start = time.perf_counter()
        extract_features.main(argv)
        seconds = time.perf_counter() - start
    return seconds, np.load(output_dir / extract_features.FEATURES_FILE), tree.peak_mib


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip-size", choices=sorted(CLIP_SIZES), default="vit-b-16", help="CLIP image tower shape.")
    parser.add_argument("--images", type=int, default=32, help="Number of images.")
    parser.add_argument("--width", type=int, default=640, help="Image width in pixels.")
    parser.add_argument("--height", type=int, default=480, help="Image height in pixels.")
    parser.add_argument("--batch-size", type=int, default=32, help="Images per forward pass.")
    parser.add_argument("--workers", default="0,1", help="Comma-separated --num-workers values to run the script with.")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=32,
        help="--chunk-size of the script: images per resumable chunk written to disk.",
    )
    parser.add_argument("--rounds", type=int, default=2, help="Rounds over all variants, alternating their order.")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared machine; 0: torch's default)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights and the images.")
    return parser


def main(argv: Sequence[str] | None = None) -> list[list[Any]]:
    parser = build_parser()
    options = parser.parse_args(argv)
    try:
        worker_counts = [int(value) for value in parse_list(options.workers)]
    except ValueError:
        parser.error(f"--workers must be comma-separated integers, got {options.workers!r}")
    if not worker_counts or min(worker_counts) < 0:
        parser.error(f"--workers must list counts >= 0, got {options.workers!r}")
    for name in ("images", "width", "height", "batch_size", "chunk_size", "rounds"):
        if getattr(options, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(options, name)}")
    limit_threads(options.threads)
    logging.getLogger("clustering").setLevel(logging.WARNING)

    print(f"Feature extraction benchmark. {machine_summary()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="feature-extraction-") as tmp:
        root = Path(tmp)
        clip_dir = write_clip_checkpoint(options.clip_size, root / "clip", options.seed)
        jsonl = write_images(root, options.images, options.width, options.height, options.seed)

        # The bare forward's inputs: every image read, decoded and preprocessed before timing starts.
        model, image_processor = load_clip_image_encoder(clip_dir, device="cpu")
        paths = [root / f"images/{index:06d}.jpg" for index in range(options.images)]
        images = [decode_rgb(path.read_bytes()) for path in paths]
        pixel_batches = [
            preprocess_images(image_processor, images[i : i + options.batch_size])
            for i in range(0, len(images), options.batch_size)
        ]
        del images

        variants = ["bare forward"] + [f"extract_features.py, {w} workers" for w in worker_counts]
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        main_peak: dict[str, float] = {}
        tree_peak: dict[str, float | None] = {}
        features: dict[str, np.ndarray] = {}
        peak = PeakRSS()
        for round_index in range(options.rounds):
            order = variants if round_index % 2 == 0 else variants[::-1]
            for name in order:
                gc.collect()
                peak.reset()
                if name == "bare forward":
                    elapsed, result = run_bare(model, pixel_batches)
                    tree = None
                else:
                    workers = worker_counts[variants.index(name) - 1]
                    elapsed, result, tree = run_script(root, jsonl, clip_dir, workers, options)
                seconds[name].append(elapsed)
                main_peak[name] = max(main_peak.get(name, 0.0), peak.read())
                if tree is not None:
                    tree_peak[name] = max(tree_peak.get(name) or 0.0, tree)
                features[name] = result
                print(f"  round {round_index + 1}/{options.rounds} {name}: {options.images / elapsed:.2f} images/s", flush=True)

    bare_rate = options.images / median(seconds["bare forward"])
    rows = []
    for name in variants:
        rate = options.images / median(seconds[name])
        ratio = rate / bare_rate
        difference = float(np.abs(features[name] - features["bare forward"]).max())
        verdict = "" if name == "bare forward" else ("yes" if ratio >= TARGET_RATIO else "no")
        tree = tree_peak.get(name)
        rows.append(
            [name, rate, ratio, verdict, f"{difference:.1e}", main_peak[name], "" if tree is None else f"{tree:.0f}"]
        )
    headers = [
        "variant",
        "images/s",
        "ratio to bare",
        f">= {TARGET_RATIO}",
        "max feature diff",
        "main peak RSS MiB",
        "tree peak RSS MiB (summed)",
    ]
    print(
        f"\n{options.images} JPEG images {options.width}x{options.height}, CLIP {options.clip_size}, "
        f"batch {options.batch_size}, chunk size {options.chunk_size}"
    )
    print(format_table(headers, rows))
    return rows


if __name__ == "__main__":
    main()
