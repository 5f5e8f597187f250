"""The training DataModule: one expert's shards (or all of them, for the dense baseline).

The WebDataset pipeline, per DataLoader worker::

    WeightedResampledShards   draw shard URLs with replacement, weighted by samples x repeat_time
    tarfile_to_samples        stream the tar members, grouped by key
    ShuffleBuffer             shuffle across shards in a bounded buffer
    TrainSampleEncoder        decode images, render the chat template, tokenize (None = skip)
    select(not None)          drop skipped samples; they were counted and warned about
    batched                   collate into the batch format of docs/architecture.md
    with_epoch                stop after exactly `batches_per_worker` batches

Because the shards are resampled, every worker of every rank can always produce its quota, so
every rank gets the same number of batches per epoch, which DDP and FSDP need to stay in step.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import webdataset as wds
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clustering.shards import load_manifest
from datamodules.chat import ConversationEncoder
from datamodules.collate import EvalSampleEncoder, SkipCounter, TrainCollator, TrainSampleEncoder
from datamodules.evaluation import EvalShardDataset
from datamodules.splits import SplitSource, ensure_small_processor, ensure_split, load_processor

log = logging.getLogger(__name__)


def _worker_slot(rank: int, world_size: int) -> tuple[int, int, int]:
    """Return (worker id, workers per rank, global slot) for the calling DataLoader worker."""
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return worker, num_workers, rank * num_workers + worker


class WeightedResampledShards(IterableDataset):
    """An endless stream of ``{"url": shard}`` drawn with replacement, shard i with weight w_i.

    When there are at least as many shards as (rank, worker) slots, the shards are split by node
    and worker: each slot draws only from its own disjoint subset. With fewer shards, every slot
    draws from all of them. Either way each slot has its own random generator, seeded by `seed`, the
    slot and the epoch.

    Args:
        urls: shard paths.
        weights: (len(urls),) positive sampling weights.
        seed: base seed.
        rank: this process's global rank; `world_size`: the number of ranks. Both are captured
            in the main process, because the DataLoader workers do not see the process group.
    """

    def __init__(self, urls: list[str], weights: list[float], seed: int, rank: int, world_size: int) -> None:
        super().__init__()
        if not urls or len(urls) != len(weights) or min(weights) <= 0:
            raise ValueError(
                f"Need at least one shard and one positive weight per shard, got {len(urls)} urls and {weights}."
            )
        self.urls = list(urls)
        self.weights = list(weights)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = -1

    def slot_shards(self, worker: int, num_workers: int) -> tuple[list[str], list[float]]:
        """Return the shards and weights that one (rank, worker) slot draws from."""
        slots = self.world_size * num_workers
        if len(self.urls) < slots:
            return self.urls, self.weights
        slot = self.rank * num_workers + worker
        return self.urls[slot::slots], self.weights[slot::slots]

    def __iter__(self) -> Iterator[dict[str, str]]:
        self.epoch += 1
        worker, num_workers, slot = _worker_slot(self.rank, self.world_size)
        urls, weights = self.slot_shards(worker, num_workers)
        rng = random.Random(f"{self.seed}-{slot}-{self.epoch}")
        while True:
            yield {"url": rng.choices(urls, weights)[0]}


class ShuffleBuffer(wds.PipelineStage):
    """Shuffle samples in a buffer of `size`, seeded per (rank, worker) slot and epoch."""

    def __init__(self, size: int, seed: int, rank: int, world_size: int) -> None:
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = -1

    def run(self, source: Iterator[Any]) -> Iterator[Any]:
        self.epoch += 1
        _, _, slot = _worker_slot(self.rank, self.world_size)
        rng = random.Random(f"shuffle-{self.seed}-{slot}-{self.epoch}")
        buffer: list[Any] = []
        for sample in source:
            if len(buffer) < self.size:
                buffer.append(sample)
                continue
            index = rng.randrange(len(buffer))
            yield buffer[index]
            buffer[index] = sample
        rng.shuffle(buffer)
        yield from buffer


class TarErrorHandler:
    """Count and warn about shard read errors, then continue with the next shard."""

    def __init__(self) -> None:
        self.skips = SkipCounter("shard reader")

    def __call__(self, error: Exception) -> bool:
        self.skips.add("unreadable shard", repr(error))
        return True


def _is_not_none(sample: Any) -> bool:
    return sample is not None


class SizedPipeline(wds.DataPipeline):
    """A `DataPipeline` with a `__len__`, which gives Lightning the batches per epoch.

    `DataPipeline.with_length` builds a class at run time, which cannot be pickled into
    DataLoader workers started with the spawn method; this top-level class can.
    """

    def __init__(self, *stages: Any, length: int) -> None:
        super().__init__(*stages)
        self.length = length

    def __len__(self) -> int:
        return self.length


class ExpertDataModule(L.LightningDataModule):
    """Training batches from one expert's shards, or from every expert's for the dense baseline.

    Args:
        train_dir: output directory of `split_dataset.py` for the training set.
        processor: processor id or directory (`AutoProcessor.from_pretrained`). For the small
            preset, `prepare_data` builds it here when it is missing.
        expert: the expert whose shards to train on; None trains on all shards (dense baseline).
        batch_size: samples per batch on each rank.
        num_workers: DataLoader worker processes per rank (0 reads in the main process).
        max_length: maximum tokens per sample; longer samples are cut after their last image token
            if that leaves an answer token, and skipped otherwise.
        shuffle_buffer: samples held in the shuffle buffer of each worker.
        samples_per_epoch: samples per epoch over all ranks. None uses the selected shards'
            sample counts times their datasets' repeat_time.
        seed: base seed of shard sampling and shuffling.
        system_message: system turn for records that have none; None adds none.
        dynamic_tiles: InternVL dynamic resolution (up to `max_tiles` tiles per image); off
            by default, which gives one tile per image.
        max_tiles: most tiles per image with `dynamic_tiles`.
        preset: model preset whose processor `prepare_data` builds at `processor` when that
            directory has none (the small CPU preset); None requires an existing processor.
        train_source: inputs to build `train_dir` in `prepare_data` when it has no manifest.
        val_dir: split of the evaluation set, for `val_dataloader`; None disables validation.
        val_source: inputs to build `val_dir` when it has no manifest.
        val_all_experts: validate on every question; by default an expert validates on the
            questions routed to it (the dense baseline always uses all).
        val_batch_size: evaluation samples per batch.
    """

    def __init__(
        self,
        train_dir: str,
        processor: str,
        expert: int | None = None,
        batch_size: int = 1,
        num_workers: int = 2,
        max_length: int = 8192,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        system_message: str | None = None,
        dynamic_tiles: bool = False,
        max_tiles: int = 12,
        preset: str | None = None,
        train_source: SplitSource | None = None,
        val_dir: str | None = None,
        val_source: SplitSource | None = None,
        val_all_experts: bool = False,
        val_batch_size: int = 8,
    ) -> None:
        super().__init__()
        problems = []
        if expert is not None and expert < 0:
            problems.append(f"expert must be >= 0 or None (all experts), got {expert}")
        for name, value in (
            ("batch_size", batch_size),
            ("max_length", max_length),
            ("val_batch_size", val_batch_size),
        ):
            if value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {num_workers}")
        if shuffle_buffer < 1:
            problems.append(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            problems.append(f"samples_per_epoch must be >= 1 or None, got {samples_per_epoch}")
        if problems:
            raise ValueError("Invalid ExpertDataModule arguments:\n  " + "\n  ".join(problems))
        self.save_hyperparameters()
        self.train_dir = Path(train_dir)
        self.processor_path = processor
        self.expert = expert
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_length = max_length
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.system_message = system_message
        self.dynamic_tiles = dynamic_tiles
        self.max_tiles = max_tiles
        self.preset = preset
        self.train_source = train_source
        self.val_dir = Path(val_dir) if val_dir is not None else None
        self.val_source = val_source
        self.val_all_experts = val_all_experts
        self.val_batch_size = val_batch_size

        self.processor: Any = None
        self.manifest: dict[str, Any] | None = None
        self.sample_encoder: TrainSampleEncoder | None = None
        self.val_dataset: EvalShardDataset | None = None

    # -- hooks --------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Build the missing training and evaluation splits and the small processor.

        Lightning runs this in one process per node (local rank 0) before `setup`. It writes files
        only and sets no state, because other ranks would not see it.
        """
        ensure_split(self.train_dir, self.train_source)
        if self.val_dir is not None:
            ensure_split(self.val_dir, self.val_source)
        if self.preset is not None:
            ensure_small_processor(self.processor_path, self.preset, self.train_dir, self.train_source)

    def setup(self, stage: str | None = None) -> None:
        """Load the manifest and the processor. Runs on every rank; reads files only."""
        if self.processor is None:
            self.processor = load_processor(self.processor_path)
            self._check_model_image_tokens()
        self.manifest = load_manifest(self.train_dir)
        n_experts = self.manifest["n_experts"]
        if self.expert is not None and self.expert >= n_experts:
            raise ValueError(
                f"expert={self.expert} but {self.train_dir} was split into {n_experts} experts (0..{n_experts - 1})."
            )
        encoder = self.conversation_encoder()
        self.sample_encoder = TrainSampleEncoder(encoder)
        if self.val_dir is not None and stage in (None, "fit", "validate"):
            experts = None if self.val_all_experts or self.expert is None else [self.expert]
            self.val_dataset = EvalShardDataset(self.val_dir, EvalSampleEncoder(encoder, n_experts), experts)

    def conversation_encoder(self) -> ConversationEncoder:
        """Return the chat-template encoder for the loaded processor."""
        return ConversationEncoder(
            self.processor,
            max_length=self.max_length,
            system_message=self.system_message,
            dynamic_tiles=self.dynamic_tiles,
            max_tiles=self.max_tiles,
        )

    def _check_model_image_tokens(self) -> None:
        if self.preset is None:
            return
        from lightning_modules.presets import build_model_config, check_image_seq_length

        check_image_seq_length(build_model_config(self.preset, self.processor.tokenizer), self.processor)

    # -- shard selection ----------------------------------------------------------------------

    def selected_shards(self) -> list[dict[str, Any]]:
        """Return the manifest's shard entries of the configured expert (all experts when None)."""
        assert self.manifest is not None, "call setup() first"
        experts = self.manifest["experts"]
        rows = experts if self.expert is None else [experts[self.expert]]
        return [shard for row in rows for shard in row["shards"]]

    def epoch_samples(self) -> int:
        """Return the samples of one epoch over all ranks: `samples_per_epoch`, or the weighted size."""
        if self.samples_per_epoch is not None:
            return self.samples_per_epoch
        return max(1, round(sum(shard["samples"] * shard["repeat_time"] for shard in self.selected_shards())))

    def sample_share(self) -> float:
        """Return this selection's share p_k of all written training samples (1.0 for all experts)."""
        assert self.manifest is not None, "call setup() first"
        total = sum(row["samples"] for row in self.manifest["experts"])
        selected = sum(shard["samples"] for shard in self.selected_shards())
        return selected / total if total else 0.0

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def batches_per_rank(self, world_size: int | None = None) -> int:
        """Return the batches each rank gets per epoch: ceil(samples / (world x batch)), rounded up
        to a multiple of the worker count so that every worker yields the same number."""
        world_size = self._world()[1] if world_size is None else world_size
        workers = max(1, self.num_workers)
        per_rank = math.ceil(self.epoch_samples() / (world_size * self.batch_size))
        return math.ceil(per_rank / workers) * workers

    # -- dataloaders --------------------------------------------------------------------------

    def build_train_pipeline(self, rank: int, world_size: int) -> wds.DataPipeline:
        """Return the WebDataset pipeline of one rank; its length is `batches_per_rank(world_size)`."""
        assert self.sample_encoder is not None, "call setup() first"
        shards = self.selected_shards()
        if not shards:
            raise ValueError(
                f"Expert {self.expert} has no training shards in {self.train_dir} (0 samples were routed to it). "
                "HINT: check the manifest's per-expert counts; re-cluster with fewer experts or more data."
            )
        urls = [str(self.train_dir / shard["path"]) for shard in shards]
        weights = [shard["samples"] * shard["repeat_time"] for shard in shards]
        per_rank = self.batches_per_rank(world_size)
        per_worker = per_rank // max(1, self.num_workers)
        pipeline = SizedPipeline(
            WeightedResampledShards(urls, weights, self.seed, rank, world_size),
            wds.tarfile_to_samples(handler=TarErrorHandler()),
            ShuffleBuffer(self.shuffle_buffer, self.seed, rank, world_size),
            wds.map(self.sample_encoder),
            wds.select(_is_not_none),
            wds.batched(
                self.batch_size,
                collation_fn=TrainCollator(self.processor.tokenizer.pad_token_id),
                partial=False,
            ),
            length=per_rank,
        )
        return pipeline.with_epoch(nbatches=per_worker)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._world()
        pipeline = self.build_train_pipeline(rank, world_size)
        shards = self.selected_shards()
        slots = world_size * max(1, self.num_workers)
        rank_zero_info(
            f"Training data: expert {'all' if self.expert is None else self.expert}, {len(shards)} shards "
            f"({'split by rank and worker' if len(shards) >= slots else 'shared by all ranks and workers'}), "
            f"{self.epoch_samples()} samples per epoch, {len(pipeline)} batches of {self.batch_size} per rank "
            f"on {world_size} ranks x {max(1, self.num_workers)} workers"
        )
        return DataLoader(
            pipeline,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader | list[Any]:
        if self.val_dataset is None:
            return []
        return self.val_dataset.dataloader(
            self.val_batch_size, self.num_workers, self.processor.tokenizer.pad_token_id
        )

    @property
    def skip_counts(self) -> dict[str, int]:
        """Samples skipped so far in this process (the main process reads with num_workers=0 only)."""
        return dict(self.sample_encoder.skips.counts) if self.sample_encoder is not None else {}
