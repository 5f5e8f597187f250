"""cli.py: fit from a YAML config, TensorBoard logs, `--ckpt_path last` resume, compute matching."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import FSDPStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import cli
from clustering import split_dataset
from datamodules.synthetic import write_synthetic_dataset
from lightning_modules.compute_matching import accumulate_grad_batches, budgets_from_manifest, expert_budgets

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny_cpu.yaml")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def synthetic_split(tmp_path_factory) -> Path:
    """A 2-expert split of 20 synthetic records (10 per expert), as split_dataset.py writes it."""
    root = tmp_path_factory.mktemp("cli_data")
    data = write_synthetic_dataset(root / "data", n_records=20, n_experts=2, max_turns=1)
    split_dataset.main(data.split_arguments(root / "split", "--shard-max-count", "4"))
    return root / "split"


def tiny_args(split: Path, processor_dir: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "--config", TINY_CONFIG,
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.log_every_n_steps", "1",
        "--data.init_args.train_dir", str(split),
        "--data.init_args.processor", str(processor_dir),
        "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "2",
        "--data.init_args.shuffle_buffer", "4",
        "--model.init_args.processor_name_or_path", str(processor_dir),
        "--checkpoint.every_n_train_steps", "2",
        *extra,
    ]  # fmt: skip


def scalar_steps(log_dir: Path, tag: str) -> list[int]:
    steps = []
    for events in sorted(log_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            steps.extend(event.step for event in accumulator.Scalars(tag))
    return sorted(steps)


def test_fit_logs_and_resumes(synthetic_split, tiny_internvl_processor_dir, tmp_path):
    runs = tmp_path / "runs"
    cli.main(["fit", *tiny_args(synthetic_split, tiny_internvl_processor_dir, runs, "--trainer.max_steps", "4")])

    log_dir = runs / "tiny-cpu" / "main"
    last = log_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4
    assert (log_dir / "config.yaml").is_file()
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert hparams["learning_rate"] == pytest.approx(2e-3)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_sec", "train/tokens_per_sec"):
        assert scalar_steps(log_dir, tag), f"{tag} was not logged"
    assert scalar_steps(log_dir, "train/loss") == [0, 1, 2, 3]

    cli.main(
        [
            "fit",
            *tiny_args(synthetic_split, tiny_internvl_processor_dir, runs, "--trainer.max_steps", "6"),
            "--ckpt_path", "last",
        ]
    )
    assert torch.load(last, weights_only=False)["global_step"] == 6
    # The resumed run logs steps 4 and 5 into the same directory: the logger's step continues.
    assert scalar_steps(log_dir, "train/loss") == [0, 1, 2, 3, 4, 5]

    # LightningCLI rebuilds the model from the checkpoint's hyperparameters; an option they replace is
    # reported, not dropped silently.
    args = tiny_args(synthetic_split, tiny_internvl_processor_dir, runs, "--model.init_args.learning_rate", "0.5")
    with pytest.warns(UserWarning, match=r"learning_rate: 0\.5 -> 0\.002"):
        validated = cli.main(["validate", *args, "--ckpt_path", str(last)])
    assert validated.model.hparams.learning_rate == pytest.approx(2e-3)


def test_ckpt_path_last_without_checkpoint(synthetic_split, tiny_internvl_processor_dir, tmp_path):
    runs = tmp_path / "runs"
    args = tiny_args(synthetic_split, tiny_internvl_processor_dir, runs, "--trainer.max_steps", "2")
    with pytest.raises(FileNotFoundError, match="no last checkpoint in .*tiny-cpu/main/checkpoints"):
        cli.main(["fit", *args, "--ckpt_path", "last"])


def test_compute_matching_sets_steps_and_accumulation(synthetic_split, tiny_internvl_processor_dir, tmp_path):
    manifest = json.loads((synthetic_split / "manifest.json").read_text())
    samples = [row["samples"] for row in manifest["experts"]]
    share = samples[1] / sum(samples)
    args = tiny_args(
        synthetic_split,
        tiny_internvl_processor_dir,
        tmp_path / "runs",
        "--data.init_args.expert", "1",
        "--model.init_args.expert_id", "1",
        "--data.init_args.batch_size", "1",
        "--matching.manifest", str(synthetic_split),
        "--matching.dense_steps", "30",
        "--matching.dense_global_batch", "4",
    )  # fmt: skip
    built = cli.main(args, run=False)
    assert built.trainer.max_steps == round(share * 2 * 30)
    assert built.trainer.accumulate_grad_batches == 2  # global batch 4 / 2 experts, 1 sample on 1 device
    budget, accumulate = built.matched_budget
    assert budget.expert == 1
    assert budget.share == pytest.approx(share)


def test_compute_matching_rejects_dense_data(synthetic_split, tiny_internvl_processor_dir, tmp_path):
    args = tiny_args(
        synthetic_split,
        tiny_internvl_processor_dir,
        tmp_path / "runs",
        "--data.init_args.expert", "null",
        "--matching.manifest", str(synthetic_split),
        "--matching.dense_steps", "30",
        "--matching.dense_global_batch", "4",
    )  # fmt: skip
    with pytest.raises(ValueError, match="data.init_args.expert is None"):
        cli.main(args, run=False)


def test_expert_budgets_match_dense_compute():
    budgets = expert_budgets([30, 10], dense_steps=100, dense_global_batch=8)
    assert [budget.share for budget in budgets] == [0.75, 0.25]
    assert [budget.max_steps for budget in budgets] == [150, 50]
    assert [budget.global_batch for budget in budgets] == [4, 4]
    assert sum(budget.samples_seen for budget in budgets) == 100 * 8


def test_expert_budgets_reject_bad_input():
    with pytest.raises(ValueError, match="dense_global_batch 6 is not divisible by the 4 experts"):
        expert_budgets([1, 2, 3, 4], dense_steps=10, dense_global_batch=6)
    with pytest.raises(ValueError, match="dense_steps must be >= 1, got 0"):
        expert_budgets([1, 1], dense_steps=0, dense_global_batch=2)
    with pytest.raises(ValueError, match="cannot be made from 3 samples per device on 2 devices"):
        accumulate_grad_batches(global_batch=8, per_device_batch=3, world_size=2)


def test_budgets_from_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        budgets_from_manifest(tmp_path, dense_steps=10, dense_global_batch=2)


def test_gpu_configs_parse():
    for name in ("expert_internvl2_5_1b", "dense_internvl2_5_1b", "expert_internvl2_5_1b_fsdp1"):
        config = yaml.safe_load((REPO_ROOT / "configs" / f"{name}.yaml").read_text())
        assert config["trainer"]["devices"] == 2
        assert config["trainer"]["precision"] == "bf16-mixed"
        assert config["data"]["init_args"]["batch_size"] == 1
        assert config["data"]["init_args"]["max_length"] == 8192
        init = config["model"]["init_args"]
        assert (init["learning_rate"], init["weight_decay"], init["warmup_ratio"]) == (4e-5, 0.05, 0.03)

    # The FSDP1 variant's wrap policy resolves to the two layer classes.
    strategy = yaml.safe_load((REPO_ROOT / "configs" / "expert_internvl2_5_1b_fsdp1.yaml").read_text())
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    parsed = parser.parse_args(["--strategy", json.dumps(strategy["trainer"]["strategy"])])
    instance = parser.instantiate_classes(parsed).strategy
    wrapped = {cls.__name__ for cls in instance.kwargs["auto_wrap_policy"]._module_classes}
    assert wrapped == {"InternVLVisionLayer", "Qwen2DecoderLayer"}
