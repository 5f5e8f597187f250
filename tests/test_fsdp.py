"""FSDP2 through Lightning's ModelParallelStrategy on 2 CPU processes (gloo): train, save sharded, resume."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from lightning_modules.export import export_expert

REPO_ROOT = Path(__file__).resolve().parent.parent

# Lightning launches the second rank by re-running this script with LOCAL_RANK set, so the training
# code has to live in a file of its own.
TRAIN_SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader, Dataset

    from lightning_modules.internvl_module import InternVLExpert

    torch.set_num_threads(1)
    work_dir, run, processor_dir = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    stop_at = int(sys.argv[4])
    batch = torch.load(work_dir / "batch.pt", weights_only=False)


    class RepeatedBatch(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, index):
            return batch


    def save_optimizer_state(trainer, when):
        # This rank's shard of the AdamW moments, and the scheduler position.
        state = trainer.optimizers[0].state_dict()["state"]
        local = {
            index: {key: value.to_local() if isinstance(value, DTensor) else value for key, value in entry.items()}
            for index, entry in state.items()
        }
        scheduler_step = trainer.lr_scheduler_configs[0].scheduler.last_epoch
        path = work_dir / f"{run}-{when}-rank{trainer.global_rank}.pt"
        torch.save({"state": local, "scheduler_step": scheduler_step}, path)


    class Record(Callback):
        def __init__(self):
            self.losses = []
            self.grad_norms = []
            self.start_step = None

        def on_train_start(self, trainer, pl_module):
            self.start_step = trainer.global_step
            save_optimizer_state(trainer, "start")

        def on_train_end(self, trainer, pl_module):
            save_optimizer_state(trainer, "end")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))
            self.grad_norms.append(float(trainer.callback_metrics["train/grad_norm"]))
            if trainer.global_step == stop_at:
                trainer.should_stop = True  # simulate a run that is interrupted here


    seed_everything(0)
    expert = InternVLExpert(
        preset="internvl-tiny",
        processor_name_or_path=processor_dir,
        learning_rate=3e-3,
        warmup_ratio=0.25,
        max_new_tokens=3,
    )
    record = Record()
    checkpoint_dir = work_dir / run / "checkpoints"
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=8,
        gradient_clip_val=1.0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=work_dir / run,
        callbacks=[ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, every_n_train_steps=4), record],
    )
    resume_from = sys.argv[5] if len(sys.argv) > 5 else None
    trainer.fit(expert, DataLoader(RepeatedBatch(), batch_size=None), ckpt_path=resume_from)

    weight = expert.model.model.language_model.layers[0].mlp.up_proj.weight
    answers = expert.generate_answers(batch)
    if trainer.is_global_zero:
        result = {
            "start_step": record.start_step,
            "losses": record.losses,
            "grad_norms": record.grad_norms,
            "global_step": trainer.global_step,
            "is_dtensor": isinstance(weight, DTensor),
            "local_rows": weight.to_local().shape[0],
            "full_rows": weight.shape[0],
            "answers": answers,
        }
        (work_dir / f"{run}.json").write_text(json.dumps(result))
    """
)


DIST_ENV = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_training(work_dir: Path, run: str, processor_dir: Path, stop_at: int, resume_from: Path | None = None) -> dict:
    script = work_dir / "train_fsdp.py"
    script.write_text(TRAIN_SCRIPT)
    command = [sys.executable, str(script), str(work_dir), run, str(processor_dir), str(stop_at)]
    if resume_from is not None:
        command.append(str(resume_from))
    # Earlier distributed tests in this pytest process leave MASTER_PORT, RANK and the like in
    # os.environ; inherited, they would point both ranks at a stale rendezvous.
    env = {key: value for key, value in os.environ.items() if key not in DIST_ENV and not key.startswith("PL_")}
    env.update(PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    completed = subprocess.run(command, env=env, cwd=work_dir, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads((work_dir / f"{run}.json").read_text())


def train_single_process(processor_dir: Path, batch: dict, tmp_path: Path) -> dict:
    """Train the FSDP script's model and options for its 8 steps in this process, on one device."""
    from lightning.pytorch import Callback, Trainer, seed_everything

    from lightning_modules.internvl_module import InternVLExpert

    class Record(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.grad_norms: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))
            self.grad_norms.append(float(trainer.callback_metrics["train/grad_norm"]))

    seed_everything(0)
    expert = InternVLExpert(
        preset="internvl-tiny",
        processor_name_or_path=str(processor_dir),
        learning_rate=3e-3,
        warmup_ratio=0.25,
        max_new_tokens=3,
    )
    record = Record()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=8,
        gradient_clip_val=1.0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path / "single",
        callbacks=[record],
    )
    trainer.fit(expert, torch.utils.data.DataLoader([batch] * 8, batch_size=None))
    return {"losses": record.losses, "grad_norms": record.grad_norms}


@pytest.mark.slow
def test_fsdp2_train_save_resume(tiny_internvl_processor_dir, tiny_internvl_batch, tmp_path):
    torch.save(tiny_internvl_batch, tmp_path / "batch.pt")

    # An interrupted run stops after step 4, where ModelCheckpoint saved a sharded checkpoint.
    interrupted = run_training(tmp_path, "interrupted", tiny_internvl_processor_dir, stop_at=4)
    assert interrupted["global_step"] == 4
    assert interrupted["is_dtensor"]
    assert interrupted["full_rows"] == 2 * interrupted["local_rows"]  # each rank stores half of each weight
    assert interrupted["losses"][-1] < interrupted["losses"][0]
    assert len(interrupted["answers"]) == 8

    # Every rank sees the same batch, so the sharded run must match one process on one device: same
    # losses, and the same gradient norm once the DTensor shards are reduced.
    single = train_single_process(tiny_internvl_processor_dir, tiny_internvl_batch, tmp_path)
    assert interrupted["losses"] == pytest.approx(single["losses"][:4], rel=1e-4)
    assert interrupted["grad_norms"] == pytest.approx(single["grad_norms"][:4], rel=1e-4)

    last = tmp_path / "interrupted" / "checkpoints" / "last.ckpt"
    assert last.is_dir()
    assert {path.name for path in last.iterdir()} >= {"__0_0.distcp", "__1_0.distcp", "meta.pt"}

    # The sharded checkpoint exports to a transformers directory that decodes what the sharded model decoded.
    export_dir = export_expert(last, tmp_path / "export")
    model = AutoModelForImageTextToText.from_pretrained(export_dir).eval()
    tokenizer = AutoProcessor.from_pretrained(export_dir).tokenizer
    with torch.no_grad():
        tokens = model.generate(
            input_ids=tiny_internvl_batch["prompt_input_ids"],
            attention_mask=tiny_internvl_batch["prompt_attention_mask"],
            pixel_values=tiny_internvl_batch["pixel_values"],
            max_new_tokens=3,
            do_sample=False,
        )[:, tiny_internvl_batch["prompt_input_ids"].shape[1] :]
    answers = [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
    assert answers == interrupted["answers"]

    # Resuming continues at step 4 with each rank's shard of the AdamW moments and the scheduler
    # position exactly as the interrupted run left them.
    resumed = run_training(tmp_path, "resumed", tiny_internvl_processor_dir, stop_at=-1, resume_from=last)
    assert resumed["start_step"] == 4
    assert resumed["global_step"] == 8
    assert resumed["losses"] == pytest.approx(single["losses"][4:], rel=1e-4)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"interrupted-end-rank{rank}.pt", weights_only=False)
        restored = torch.load(tmp_path / f"resumed-start-rank{rank}.pt", weights_only=False)
        assert restored["scheduler_step"] == saved["scheduler_step"] == 4
        assert set(restored["state"]) == set(saved["state"])
        assert len(saved["state"]) > 0
        for index, entry in saved["state"].items():
            for key in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(restored["state"][index][key], entry[key], msg=f"rank {rank} {index} {key}")
