"""Training-data throughput: WebDataset shards against jsonl plus loose image files.

    python benchmarks/dataloading.py --records 512 --workers 2

Both loaders do the same work per sample. They decode the image to RGB, resize and normalise it
into one 448x448 tile with the InternVL image processor, render the chat template, tokenize with
256 image tokens and collate into training batches. The shard loader is `ExpertDataModule`
(resampled shards, shuffle buffer); the baseline is a map-style Dataset over the jsonl records
that opens each image file by path, shuffled by a DataLoader. The data are synthetic 448x448
JPEG images (quality 90) with 1-3 question-answer turns, written to a temporary directory, so
both loaders read from the page cache after the first pass.

Prints one table row per loader: samples, seconds, samples/s and samples/s per worker, each the
median of `--repeats` timed epochs after one untimed warm-up epoch. The two loaders take turns
epoch by epoch, so changes in machine load affect both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this folder comes first on sys.path and its clustering.py would shadow the
# clustering package, so the repository root goes in front of it.
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from clustering import split_dataset  # noqa: E402
from datamodules.chat import ConversationEncoder  # noqa: E402
from datamodules.collate import TrainCollator, TrainSampleEncoder  # noqa: E402
from datamodules.images import member_suffix  # noqa: E402
from datamodules.splits import load_processor  # noqa: E402
from datamodules.synthetic import write_synthetic_dataset  # noqa: E402
from datamodules.training import ExpertDataModule  # noqa: E402

PRESET = "internvl2_5-1b"  # 448 px tiles, 256 image tokens per tile


class JsonlImageDataset(Dataset):
    """The baseline: jsonl records in memory, each image read from its own file when indexed.

    It builds the same raw sample (``json`` bytes and ``0.<ext>`` image bytes) that a shard
    contains and hands it to the same `TrainSampleEncoder`, so only the storage differs.
    """

    def __init__(self, jsonl: Path, images_dir: Path, encoder: TrainSampleEncoder) -> None:
        self.records = [json.loads(line) for line in jsonl.read_text().splitlines()]
        self.images_dir = images_dir
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        member = f"0.{member_suffix(record['image'])}"
        meta = {"conversations": record["conversations"], "images": [member]}
        sample = {"json": json.dumps(meta).encode(), member: (self.images_dir / record["image"]).read_bytes()}
        return self.encoder(sample)


class SkipNoneCollator(TrainCollator):
    """`TrainCollator` that drops samples the encoder skipped (None)."""

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, Any]:
        return super().__call__([sample for sample in samples if sample is not None])


def time_epoch(loader: DataLoader) -> tuple[int, float]:
    """Iterate `loader` once; return the samples it yielded and the seconds it took."""
    samples = 0
    start = time.perf_counter()
    for batch in loader:
        samples += batch["input_ids"].shape[0]
    return samples, time.perf_counter() - start


def time_interleaved(loaders: dict[str, DataLoader], repeats: int) -> dict[str, tuple[int, list[float]]]:
    """Time `repeats` epochs of each loader after one untimed warm-up epoch each.

    The loaders take turns epoch by epoch, so a change in machine load during the run affects
    all of them alike. Returns, per loader, the samples per epoch and each epoch's seconds.
    """
    for loader in loaders.values():
        time_epoch(loader)
    results: dict[str, tuple[int, list[float]]] = {name: (0, []) for name in loaders}
    for _ in range(repeats):
        for name, loader in loaders.items():
            samples, seconds = time_epoch(loader)
            results[name] = (samples, results[name][1] + [seconds])
    return results


def prepare(directory: Path, records: int) -> tuple[Any, Path, Path]:
    """Write the synthetic dataset, its one-expert split and the 448 px processor."""
    from lightning_modules.presets import build_small_processor, get_preset

    data = write_synthetic_dataset(
        directory / "data", n_records=records, n_experts=1, image_size=448, image_format="jpeg"
    )
    split_dir = directory / "split"
    split_dataset.main(data.split_arguments(split_dir, "--shard-max-count", "64"))
    lines = data.jsonl.read_text().splitlines()
    texts = [turn["value"] for line in lines for turn in json.loads(line)["conversations"]]
    processor_dir = directory / "processor"
    build_small_processor(texts, processor_dir, image_size=get_preset(PRESET).image_size, preset=PRESET)
    return data, split_dir, processor_dir


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=512, help="synthetic records (one 448 px image each)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of each loader")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    parser.add_argument(
        "--shuffle-buffer",
        type=int,
        default=64,
        help="samples in each shard worker's shuffle buffer; it refills at every epoch start",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per loader (after one warm-up)")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="where to write the data (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as temporary:
        directory = args.work_dir or Path(temporary)
        data, split_dir, processor_dir = prepare(directory, args.records)
        image_bytes = sum(path.stat().st_size for path in (data.images_dir / "images").iterdir())

        module = ExpertDataModule(
            train_dir=str(split_dir),
            processor=str(processor_dir),
            expert=0,
            batch_size=args.batch_size,
            num_workers=args.workers,
            max_length=4096,
            shuffle_buffer=args.shuffle_buffer,
            samples_per_epoch=args.records,
        )
        module.setup("fit")

        processor = load_processor(processor_dir)
        encoder = TrainSampleEncoder(ConversationEncoder(processor, max_length=4096))
        baseline = DataLoader(
            JsonlImageDataset(data.jsonl, data.images_dir, encoder),
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
            collate_fn=SkipNoneCollator(processor.tokenizer.pad_token_id),
        )
        results = time_interleaved(
            {
                "WebDataset shards (ExpertDataModule)": module.train_dataloader(),
                "jsonl + loose image files": baseline,
            },
            args.repeats,
        )

    rows = []
    for name, (samples, seconds) in results.items():
        median = statistics.median(seconds)
        rate = samples / median
        rows.append(
            {
                "loader": name,
                "samples": samples,
                "seconds": median,
                "samples_per_s": rate,
                "samples_per_s_per_worker": rate / max(1, args.workers),
            }
        )

    print(
        f"{args.records} records, 448x448 JPEG ({image_bytes / args.records / 1024:.0f} KiB mean), batch "
        f"{args.batch_size}, {args.workers} workers, median of {args.repeats} epochs; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    print(f"| {'loader':<38} | samples | seconds | samples/s | samples/s per worker |")
    print(f"| {'-' * 38} | ------: | ------: | --------: | -------------------: |")
    for row in rows:
        print(
            f"| {row['loader']:<38} | {row['samples']:7d} | {row['seconds']:7.2f} | {row['samples_per_s']:9.1f} "
            f"| {row['samples_per_s_per_worker']:20.1f} |"
        )
    return rows


if __name__ == "__main__":
    main()
