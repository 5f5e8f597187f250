"""Export a trained expert to a `save_pretrained` directory with its processor.

Input is either a Lightning checkpoint file (`*.ckpt`) or a sharded checkpoint directory written by
`ModelParallelStrategy` (`*.distcp` files plus `meta.pt`). The checkpoint's hyperparameters rebuild the
`InternVLExpert`, so the base checkpoint or preset and the processor it names must be readable. The
output loads with `AutoModelForImageTextToText.from_pretrained` and `AutoProcessor.from_pretrained`.

Run as a script from the repository root:

    python lightning_modules/export.py runs/expert-0/main/checkpoints/last.ckpt runs/expert-0/export
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from lightning_modules.internvl_module import InternVLExpert

log = logging.getLogger(__name__)

SHARDED_METADATA = "meta.pt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _read_metadata(checkpoint: Path) -> dict[str, Any]:
    """Return the checkpoint dict without tensors for a sharded directory, or the whole dict for a file."""
    if checkpoint.is_dir():
        metadata = checkpoint / SHARDED_METADATA
        if not metadata.is_file():
            raise FileNotFoundError(
                f"{checkpoint} is a directory without {SHARDED_METADATA}, so it is not a sharded Lightning "
                "checkpoint. HINT: pass a .ckpt file or the last.ckpt directory that ModelParallelStrategy wrote."
            )
        return torch.load(metadata, map_location="cpu", weights_only=False)
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


def _expert_from_metadata(checkpoint: Path, metadata: dict[str, Any]) -> InternVLExpert:
    hparams = dict(metadata.get("hyper_parameters") or {})
    if "model_name_or_path" not in hparams or "preset" not in hparams:
        raise ValueError(
            f"{checkpoint} has no InternVLExpert hyperparameters (found keys {sorted(hparams)}). HINT: export "
            "checkpoints written while training lightning_modules.internvl_module.InternVLExpert."
        )
    hparams.pop("_instantiator", None)
    hparams.pop("_class_path", None)
    hparams["gradient_checkpointing"] = False  # a training-time setting, not part of the exported model
    return InternVLExpert(**hparams)


def _load_sharded_state_dict(checkpoint: Path, expert: InternVLExpert) -> None:
    """Load the model tensors of a sharded checkpoint into `expert`, on one process, skipping optimiser states."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    state = {"state_dict": expert.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint, planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    expected = set(expert.state_dict())
    loaded = set(state["state_dict"])
    if loaded != expected:
        raise ValueError(f"{checkpoint} does not contain every model tensor; missing {sorted(expected - loaded)[:10]}.")
    expert.load_state_dict(state["state_dict"], strict=True)


def load_trained_expert(checkpoint: str | Path) -> InternVLExpert:
    """Rebuild the `InternVLExpert` of a Lightning or sharded FSDP checkpoint, with the trained weights.

    Raises:
        FileNotFoundError: the checkpoint does not exist or is not a Lightning checkpoint.
        ValueError: the checkpoint was not written by `InternVLExpert`, or its tensors do not match.
    """
    checkpoint = Path(checkpoint).expanduser()
    if not checkpoint.exists():
        raise FileNotFoundError(
            f"Checkpoint {checkpoint} does not exist. HINT: checkpoints are under <log_dir>/checkpoints, "
            "for example runs/<name>/<version>/checkpoints/last.ckpt."
        )
    metadata = _read_metadata(checkpoint)
    expert = _expert_from_metadata(checkpoint, metadata)
    expert.model = expert.build_model(load_weights=False)
    if checkpoint.is_dir():
        _load_sharded_state_dict(checkpoint, expert)
    else:
        expert.load_state_dict(metadata["state_dict"], strict=True)
    log.info("Loaded %s (global step %s)", checkpoint, metadata.get("global_step"))
    return expert


def export_expert(checkpoint: str | Path, output_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the trained model and its processor from `checkpoint` to `output_dir` with `save_pretrained`.

    Args:
        checkpoint: a `.ckpt` file or a sharded checkpoint directory of `InternVLExpert`.
        output_dir: directory to write; created if missing.
        dtype: `float32` keeps the training weights exactly; `bfloat16` halves the size.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}.")
    expert = load_trained_expert(checkpoint)
    model = expert.model.to(DTYPES[dtype])
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    expert.load_processor().save_pretrained(output_dir)
    log.info("Exported %s to %s (%s)", checkpoint, output_dir, dtype)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="Lightning .ckpt file or sharded checkpoint directory")
    parser.add_argument("output_dir", type=Path, help="directory for the model and processor")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    args = parser.parse_args(argv)
    output_dir = export_expert(args.checkpoint, args.output_dir, args.dtype)
    print(f"Exported {args.checkpoint} to {output_dir}")


if __name__ == "__main__":
    main()
