"""Compute matching between the dense baseline and the experts.

A dense model trains S optimiser steps at global batch B on all data. Expert k, which owns the share
p_k = n_k / sum_j n_j of the training samples, trains round(p_k * K * S) steps at global batch B / K.
Each expert then draws about p_k * S * B samples, its share of the dense run's samples. The K experts
together therefore spend the dense run's compute, assuming equal model sizes and the same average
tokens per sample in every cluster.

Run as a script from the repository root to print the table for a split:

    python lightning_modules/compute_matching.py runs/split/train --dense-steps 10000 --dense-global-batch 4
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ExpertBudget:
    """The compute-matched training budget of one expert."""

    expert: int
    samples: int
    """Training samples written for this expert (`experts[k].samples` of the manifest)."""
    share: float
    """p_k: this expert's share of all training samples."""
    max_steps: int
    """Optimiser steps: round(p_k * K * S), at least 1."""
    global_batch: int
    """Samples per optimiser step over all devices: B / K."""

    @property
    def samples_seen(self) -> int:
        """Samples drawn in the whole run: max_steps * global_batch."""
        return self.max_steps * self.global_batch


def expert_budgets(
    expert_samples: Sequence[int], dense_steps: int, dense_global_batch: int
) -> list[ExpertBudget]:
    """Return the budget of every expert.

    Args:
        expert_samples: n_k, training samples per expert, indexed by expert (K entries).
        dense_steps: S, the dense baseline's optimiser steps.
        dense_global_batch: B, the dense baseline's samples per optimiser step; must be divisible by K.

    Raises:
        ValueError: listing every invalid argument.
    """
    n_experts = len(expert_samples)
    problems = []
    if n_experts == 0:
        problems.append("the manifest lists no experts")
    if any(samples < 0 for samples in expert_samples):
        problems.append(f"sample counts must be >= 0, got {list(expert_samples)}")
    if sum(expert_samples) <= 0:
        problems.append("the experts have no training samples in total")
    if dense_steps < 1:
        problems.append(f"dense_steps must be >= 1, got {dense_steps}")
    if dense_global_batch < 1:
        problems.append(f"dense_global_batch must be >= 1, got {dense_global_batch}")
    elif n_experts and dense_global_batch % n_experts != 0:
        problems.append(
            f"dense_global_batch {dense_global_batch} is not divisible by the {n_experts} experts, so the "
            f"experts' batch B/K is not a whole number (HINT: use a multiple of {n_experts})"
        )
    if problems:
        raise ValueError("Cannot compute matched budgets: " + "; ".join(problems) + ".")

    total = sum(expert_samples)
    budgets = []
    for expert, samples in enumerate(expert_samples):
        share = samples / total
        budgets.append(
            ExpertBudget(
                expert=expert,
                samples=int(samples),
                share=share,
                max_steps=max(1, round(share * n_experts * dense_steps)),
                global_batch=dense_global_batch // n_experts,
            )
        )
    return budgets


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read a shard manifest, given as `manifest.json` or the split directory that contains it."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"Shard manifest {path} not found. HINT: pass the output directory of clustering/split_dataset.py "
            "or its manifest.json; an unfinished split has none."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def budgets_from_manifest(path: str | Path, dense_steps: int, dense_global_batch: int) -> list[ExpertBudget]:
    """Return every expert's budget from the `experts[k].samples` of a shard manifest."""
    manifest = read_manifest(path)
    samples = [int(row["samples"]) for row in manifest["experts"]]
    return expert_budgets(samples, dense_steps, dense_global_batch)


def accumulate_grad_batches(global_batch: int, per_device_batch: int, world_size: int) -> int:
    """Return the gradient-accumulation steps that reach `global_batch` samples per optimiser step.

    Raises:
        ValueError: `global_batch` is not a multiple of per_device_batch * world_size.
    """
    per_step = per_device_batch * world_size
    if per_step < 1 or global_batch % per_step != 0:
        raise ValueError(
            f"A global batch of {global_batch} cannot be made from {per_device_batch} samples per device on "
            f"{world_size} devices ({per_step} per forward pass). HINT: choose a batch size and device count "
            f"whose product divides {global_batch}."
        )
    return global_batch // per_step


def format_table(budgets: Sequence[ExpertBudget], dense_steps: int, dense_global_batch: int) -> str:
    """Return the budgets as a plain-text table with a totals line."""
    lines = [
        f"{'expert':>6} {'samples':>10} {'share':>8} {'max_steps':>10} {'global_batch':>12} {'samples_seen':>13}"
    ]
    for budget in budgets:
        lines.append(
            f"{budget.expert:>6} {budget.samples:>10} {budget.share:>8.4f} {budget.max_steps:>10} "
            f"{budget.global_batch:>12} {budget.samples_seen:>13}"
        )
    total_seen = sum(budget.samples_seen for budget in budgets)
    lines.append(f"experts together: {total_seen} samples; dense: {dense_steps * dense_global_batch} samples")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[ExpertBudget]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "manifest", type=Path, help="split directory of split_dataset.py, or its manifest.json"
    )
    parser.add_argument("--dense-steps", type=int, required=True, help="S: optimiser steps of the dense run")
    parser.add_argument(
        "--dense-global-batch", type=int, required=True, help="B: samples per optimiser step of the dense run"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    budgets = budgets_from_manifest(args.manifest, args.dense_steps, args.dense_global_batch)
    if args.json:
        print(json.dumps([asdict(budget) for budget in budgets], indent=2))
    else:
        print(format_table(budgets, args.dense_steps, args.dense_global_batch))
    return budgets


if __name__ == "__main__":
    main(sys.argv[1:])
