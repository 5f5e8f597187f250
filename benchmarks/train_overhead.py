"""Training overhead: `InternVLExpert` through the Lightning Trainer against a plain PyTorch loop.

Both sides train the same randomly initialised checkpoint (loaded from the same directory, so the
weights are equal), on the same list of collated batches served by the same kind of DataLoader,
with the same AdamW parameter groups and warmup-cosine schedule. The Lightning side is the real
module with its logging hooks (loss, learning rate, gradient norm, throughput) and a TensorBoard
logger; the plain side is forward, backward, optimiser step, scheduler step and zero_grad.

A step's time is the wall time between two consecutive batch ends, so it includes fetching the
batch and every hook in between. The process CPU time over the same interval is reported too: on
a machine shared with other jobs it is the steadier figure, because it leaves out the time the
process waited for a core. The first `--warmup` steps of each run are dropped, and the two
sides alternate over `--rounds` runs, so that a change in machine load hits both. The table gives
median step times, their ratio (Lightning / plain; the target is at most 1.10), and the peak
resident memory of each side. Both sides must see the same losses; the largest difference is
printed as a check that they did the same work.

Usage:
    python benchmarks/train_overhead.py --sizes tiny,40m --batch-size 8 --steps 10 --rounds 2
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from transformers import get_cosine_schedule_with_warmup  # noqa: E402

from benchmarks._common import (  # noqa: E402
    PeakRSS,
    build_benchmark_processor,
    build_checkpoint,
    check_model_sizes,
    count_parameters,
    format_table,
    limit_threads,
    machine_summary,
    median,
    parse_list,
    training_batches,
)
from datamodules.chat import ConversationEncoder  # noqa: E402
from lightning_modules.internvl_module import InternVLExpert  # noqa: E402

TARGET_RATIO = 1.10


class CycledBatches(Dataset):
    """`length` items cycling through a list of collated batches (use with `batch_size=None`)."""

    def __init__(self, batches: list[dict[str, Any]], length: int) -> None:
        self.batches = batches
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batches[index % len(self.batches)]


@dataclass
class RunResult:
    """Per-step wall and process CPU times (s) after warmup, the loss of every step, and the peak RSS (MiB)."""

    step_seconds: list[float] = field(default_factory=list)
    step_cpu_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    peak_rss_mib: float = 0.0


class StepClock:
    """Wall and CPU time between consecutive calls of `tick`, recorded from step `warmup` on."""

    def __init__(self, warmup: int, result: RunResult) -> None:
        self.warmup = warmup
        self.result = result
        self._last: tuple[float, float] | None = None

    def tick(self, step: int) -> None:
        now = (time.perf_counter(), time.process_time())
        if self._last is not None and step >= self.warmup:
            self.result.step_seconds.append(now[0] - self._last[0])
            self.result.step_cpu_seconds.append(now[1] - self._last[1])
        self._last = now


class StepTimer(Callback):
    """Record the time between consecutive training-batch ends, and each step's loss."""

    def __init__(self, warmup: int) -> None:
        self.result = RunResult()
        self.clock = StepClock(warmup, self.result)

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.clock.tick(batch_idx)
        self.result.losses.append(float(outputs["loss"]))


def make_loader(batches: list[dict[str, Any]], n_steps: int) -> DataLoader:
    return DataLoader(CycledBatches(batches, n_steps), batch_size=None, num_workers=0)


def make_expert(checkpoint: Path, learning_rate: float, warmup_ratio: float) -> InternVLExpert:
    return InternVLExpert(model_name_or_path=str(checkpoint), learning_rate=learning_rate, warmup_ratio=warmup_ratio)


def run_lightning(
    checkpoint: Path, batches: list[dict[str, Any]], steps: int, warmup: int, options: argparse.Namespace, root: Path
) -> RunResult:
    """Train with `InternVLExpert` and `Trainer.fit` for warmup + steps optimiser steps."""
    expert = make_expert(checkpoint, options.learning_rate, options.warmup_ratio)
    timer = StepTimer(warmup)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=warmup + steps,
        logger=TensorBoardLogger(root, name="train_overhead"),
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )
    trainer.fit(expert, make_loader(batches, warmup + steps))
    return timer.result


def run_plain(
    checkpoint: Path, batches: list[dict[str, Any]], steps: int, warmup: int, options: argparse.Namespace
) -> RunResult:
    """Train the same model with a hand-written loop: same optimiser groups, schedule and batches."""
    expert = make_expert(checkpoint, options.learning_rate, options.warmup_ratio)
    model = expert.build_model()
    model.train()
    hparams = expert.hparams
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hparams.learning_rate,
        betas=tuple(hparams.adam_betas),
        eps=hparams.adam_eps,
    )
    total = warmup + steps
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(options.warmup_ratio * total), total)

    result = RunResult()
    clock = StepClock(warmup, result)
    for index, batch in enumerate(make_loader(batches, total)):
        loss = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            labels=batch["labels"],
            use_cache=False,
        ).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick(index)
        result.losses.append(float(loss.detach()))
    return result


def measure_size(size: str, options: argparse.Namespace, workdir: Path, processor: Any) -> list[Any]:
    """Run both sides `options.rounds` times on model `size`; return one table row."""
    checkpoint = build_checkpoint(size, processor, workdir / f"checkpoint-{size}", seed=options.seed)
    encoder = ConversationEncoder(processor, max_length=512)
    batches = training_batches(encoder, options.distinct_batches, options.batch_size, seed=options.seed)
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches) / len(batches)
    n_params = count_parameters(make_expert(checkpoint, options.learning_rate, options.warmup_ratio).build_model())

    peak = PeakRSS()
    results: dict[str, list[RunResult]] = {"plain": [], "lightning": []}
    for round_index in range(options.rounds):
        order = ["plain", "lightning"] if round_index % 2 == 0 else ["lightning", "plain"]
        for side in order:
            gc.collect()
            peak.reset()
            if side == "plain":
                result = run_plain(checkpoint, batches, options.steps, options.warmup, options)
            else:
                root = workdir / f"logs-{size}-{round_index}"
                result = run_lightning(checkpoint, batches, options.steps, options.warmup, options, root)
            result.peak_rss_mib = peak.read()
            results[side].append(result)
            print(
                f"  {size} round {round_index + 1}/{options.rounds} {side}: "
                f"median step {1e3 * median(result.step_seconds):.1f} ms",
                flush=True,
            )

    plain_ms = 1e3 * median([s for r in results["plain"] for s in r.step_seconds])
    lightning_ms = 1e3 * median([s for r in results["lightning"] for s in r.step_seconds])
    plain_cpu_ms = 1e3 * median([s for r in results["plain"] for s in r.step_cpu_seconds])
    lightning_cpu_ms = 1e3 * median([s for r in results["lightning"] for s in r.step_cpu_seconds])
    loss_gap = max(
        abs(a - b)
        for plain, lightning in zip(results["plain"], results["lightning"], strict=True)
        for a, b in zip(plain.losses, lightning.losses, strict=True)
    )
    ratio = lightning_ms / plain_ms
    return [
        size,
        f"{n_params / 1e6:.1f}M",
        f"{options.batch_size} x {tokens / options.batch_size:.0f}",
        plain_ms,
        lightning_ms,
        ratio,
        "yes" if ratio <= TARGET_RATIO else "no",
        plain_cpu_ms,
        lightning_cpu_ms,
        lightning_cpu_ms / plain_cpu_ms,
        max(r.peak_rss_mib for r in results["plain"]),
        max(r.peak_rss_mib for r in results["lightning"]),
        f"{loss_gap:.1e}",
    ]


HEADERS = [
    "model",
    "params",
    "batch (samples x mean tokens)",
    "plain step ms",
    "Lightning step ms",
    "ratio",
    f"<= {TARGET_RATIO}",
    "plain step CPU ms",
    "Lightning step CPU ms",
    "CPU ratio",
    "plain peak RSS MiB",
    "Lightning peak RSS MiB",
    "max loss diff",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,40m", help="Comma-separated model sizes: tiny, 40m.")
    parser.add_argument("--batch-size", type=int, default=8, help="Samples per training batch.")
    parser.add_argument("--steps", type=int, default=10, help="Timed optimiser steps per run.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed optimiser steps at the start of each run.")
    parser.add_argument("--rounds", type=int, default=2, help="Runs of each side, alternating which goes first.")
    parser.add_argument("--distinct-batches", type=int, default=8, help="Different batches, cycled through.")
    parser.add_argument("--learning-rate", type=float, default=4e-5, help="Peak AdamW learning rate.")
    parser.add_argument("--warmup-ratio", type=float, default=0.03, help="Share of steps with linear LR warmup.")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared machine; 0: torch's default)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights and the synthetic data.")
    return parser


def main(argv: Sequence[str] | None = None) -> list[list[Any]]:
    parser = build_parser()
    options = parser.parse_args(argv)
    sizes = parse_list(options.sizes)
    try:
        check_model_sizes(sizes)
    except ValueError as error:
        parser.error(str(error))
    for name in ("batch_size", "steps", "rounds", "distinct_batches"):
        if getattr(options, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(options, name)}")
    if options.warmup < 1:
        parser.error(f"--warmup must be >= 1 (the first step has no previous step to time from), got {options.warmup}")
    limit_threads(options.threads)

    print(f"Training overhead benchmark. {machine_summary()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-overhead-") as tmp:
        workdir = Path(tmp)
        processor = build_benchmark_processor(workdir / "processor")
        for size in sizes:
            rows.append(measure_size(size, options, workdir, processor))
    print()
    print(format_table(HEADERS, rows))
    return rows


if __name__ == "__main__":
    main()
