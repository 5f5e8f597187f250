"""LightningCLI entry point: `python cli.py fit|validate|test|predict --config configs/....yaml`.

On top of the stock LightningCLI this adds:

- TensorBoard as the default logger (`runs/<name>/<version>`), and the config saved beside the logs.
- A `ModelCheckpoint` that is always present (`--checkpoint.*`), saving `last.ckpt` by default.
- `--ckpt_path last` resolved to the run's `last.ckpt` (a file, or a directory for sharded FSDP
  checkpoints). When there is none yet, the error names the directory it searched.
- Compute matching (`--matching.*`): given the dense run's steps S, its global batch B and the shard
  manifest, an expert's `trainer.max_steps` and `trainer.accumulate_grad_batches` are computed, printed
  and logged as hyperparameters (see `lightning_modules/compute_matching.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_modules.compute_matching import (
    ExpertBudget,
    accumulate_grad_batches,
    budgets_from_manifest,
)

DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "default"},
}


@dataclass
class ComputeMatching:
    """Compute-matched budget of an expert run; leave `manifest` unset to train with the trainer's own steps.

    Args:
        manifest: shard manifest (or its split directory) whose `experts[k].samples` give the shares p_k.
        dense_steps: S, the optimiser steps of the dense baseline.
        dense_global_batch: B, the dense baseline's samples per optimiser step over all devices.
    """

    manifest: str | None = None
    dense_steps: int | None = None
    dense_global_batch: int | None = None


class ExpertCLI(LightningCLI):
    """LightningCLI with checkpointing, `--ckpt_path last` resolution and compute matching."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_class_arguments(ComputeMatching, "matching")

    def before_instantiate_classes(self) -> None:
        """Apply compute matching to the trainer options of `fit` before the trainer is built."""
        self.matched_budget = None
        if self.subcommand in (None, "fit"):
            config = self.config[self.subcommand] if self.subcommand else self.config
            self.matched_budget = apply_compute_matching(config)

    def _parse_ckpt_path(self) -> None:
        """Apply a `--ckpt_path` file's saved hyperparameters as LightningCLI does, and warn about each
        model option they replace.

        LightningCLI rebuilds the model from the hyperparameters saved in the checkpoint, so a model option
        from a config file or the command line that differs from the saved value is dropped. Without this
        warning a flag such as `--model.init_args.predictions_dir` would be ignored silently.
        NOTE: this overrides a private LightningCLI method (lightning 2.6); recheck it on upgrades.
        """
        subcommand = self.config.get("subcommand")
        before = _model_init_args(self.config, subcommand)
        super()._parse_ckpt_path()
        after = _model_init_args(self.config, subcommand)
        replaced = [
            f"{key}: {before[key]!r} -> {after[key]!r}"
            for key in sorted(before.keys() & after.keys())
            if before[key] != after[key]
        ]
        if replaced:
            rank_zero_warn(
                "The hyperparameters saved in --ckpt_path replace these model options from the config or command "
                f"line: {'; '.join(replaced)}. HINT: this is how LightningCLI rebuilds the checkpoint's model; to "
                "change such an option, export the expert (lightning_modules/export.py) and load it by path."
            )

    def before_fit(self) -> None:
        self._resolve_last_checkpoint("fit")
        if self.matched_budget is not None:
            budget, accumulate = self.matched_budget
            for logger in self.trainer.loggers:
                logger.log_hyperparams(
                    {
                        "matching/expert": budget.expert,
                        "matching/share": budget.share,
                        "matching/max_steps": budget.max_steps,
                        "matching/global_batch": budget.global_batch,
                        "matching/accumulate_grad_batches": accumulate,
                    }
                )

    def before_validate(self) -> None:
        self._resolve_last_checkpoint("validate")

    def before_test(self) -> None:
        self._resolve_last_checkpoint("test")

    def before_predict(self) -> None:
        self._resolve_last_checkpoint("predict")

    def _resolve_last_checkpoint(self, subcommand: str) -> None:
        """Replace `ckpt_path: last` by the run's newest `last*.ckpt`, or raise when there is none."""
        if self.config_init[subcommand].get("ckpt_path") != "last":
            return
        directory = checkpoint_dir(self.trainer)
        path = find_last_checkpoint(directory)
        rank_zero_info(f"Resuming from {path}")
        self.config_init[subcommand]["ckpt_path"] = str(path)


def _model_init_args(config: Any, subcommand: str | None) -> dict[str, Any]:
    """Return the model's `init_args` in a parsed config as a plain dict (empty when there are none)."""
    if not subcommand or subcommand not in config:
        return {}
    init_args = config[subcommand].get("model", {}).get("init_args")
    return dict(vars(init_args)) if init_args is not None else {}


def checkpoint_dir(trainer: Any) -> Path:
    """Return the directory ModelCheckpoint writes to, resolved the way Lightning does.

    `checkpoint.dirpath` when set; otherwise `<logger log_dir>/checkpoints` (TensorBoard:
    `save_dir/name/version`), or `<default_root_dir>/checkpoints` without a logger.
    """
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath is not None:
        return Path(callback.dirpath)
    if trainer.loggers:
        logger = trainer.loggers[0]
        log_dir = getattr(logger, "log_dir", None)
        if log_dir is not None:
            return Path(log_dir) / "checkpoints"
    return Path(trainer.default_root_dir) / "checkpoints"


def find_last_checkpoint(directory: Path) -> Path:
    """Return the newest `last*.ckpt` (file or sharded directory) in `directory`.

    Raises:
        FileNotFoundError: there is none, with the directory that was searched and the fix.
    """
    candidates = sorted(directory.glob("last*.ckpt"), key=lambda path: path.stat().st_mtime) if directory.is_dir() else []
    if not candidates:
        raise FileNotFoundError(
            f"--ckpt_path last: no last checkpoint in {directory}. HINT: this run has not saved one yet, so "
            "drop --ckpt_path to start from scratch; to resume another run, set trainer.logger's name and "
            "version (or checkpoint.dirpath) to that run's, or pass its checkpoint path."
        )
    return candidates[-1]


def _world_size(trainer_config: Any) -> int:
    devices = trainer_config.get("devices")
    num_nodes = trainer_config.get("num_nodes") or 1
    if isinstance(devices, int) and devices > 0:
        return devices * num_nodes
    if isinstance(devices, (list, tuple)):
        return len(devices) * num_nodes
    if isinstance(devices, str) and devices.isdigit():
        return int(devices) * num_nodes
    raise ValueError(
        f"Compute matching needs a fixed device count, but trainer.devices is {devices!r}. "
        "HINT: set trainer.devices to the number of devices, for example 2."
    )


def apply_compute_matching(config: Any) -> tuple[ExpertBudget, int] | None:
    """Set `trainer.max_steps` and `trainer.accumulate_grad_batches` of an expert run from `matching.*`.

    The expert is `data.init_args.expert` and the per-device batch `data.init_args.batch_size`. Returns
    the budget and the accumulation steps, or None when `matching.manifest` is unset.

    Raises:
        ValueError: incomplete matching options, a dense-baseline data config (expert None), an expert id
            that disagrees with `model.init_args.expert_id`, or batch sizes that cannot reach B / K.
    """
    matching = config.get("matching")
    if matching is None or matching.get("manifest") is None:
        return None
    missing = [name for name in ("dense_steps", "dense_global_batch") if matching.get(name) is None]
    if missing:
        raise ValueError(
            f"matching.manifest is set but {', '.join('matching.' + name for name in missing)} is not. "
            "HINT: give the dense run's max_steps and global batch."
        )
    data_args = config.get("data.init_args") or {}
    expert = data_args.get("expert")
    if expert is None:
        raise ValueError(
            "Compute matching applies to an expert run, but data.init_args.expert is None (the dense "
            "baseline). HINT: set data.init_args.expert, or unset matching.manifest for the dense run."
        )
    model_expert = (config.get("model.init_args") or {}).get("expert_id")
    if model_expert is not None and model_expert != expert:
        raise ValueError(
            f"data.init_args.expert is {expert} but model.init_args.expert_id is {model_expert}. "
            "HINT: set both to the expert this run trains."
        )
    budgets = budgets_from_manifest(matching.manifest, matching.dense_steps, matching.dense_global_batch)
    if expert >= len(budgets):
        raise ValueError(
            f"data.init_args.expert is {expert} but {matching.manifest} lists {len(budgets)} experts "
            f"(0..{len(budgets) - 1})."
        )
    budget = budgets[expert]
    per_device_batch = int(data_args.get("batch_size") or 1)
    accumulate = accumulate_grad_batches(budget.global_batch, per_device_batch, _world_size(config.trainer))
    config.trainer.max_steps = budget.max_steps
    config.trainer.accumulate_grad_batches = accumulate
    rank_zero_info(
        f"Compute matching: expert {expert} has {budget.samples} samples (p_k = {budget.share:.4f} of "
        f"{len(budgets)} experts), so it trains {budget.max_steps} steps at global batch {budget.global_batch} "
        f"({per_device_batch} per device x accumulate {accumulate}); the dense run has "
        f"{matching.dense_steps} steps at {matching.dense_global_batch}."
    )
    return budget, accumulate


def main(args: Any = None, run: bool = True) -> ExpertCLI:
    """Parse `args` (default: `sys.argv`), build the model, data and trainer, and run the subcommand.

    With `run=False` there is no subcommand: the classes are built and returned without running.
    """
    return ExpertCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"logger": DEFAULT_LOGGER},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
