"""Evaluation sets: every question of a routed split, once each, in input or expert order.

Evaluation reads the same shards as training but as a map-style dataset: the tar headers are
indexed once, and each sample is read by seeking to its members. The order is the input order
(sample keys number the input records), or that order within each expert, expert by expert. A map-style dataset lets Lightning shard it over ranks
with its `DistributedSampler`.
"""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from clustering.shards import load_manifest
from datamodules.chat import ConversationEncoder
from datamodules.collate import EvalCollator, EvalSampleEncoder
from datamodules.splits import SplitSource, ensure_small_processor, ensure_split, load_processor

log = logging.getLogger(__name__)

EVAL_ORDERS = ("input", "expert")

# (shard path, byte offset of the data, size in bytes) of one tar member.
MemberLocation = tuple[str, int, int]


def index_shard(path: str | Path) -> dict[str, dict[str, MemberLocation]]:
    """Map each sample key of a tar shard to its members' locations, ``{key: {suffix: location}}``.

    The key is the member name up to its first dot, as WebDataset groups members.
    """
    samples: dict[str, dict[str, MemberLocation]] = {}
    with tarfile.open(path) as archive:
        for member in archive:
            if not member.isfile():
                continue
            key, _, suffix = member.name.partition(".")
            samples.setdefault(key, {})[suffix] = (str(path), member.offset_data, member.size)
    return samples


class EvalShardDataset(Dataset):
    """Map-style dataset over the evaluation shards of some or all experts.

    Args:
        split_dir: output directory of `split_dataset.py` for the evaluation set.
        encoder: turns a raw sample (``{"json": bytes, "<i>.<ext>": bytes}``) into model inputs.
        experts: the experts whose questions to include; None includes all.
        order: ``"input"`` (the source records' order) or ``"expert"`` (expert 0's questions first,
            each expert's in input order), which keeps a routed ensemble's batches to one expert
            each and so lets it answer a batch in one `generate` call.
    """

    def __init__(
        self,
        split_dir: str | Path,
        encoder: EvalSampleEncoder,
        experts: list[int] | None = None,
        order: str = "input",
    ) -> None:
        if order not in EVAL_ORDERS:
            raise ValueError(f"order must be one of {EVAL_ORDERS}, got {order!r}.")
        self.split_dir = Path(split_dir)
        self.encoder = encoder
        manifest = load_manifest(self.split_dir)
        self.n_experts = manifest["n_experts"]
        invalid = [k for k in experts or [] if not 0 <= k < self.n_experts]
        if invalid:
            raise ValueError(
                f"experts {invalid} are out of range: {self.split_dir} was split into {self.n_experts} experts."
            )
        selected = manifest["experts"] if experts is None else [manifest["experts"][k] for k in experts]
        index: dict[str, dict[str, MemberLocation]] = {}
        self.keys = []
        for row in selected:
            expert_index: dict[str, dict[str, MemberLocation]] = {}
            for shard in row["shards"]:
                expert_index.update(index_shard(self.split_dir / shard["path"]))
            index.update(expert_index)
            # Keys are the zero-padded input record numbers, so sorting them restores the input order.
            self.keys.extend(sorted(expert_index))
        if order == "input":
            self.keys.sort()
        self.members = [index[key] for key in self.keys]
        self.expected = sum(row["samples"] for row in selected)
        if len(self.keys) != self.expected:
            raise ValueError(
                f"{self.split_dir}: the shards hold {len(self.keys)} samples but the manifest lists {self.expected}. "
                "HINT: the split was changed after it was written; re-run split_dataset.py with --overwrite."
            )

    def __len__(self) -> int:
        return len(self.keys)

    def raw_sample(self, index: int) -> dict[str, Any]:
        """Return sample `index` as stored: ``{"__key__": str, suffix: bytes, ...}``."""
        sample: dict[str, Any] = {"__key__": self.keys[index]}
        for suffix, (path, offset, size) in self.members[index].items():
            with open(path, "rb") as handle:
                handle.seek(offset)
                sample[suffix] = handle.read(size)
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.encoder(self.raw_sample(index))

    def dataloader(self, batch_size: int, num_workers: int, pad_token_id: int) -> DataLoader:
        """Return an unshuffled DataLoader with the evaluation collator."""
        return DataLoader(
            self,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=EvalCollator(pad_token_id),
        )


class EvalDataModule(L.LightningDataModule):
    """Routed evaluation batches for `validate`, `test` and `predict` (the ensemble's input).

    Every batch carries the question fields and each question's route (``expert``,
    ``route_scores``), so the ensemble can send it to its top-1 expert or mix the experts.

    Args:
        eval_dir: output directory of `split_dataset.py` for the evaluation set.
        processor: processor id or directory; the experts must share it.
        experts: only the questions routed to these experts; None keeps every question.
        batch_size: questions per batch.
        num_workers: DataLoader worker processes.
        max_length: maximum tokens per sample; a question that does not fit raises, because a
            skipped question would change the score.
        system_message: system turn for records that have none (use the training value).
        dynamic_tiles: InternVL dynamic resolution; off by default (one tile per image).
        max_tiles: most tiles per image with `dynamic_tiles`.
        source: inputs to build `eval_dir` in `prepare_data` when it has no manifest.
        preset: model preset whose processor `prepare_data` builds at `processor` when missing,
            from the training text of `train_dir` or `train_source`.
        train_dir: the training split, read only to build the preset processor.
        train_source: the training inputs, read only to build the preset processor.
        order: ``"expert"`` (default) reads the questions expert by expert, so that a routed
            ensemble answers most batches with one expert in one `generate` call; ``"input"``
            keeps the source order. Scores and predictions do not depend on it.
    """

    def __init__(
        self,
        eval_dir: str,
        processor: str,
        experts: list[int] | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        max_length: int = 8192,
        system_message: str | None = None,
        dynamic_tiles: bool = False,
        max_tiles: int = 12,
        source: SplitSource | None = None,
        preset: str | None = None,
        train_dir: str | None = None,
        train_source: SplitSource | None = None,
        order: str = "expert",
    ) -> None:
        super().__init__()
        problems = []
        if order not in EVAL_ORDERS:
            problems.append(f"order must be one of {EVAL_ORDERS}, got {order!r}")
        if batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {num_workers}")
        if max_length < 1:
            problems.append(f"max_length must be >= 1, got {max_length}")
        if preset is not None and train_dir is None and train_source is None:
            problems.append(f"preset={preset!r} needs train_dir or train_source to build its processor from")
        if problems:
            raise ValueError("Invalid EvalDataModule arguments:\n  " + "\n  ".join(problems))
        self.save_hyperparameters()
        self.eval_dir = Path(eval_dir)
        self.processor_path = processor
        self.experts = experts
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_length = max_length
        self.system_message = system_message
        self.dynamic_tiles = dynamic_tiles
        self.max_tiles = max_tiles
        self.source = source
        self.preset = preset
        self.train_dir = train_dir
        self.train_source = train_source
        self.order = order
        self.processor: Any = None
        self.dataset: EvalShardDataset | None = None

    def prepare_data(self) -> None:
        """Build the missing evaluation split and preset processor. One process per node; sets no state."""
        ensure_split(self.eval_dir, self.source)
        if self.preset is not None:
            ensure_small_processor(self.processor_path, self.preset, self.train_dir or "", self.train_source)

    def setup(self, stage: str | None = None) -> None:
        """Load the processor and index the shards. Runs on every rank; reads files only."""
        if self.processor is None:
            self.processor = load_processor(self.processor_path)
        if self.dataset is None:
            encoder = ConversationEncoder(
                self.processor,
                max_length=self.max_length,
                system_message=self.system_message,
                dynamic_tiles=self.dynamic_tiles,
                max_tiles=self.max_tiles,
            )
            n_experts = load_manifest(self.eval_dir)["n_experts"]
            self.dataset = EvalShardDataset(
                self.eval_dir, EvalSampleEncoder(encoder, n_experts), self.experts, self.order
            )
            rank_zero_info(
                f"Evaluation data: {len(self.dataset)} questions from {self.eval_dir}, experts "
                f"{'all' if self.experts is None else self.experts} of {n_experts}"
            )

    def _dataloader(self) -> DataLoader:
        assert self.dataset is not None, "call setup() first"
        return self.dataset.dataloader(
            self.batch_size, self.num_workers, self.processor.tokenizer.pad_token_id
        )

    def val_dataloader(self) -> DataLoader:
        return self._dataloader()

    def test_dataloader(self) -> DataLoader:
        return self._dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self._dataloader()
