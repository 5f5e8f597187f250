"""Embed every unique image of a dataset with CLIP: features.npy (N x D, L2-normalised) + keys.txt.

Inputs, one of:

- ``--input-jsonl FILE [FILE ...] --images-dir DIR``: InternVL jsonl (or LLaVA-style json arrays).
  A row's key is the image path as written in the record's ``image`` field (relative to
  ``--images-dir``). Records that share an image share its row; records without an image are
  counted and skipped.
- ``--shards URL [URL ...]``: WebDataset tar shards (brace patterns expand). A row's key is the
  image member's name, ``<__key__>.<ext>``. A key seen in an earlier shard keeps its first row.

Outputs in ``--output-dir``: ``features.npy`` (N, D) float32, ``keys.txt`` (N lines, row-aligned),
``failed.jsonl`` (one ``{"key", "reason"}`` per image that could not be read or decoded) and
``features_metadata.json`` (arguments, counts, timing, versions).

Work is cut into chunks (``--chunk-size`` keys of a jsonl input, or one shard each). Each finished
chunk is written under ``<output-dir>/chunks/`` before the next is needed, so a re-run with the same
arguments after a crash embeds only the chunks that are missing. The final files are assembled from
the chunks and renamed into place when complete.

Images are read, decoded and preprocessed in DataLoader workers; the main process runs the model
(float16 on CUDA).

Usage:
    python clustering/extract_features.py --input-jsonl data/train.jsonl --images-dir data \
        --output-dir runs/features
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from clustering.features import (
    DEFAULT_CLIP_MODEL,
    check_model_source,
    encode_pixel_values,
    load_clip_image_encoder,
    preprocess_images,
    resolve_device,
)
from datamodules.images import decode_rgb
from datamodules.sources import REASON_BLANK, DatasetEntry, iter_raw_records

log = logging.getLogger("clustering.extract_features")

FEATURES_FILE = "features.npy"
KEYS_FILE = "keys.txt"
FAILED_FILE = "failed.jsonl"
METADATA_FILE = "features_metadata.json"
CHUNKS_DIR = "chunks"
PLAN_FILE = "plan.json"

# Member suffixes treated as images in WebDataset shards ("img" is what the dataset split writes
# for an image whose source path has no suffix).
SHARD_IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "img"}


@dataclass
class WorkUnit:
    """One chunk of work: a slice of jsonl image keys, or one WebDataset shard."""

    index: int
    keys: list[str] = field(default_factory=list)
    shard: str | None = None


@dataclass
class EncodedBatch:
    """Preprocessed images of one unit, sent from a DataLoader worker to the main process."""

    unit: int
    keys: list[str]
    pixel_values: torch.Tensor | None  # (B, 3, H, W) float32, None when B = 0
    failures: list[dict[str, str]]
    last: bool


# ---------------------------------------------------------------------------------------------
# Reading the inputs


def read_image_keys(paths: Sequence[str | Path]) -> tuple[list[str], dict[str, Any]]:
    """Collect the unique image paths of InternVL jsonl / LLaVA json files, in first-seen order.

    Returns:
        keys: unique ``image`` values (a record with a list contributes each entry).
        counts: ``records``, ``records_without_image``, ``malformed`` (count) and
        ``malformed_examples`` (up to 5 ``"file line N: reason"`` strings).
    """
    seen: dict[str, None] = {}
    counts: dict[str, Any] = {
        "records": 0,
        "records_without_image": 0,
        "malformed": 0,
        "malformed_examples": [],
    }

    def note_malformed(reason: str) -> None:
        counts["malformed"] += 1
        if len(counts["malformed_examples"]) < 5:
            counts["malformed_examples"].append(reason)

    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"Annotation file {path} not found.")
        dataset = DatasetEntry(name=path.stem, annotation=path, root=path.parent)
        for raw in iter_raw_records(dataset):
            if raw.error is not None:
                if raw.error.reason != REASON_BLANK:
                    note_malformed(str(raw.error))
                continue
            counts["records"] += 1
            image = raw.data.get("image")
            images = [image] if isinstance(image, str) else image
            if images is None or images == []:
                counts["records_without_image"] += 1
                continue
            where = f"{path} line {raw.line}"
            if not isinstance(images, list) or not all(isinstance(item, str) and item for item in images):
                note_malformed(f"{where}: `image` must be a path or a list of paths, got {image!r:.80}")
                continue
            for item in images:
                if "\n" in item:
                    note_malformed(f"{where}: image path {item!r:.80} contains a newline")
                    continue
                seen.setdefault(item, None)
    return list(seen), counts


def expand_shards(patterns: Sequence[str]) -> list[str]:
    """Brace-expand shard patterns (``data/shard-{000000..000009}.tar``), keeping order."""
    import braceexpand

    urls: list[str] = []
    for pattern in patterns:
        urls.extend(braceexpand.braceexpand(pattern))
    return urls


# ---------------------------------------------------------------------------------------------
# DataLoader workers: read, decode and preprocess


class _PreprocessedImages(IterableDataset):
    """Yield `EncodedBatch` items for the pending units, spread over the DataLoader workers.

    A jsonl unit is cut into ``parts`` interleaved slices of its keys, so that every worker has
    work even when a dataset fits in one chunk; a shard is one part, because a tar file is read
    in order. The tasks (unit, part) go round-robin to the workers. Each task ends with a batch
    whose ``last`` is True, so the main process can tell when all parts of a chunk are done even
    when its size is not known in advance (shards).
    """

    def __init__(
        self,
        units: list[WorkUnit],
        images_dir: Path | None,
        image_processor: Any,
        batch_size: int,
        parts: int,
    ):
        super().__init__()
        self.units = units
        self.images_dir = images_dir
        self.image_processor = image_processor
        self.batch_size = batch_size
        self.parts = parts

    def parts_of(self, unit: WorkUnit) -> int:
        return 1 if unit.shard is not None else self.parts

    def __iter__(self) -> Iterator[EncodedBatch]:
        info = get_worker_info()
        worker_id, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        tasks = [(unit, part) for unit in self.units for part in range(self.parts_of(unit))]
        for unit, part in tasks[worker_id::n_workers]:
            if unit.shard is not None:
                source = self._iter_shard(unit.shard)
            else:
                source = self._iter_files(unit.keys[part :: self.parts])
            yield from self._batches(unit.index, source)

    def _iter_files(self, keys: list[str]) -> Iterator[tuple[str, bytes | None, str | None]]:
        assert self.images_dir is not None
        for key in keys:
            path = self.images_dir / key
            try:
                yield key, path.read_bytes(), None
            except FileNotFoundError:
                yield key, None, f"missing image: {path} not found"
            except OSError as error:
                yield key, None, f"unreadable image: {error}"

    def _iter_shard(self, url: str) -> Iterator[tuple[str, bytes | None, str | None]]:
        import webdataset as wds

        # Splitting is done per unit above, so the shard list of this dataset is left unsplit.
        samples = wds.WebDataset(
            url, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        )
        try:
            for sample in samples:
                for name in sorted(sample):
                    if name.startswith("__") or name.rsplit(".", 1)[-1].lower() not in SHARD_IMAGE_EXTENSIONS:
                        continue
                    yield f"{sample['__key__']}.{name}", sample[name], None
        except Exception as error:  # webdataset raises whatever its opener or tarfile raises
            raise RuntimeError(
                f"Reading shard {url} failed: {error}. Chunks of other shards are kept; fix or remove "
                "this shard and re-run with the same arguments to resume."
            ) from error

    def _batches(
        self, unit: int, source: Iterator[tuple[str, bytes | None, str | None]]
    ) -> Iterator[EncodedBatch]:
        keys: list[str] = []
        images: list[Image.Image] = []
        failures: list[dict[str, str]] = []
        for key, data, error in source:
            if data is not None:
                try:
                    images.append(decode_rgb(data))
                    keys.append(key)
                except (OSError, UnidentifiedImageError, ValueError) as decode_error:
                    # PIL names the in-memory buffer with its address; drop it so reasons are reproducible.
                    error = "unreadable image: " + re.sub(r" at 0x[0-9a-fA-F]+", "", str(decode_error))
            if error is not None:
                failures.append({"key": key, "reason": error})
            if len(images) == self.batch_size:
                yield EncodedBatch(
                    unit, keys, preprocess_images(self.image_processor, images), failures, False
                )
                keys, images, failures = [], [], []
        pixel_values = preprocess_images(self.image_processor, images) if images else None
        yield EncodedBatch(unit, keys, pixel_values, failures, True)


def _keep_batch(item: EncodedBatch) -> EncodedBatch:
    """Collate function for ``batch_size=None``: items are already batches."""
    return item


# ---------------------------------------------------------------------------------------------
# Chunks on disk


def _chunk_paths(chunks_dir: Path, index: int) -> tuple[Path, Path, Path]:
    stem = chunks_dir / f"chunk-{index:06d}"
    return stem.with_suffix(".npy"), stem.with_suffix(".keys.txt"), stem.with_suffix(".failed.jsonl")


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_chunk(
    chunks_dir: Path, index: int, features: np.ndarray, keys: list[str], failures: list[dict]
) -> None:
    """Write one chunk; the keys file is renamed into place last and marks the chunk complete."""
    features_path, keys_path, failed_path = _chunk_paths(chunks_dir, index)

    def save_features(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, features)

    _write_atomic(features_path, save_features)
    _write_atomic(failed_path, lambda tmp: tmp.write_text("".join(json.dumps(f) + "\n" for f in failures)))
    _write_atomic(keys_path, lambda tmp: tmp.write_text("".join(key + "\n" for key in keys)))


def _chunk_is_complete(chunks_dir: Path, index: int) -> bool:
    return all(path.exists() for path in _chunk_paths(chunks_dir, index))


def _read_chunk(chunks_dir: Path, index: int) -> tuple[np.ndarray, list[str], list[dict]]:
    features_path, keys_path, failed_path = _chunk_paths(chunks_dir, index)
    features = np.load(features_path, mmap_mode="r", allow_pickle=False)
    keys = keys_path.read_text().splitlines()
    failures = [json.loads(line) for line in failed_path.read_text().splitlines() if line]
    if len(keys) != len(features):
        raise ValueError(
            f"{keys_path} has {len(keys)} keys but {features_path} has {len(features)} rows. "
            "HINT: delete that chunk's files and re-run to embed it again."
        )
    return features, keys, failures


# ---------------------------------------------------------------------------------------------
# The run


def _plan(args: argparse.Namespace, units: list[WorkUnit]) -> dict[str, Any]:
    """Describe the work so that a re-run can tell whether existing chunks belong to it."""
    digest = hashlib.sha1()
    for unit in units:
        digest.update((unit.shard or "\n".join(unit.keys)).encode())
        digest.update(b"\0")
    return {
        "clip_model": str(args.clip_model),
        "input_jsonl": [str(Path(p).resolve()) for p in args.input_jsonl or []],
        "images_dir": str(Path(args.images_dir).resolve()) if args.images_dir else None,
        "shards": list(args.shards or []),
        "chunk_size": args.chunk_size,
        "n_units": len(units),
        "units_sha1": digest.hexdigest(),
    }


def _prepare_output_dir(output_dir: Path, plan: dict[str, Any], overwrite: bool) -> Path:
    """Create or reuse the output directory; returns the chunks directory."""
    chunks_dir = output_dir / CHUNKS_DIR
    plan_path = chunks_dir / PLAN_FILE
    if overwrite:
        for name in (FEATURES_FILE, KEYS_FILE, FAILED_FILE, METADATA_FILE):
            (output_dir / name).unlink(missing_ok=True)
        shutil.rmtree(chunks_dir, ignore_errors=True)
    elif (output_dir / FEATURES_FILE).exists():
        raise FileExistsError(
            f"{output_dir / FEATURES_FILE} already exists. HINT: pass --overwrite to embed again, "
            "or choose another --output-dir."
        )
    elif plan_path.exists():
        previous = json.loads(plan_path.read_text())
        if previous != plan:
            changed = sorted(key for key in plan if previous.get(key) != plan[key])
            raise FileExistsError(
                f"{chunks_dir} contains chunks of a different run (differs in {changed}). HINT: re-run with "
                "the original arguments to resume it, or pass --overwrite to discard those chunks."
            )
    elif output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(
            f"{output_dir} is not empty and contains no chunks of this run. HINT: choose an empty --output-dir "
            "or pass --overwrite."
        )
    chunks_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(plan_path, lambda tmp: tmp.write_text(json.dumps(plan, indent=2)))
    return chunks_dir


def _embed_pending(
    pending: list[WorkUnit],
    chunks_dir: Path,
    args: argparse.Namespace,
    total_images: int | None,
    done_images: int,
) -> int:
    """Embed the pending units and write one chunk each; returns the number of images processed."""
    model, image_processor = load_clip_image_encoder(args.clip_model, device=args.device)
    images_dir = Path(args.images_dir) if args.images_dir else None
    n_workers = args.num_workers
    dataset = _PreprocessedImages(
        pending, images_dir, image_processor, args.batch_size, parts=max(1, n_workers)
    )
    units_by_index = {unit.index: unit for unit in pending}
    parts_done: dict[int, int] = {}
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=n_workers,
        collate_fn=_keep_batch,
        pin_memory=model.device.type == "cuda",
        prefetch_factor=4 if n_workers > 0 else None,
        persistent_workers=False,
    )
    in_flight: dict[int, tuple[list[np.ndarray], list[str], list[dict]]] = {}
    processed = 0
    with tqdm(
        total=total_images, initial=done_images, unit="img", desc="CLIP features", dynamic_ncols=True
    ) as bar:
        for batch in loader:
            embeds, keys, failures = in_flight.setdefault(batch.unit, ([], [], []))
            if batch.pixel_values is not None:
                embeds.append(encode_pixel_values(model, batch.pixel_values).cpu().numpy())
                keys.extend(batch.keys)
            failures.extend(batch.failures)
            bar.update(len(batch.keys) + len(batch.failures))
            processed += len(batch.keys) + len(batch.failures)
            if not batch.last:
                continue
            parts_done[batch.unit] = parts_done.get(batch.unit, 0) + 1
            unit = units_by_index[batch.unit]
            if parts_done[batch.unit] < dataset.parts_of(unit):
                continue
            dim = model.config.projection_dim
            features = np.concatenate(embeds) if embeds else np.empty((0, dim), dtype=np.float32)
            if unit.shard is None:
                # Parts arrive interleaved; restore the unit's key order so that outputs do not
                # depend on the number of workers.
                position = {key: i for i, key in enumerate(unit.keys)}
                order = np.argsort([position[key] for key in keys], kind="stable")
                features = features[order]
                keys = [keys[i] for i in order]
                failures = sorted(failures, key=lambda failure: position[failure["key"]])
            _write_chunk(chunks_dir, batch.unit, features, keys, failures)
            del in_flight[batch.unit]
    return processed


def _assemble(output_dir: Path, chunks_dir: Path, units: list[WorkUnit]) -> dict[str, int]:
    """Concatenate the chunks into features.npy / keys.txt / failed.jsonl; returns counts."""
    kept: list[tuple[int, np.ndarray]] = []  # (unit index, row mask) per chunk
    all_keys: list[str] = []
    failures: list[dict] = []
    seen: set[str] = set()
    duplicates = 0
    dim = None
    for unit in units:
        features, keys, chunk_failures = _read_chunk(chunks_dir, unit.index)
        mask = np.ones(len(keys), dtype=bool)
        for row, key in enumerate(keys):
            if key in seen:
                mask[row] = False
                duplicates += 1
            else:
                seen.add(key)
                all_keys.append(key)
        kept.append((unit.index, mask))
        failures.extend(chunk_failures)
        if len(features):
            dim = features.shape[1]
    if dim is None:
        raise RuntimeError(
            f"No image could be embedded ({len(failures)} failed; first reasons: "
            f"{[f['reason'] for f in failures[:3]]}). HINT: check --images-dir and the image paths."
        )

    tmp_features = output_dir / (FEATURES_FILE + ".tmp")
    out = np.lib.format.open_memmap(tmp_features, mode="w+", dtype=np.float32, shape=(len(all_keys), dim))
    row = 0
    for index, mask in kept:
        features = _read_chunk(chunks_dir, index)[0][mask]
        out[row : row + len(features)] = features
        row += len(features)
    out.flush()
    del out
    os.replace(tmp_features, output_dir / FEATURES_FILE)
    _write_atomic(output_dir / KEYS_FILE, lambda tmp: tmp.write_text("".join(k + "\n" for k in all_keys)))
    _write_atomic(
        output_dir / FAILED_FILE, lambda tmp: tmp.write_text("".join(json.dumps(f) + "\n" for f in failures))
    )
    return {
        "images": len(all_keys),
        "dim": dim,
        "failed": len(failures),
        "duplicate_keys_dropped": duplicates,
    }


def extract_features(args: argparse.Namespace) -> dict[str, Any]:
    """Run the extraction described by parsed arguments; returns the metadata written to disk."""
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    if args.input_jsonl:
        keys, input_counts = read_image_keys(args.input_jsonl)
        if input_counts["malformed"]:
            log.warning(
                "Skipped %d malformed records, for example %s",
                input_counts["malformed"],
                input_counts["malformed_examples"],
            )
        if not keys:
            raise ValueError(
                f"No image paths found in {args.input_jsonl} ({input_counts['records']} records). "
                "HINT: records must have an `image` field."
            )
        units = [
            WorkUnit(index=i, keys=keys[offset : offset + args.chunk_size])
            for i, offset in enumerate(range(0, len(keys), args.chunk_size))
        ]
        total_images: int | None = len(keys)
    else:
        urls = expand_shards(args.shards)
        input_counts = {"shards": len(urls)}
        units = [WorkUnit(index=i, shard=url) for i, url in enumerate(urls)]
        total_images = None

    # Before the plan is written, so that a mistyped --clip-model does not block the corrected re-run.
    check_model_source(args.clip_model)
    chunks_dir = _prepare_output_dir(output_dir, _plan(args, units), args.overwrite)
    pending = [unit for unit in units if not _chunk_is_complete(chunks_dir, unit.index)]
    reused = len(units) - len(pending)
    done_images = (total_images or 0) - sum(len(unit.keys) for unit in pending)
    if reused:
        log.info("Resuming: %d of %d chunks already done, %d to embed", reused, len(units), len(pending))
    processed = _embed_pending(pending, chunks_dir, args, total_images, done_images) if pending else 0

    counts = _assemble(output_dir, chunks_dir, units)
    seconds = time.perf_counter() - start
    import transformers

    metadata = {
        "arguments": {key: value for key, value in vars(args).items()},
        "inputs": input_counts,
        **counts,
        "chunks": len(units),
        "chunks_reused": reused,
        "images_processed_this_run": processed,
        "seconds": round(seconds, 3),
        "images_per_second": round(processed / seconds, 1) if seconds > 0 else None,
        "device": str(resolve_device(args.device)),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
        },
    }
    _write_atomic(
        output_dir / METADATA_FILE, lambda tmp: tmp.write_text(json.dumps(metadata, indent=2, default=str))
    )
    if not args.keep_chunks:
        shutil.rmtree(chunks_dir)
    return metadata


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input-jsonl", nargs="+", help="InternVL .jsonl or LLaVA .json annotation files.")
    source.add_argument("--shards", nargs="+", help="WebDataset .tar shards or brace patterns.")
    parser.add_argument("--images-dir", help="Root that the `image` paths of --input-jsonl are relative to.")
    parser.add_argument(
        "--output-dir", required=True, help="Directory for features.npy, keys.txt and metadata."
    )
    parser.add_argument(
        "--clip-model", default=DEFAULT_CLIP_MODEL, help="Hugging Face id or local directory."
    )
    parser.add_argument("--batch-size", type=int, default=256, help="Images per forward pass.")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="DataLoader workers that decode images.",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=50_000,
        help="Images per resumable chunk (jsonl input; shards are one chunk each).",
    )
    parser.add_argument("--device", default=None, help="torch device; CUDA when visible, else CPU.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Discard existing outputs and chunks in --output-dir."
    )
    parser.add_argument(
        "--keep-chunks", action="store_true", help="Keep chunks/ after assembling the final files."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    problems = []
    if args.input_jsonl and not args.images_dir:
        problems.append("--images-dir is required with --input-jsonl")
    if args.shards and args.images_dir:
        problems.append("--images-dir applies only to --input-jsonl; shards carry their images")
    for name in ("batch_size", "chunk_size"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_workers < 0:
        problems.append(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.images_dir and not Path(args.images_dir).is_dir():
        problems.append(f"--images-dir {args.images_dir} is not a directory")
    if problems:
        parser.error("; ".join(problems))

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metadata = extract_features(args)
    print(
        f"Wrote {metadata['images']} x {metadata['dim']} features to {Path(args.output_dir) / FEATURES_FILE} "
        f"({metadata['failed']} images failed, listed in {FAILED_FILE}; "
        f"{metadata['images_per_second']} images/s over {metadata['seconds']} s)"
    )
    return metadata


if __name__ == "__main__":
    main()
