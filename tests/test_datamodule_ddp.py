"""Two-process DDP run of the training DataModule: both ranks must step through the same batches count."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from clustering import split_dataset
from datamodules.synthetic import make_conversation, write_synthetic_dataset
from datamodules.training import ExpertDataModule


class BatchCounter(L.LightningModule):
    """Counts training batches per rank; a rank that ran out of batches early would hang DDP."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.batches = 0
        self.counts: list[int] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.batches += 1
        return self.layer(batch["input_ids"][:, :1].float()).sum()

    def on_train_end(self) -> None:
        self.counts = self.all_gather(torch.tensor(self.batches)).tolist()
        if self.global_rank == 0:
            Path(self.trainer.default_root_dir, "counts.txt").write_text(" ".join(map(str, self.counts)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.slow
def test_ddp_ranks_get_equal_batch_counts(tmp_path: Path) -> None:
    import numpy as np

    from lightning_modules.presets import build_small_processor

    rng = np.random.default_rng(0)
    build_small_processor(
        [t["value"] for _ in range(50) for t in make_conversation(rng, 3)], tmp_path / "processor"
    )
    data = write_synthetic_dataset(tmp_path / "data", n_records=13, n_experts=1)
    split_dataset.main(data.split_arguments(tmp_path / "split", "--shard-max-count", "3"))
    module = ExpertDataModule(
        train_dir=str(tmp_path / "split"),
        processor=str(tmp_path / "processor"),
        expert=0,
        batch_size=2,
        num_workers=1,
        max_length=256,
        shuffle_buffer=4,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )

    trainer.fit(BatchCounter(), datamodule=module)

    # 13 samples over 2 ranks of batch 2: ceil(13 / 4) = 4 batches on each rank.
    assert (tmp_path / "counts.txt").read_text() == "4 4"
