"""Split a dataset into per-expert WebDataset shards by routing every record with the clustering.

    python clustering/split_dataset.py --input-jsonl train.jsonl --images-dir data \\
        --clustering-results-dir runs/clusters --output-dir runs/shards/train \\
        --clip-model openai/clip-vit-base-patch16

    python clustering/split_dataset.py --meta-path stage2_meta.json \\
        --clustering-results-dir runs/clusters --output-dir runs/shards/train \\
        --features runs/features/features.npy --keys runs/features/keys.txt

Each record is routed by the CLIP embedding of its first image to the expert that `Router` picks
(the same code routes evaluation sets and inference). Embeddings come from ``--features`` and
``--keys``, the outputs of ``extract_features.py`` whose keys are the image paths as written in
the records. Without them, ``--clip-model`` embeds the images on the fly.

Writes ``<output-dir>/expert-<k>/shard-<nnnnnn>.tar`` and ``<output-dir>/manifest.json``, which
accounts for every input record: written to which expert, or skipped and why. Prints one line per
expert and the skip counts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from clustering.features import DEFAULT_CLIP_MODEL
from clustering.router import Router
from clustering.shards import SplitError, SplitOptions, make_feature_source, split_records
from datamodules.sources import DatasetEntry, load_meta


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input-jsonl",
        type=Path,
        help="annotation file: InternVL .jsonl (one record per line) or LLaVA-style .json (one array)",
    )
    source.add_argument(
        "--meta-path",
        type=Path,
        help="InternVL mixture file {name: {root, annotation, repeat_time}}; every dataset is split in "
        "one run, and its name and repeat_time go into the samples and the manifest",
    )
    parser.add_argument(
        "--output-dir", type=Path, required=True, help="directory for expert-<k>/ and manifest.json"
    )
    parser.add_argument(
        "--clustering-results-dir",
        type=Path,
        required=True,
        help="output of two_stage_kmeans.py or single_stage_balanced_kmeans.py",
    )
    parser.add_argument(
        "--images-dir",
        type=Path,
        help="directory that the records' image paths are relative to (required with --input-jsonl; "
        "a mixture gives each dataset's root instead)",
    )
    parser.add_argument(
        "--clip-model",
        default=DEFAULT_CLIP_MODEL,
        help=f"CLIP checkpoint id or directory used to embed images when no --features are given "
        f"(default: {DEFAULT_CLIP_MODEL}); it must be the model the clustering was fitted on",
    )
    parser.add_argument(
        "--features", type=Path, help="features.npy (N, D) of extract_features.py, reused as is"
    )
    parser.add_argument(
        "--keys", type=Path, help="keys.txt of extract_features.py, one key per row of --features"
    )
    parser.add_argument(
        "--shard-max-count", type=int, default=2000, help="maximum samples per shard (default: 2000)"
    )
    parser.add_argument(
        "--shard-max-size",
        type=int,
        default=1 << 30,
        help="maximum bytes per shard, estimated from tar block sizes (default: 1073741824, 1 GiB)",
    )
    parser.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="what to do with a malformed line, a missing or unreadable image, a record without a "
        "conversation or with a wrong <image> count: stop with an error naming the line (fail, "
        "the default), or skip it and list it with its reason in the manifest (skip)",
    )
    parser.add_argument(
        "--text-only",
        default="skip",
        help="records without an image: 'skip' (the default) lists them as skipped in the manifest, "
        "because routing is by image embedding and a text-only record has none, so adding it to an "
        "arbitrary expert would change that expert's data mixture; an expert id K writes them all "
        "to expert K. Either way they are counted under text_only_records",
    )
    parser.add_argument(
        "--image-tokens",
        type=int,
        default=256,
        help="image tokens per image in the manifest's token estimate (default: 256, one 448 px tile)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images per CLIP forward pass (default: 64)"
    )
    parser.add_argument(
        "--read-threads",
        type=int,
        default=8,
        help="threads that read and decode images to check them and to embed them (default: 8)",
    )
    parser.add_argument(
        "--device", default=None, help="device for CLIP (default: cuda when available, else cpu)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier split (or an interrupted one) in --output-dir",
    )
    return parser


def datasets_from_args(args: argparse.Namespace) -> list[DatasetEntry]:
    """Return the datasets to split: the mixture's entries, or one entry for --input-jsonl."""
    if args.meta_path is not None:
        return load_meta(args.meta_path)
    if args.images_dir is None:
        raise ValueError(
            "--images-dir is required with --input-jsonl: image paths in the records are relative to it."
        )
    if not args.input_jsonl.is_file():
        raise FileNotFoundError(f"--input-jsonl {args.input_jsonl} not found.")
    return [DatasetEntry(name=args.input_jsonl.stem, annotation=args.input_jsonl, root=args.images_dir)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        datasets = datasets_from_args(args)
        router = Router.from_dir(args.clustering_results_dir)
        options = SplitOptions(
            shard_max_count=args.shard_max_count,
            shard_max_size=args.shard_max_size,
            on_error=args.on_error,
            text_only=args.text_only,
            image_tokens=args.image_tokens,
            read_threads=args.read_threads,
        )
        options.validate(router.n_experts)
        features = make_feature_source(
            args.clip_model, args.features, args.keys, args.device, args.batch_size
        )
        arguments = {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items()
            if key not in ("overwrite", "device", "read_threads")
        }
        manifest = split_records(
            datasets, args.output_dir, router, features, options, args.overwrite, arguments, progress=True
        )
    except (ValueError, FileNotFoundError, FileExistsError, SplitError) as error:
        parser.exit(2, f"error: {error}\n")

    print(
        f"Split {manifest['total_records']} records into {manifest['n_experts']} experts at {args.output_dir}"
    )
    for row in manifest["experts"]:
        print(
            f"  expert {row['expert']}: {row['samples']} samples, {row['images']} images, "
            f"~{row['tokens_estimate']} tokens, {len(row['shards'])} shards"
        )
    print(f"  skipped: {len(manifest['skipped'])} {manifest['skipped_by_reason']}")
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
