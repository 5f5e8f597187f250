"""`RoutingCallback`: score the combined top-1 ensemble while one expert trains.

Experts train independently, often at the same time on different machines, and exchange nothing
but prediction files in a shared experts directory::

    <experts_dir>/expert-<k>/predictions.jsonl   expert k's latest answers to the questions routed to it
    <experts_dir>/expert-<k>/status.json         {"expert", "global_step", "epoch", "n_predictions", "time"}

At each validation the expert in training answers the evaluation questions routed to it and
publishes them. The file is written under a temporary name and renamed, so readers never see a
partial file. The callback then reads the latest files of the other experts and scores the union,
which is what the top-1 ensemble would answer. Questions whose expert has published nothing yet have no answer: the score covers the
answered questions only, and ``coverage`` says which share of the evaluation set that is. Other
experts are read from their prediction files only: loading their checkpoints would put a second
model on the training device.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_modules.ensemble_routing import count_image_tiles, select_samples
from lightning_modules.internvl_module import score_records
from lightning_modules.metrics import build_metric
from lightning_modules.predictions import read_predictions, write_predictions
from lightning_modules.presets import image_seq_length_of

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
STATUS_FILE = "status.json"
_QUESTION_FIELDS = ("question_id", "question", "gt_answers", "benchmark")


def expert_dir(experts_dir: str | Path, expert: int) -> Path:
    """Return the directory where expert ``expert`` publishes its predictions."""
    return Path(experts_dir) / f"expert-{expert}"


def _write_json_atomic(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _manifest_total(eval_dir: str | Path) -> int | None:
    """Return the number of evaluation questions in a split's ``manifest.json``, or None without one."""
    path = Path(eval_dir) / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    return sum(int(row["samples"]) for row in manifest["experts"])


def _gather(objects: list[Any]) -> list[Any]:
    """Concatenate a list from every rank (the list itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return objects
    gathered: list[list[Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, objects)
    return [item for part in gathered for item in part]


class RoutingCallback(Callback):
    """Score the top-1 ensemble of all experts at every validation of one expert's training.

    The validation batches must be evaluation batches (``prompt_input_ids``, the question
    fields and the route ``expert``, see ``docs/architecture.md``). Rows routed to this expert
    are answered by the model in training: from ``outputs["answers"]`` when ``validation_step``
    returns them, otherwise with ``pl_module.generate_answers``. Rows routed to other experts are
    only counted; their answers come from the other experts' published files, which may also
    cover questions this validation set does not hold.

    Logged at each validation (``<m>`` is the benchmark's metric name, for example
    ``exact_match``; with several benchmarks ``<m>`` becomes ``<benchmark>/<metric name>``):

    - ``val/ensemble/<m>``: the combined score over answered questions;
    - ``val/ensemble/coverage``: answered questions / evaluation questions;
    - ``val/ensemble/expert_<j>/<m>`` and ``val/ensemble/expert_<j>/answered``: per expert.

    Args:
        experts_dir: the shared directory where every expert publishes its predictions.
        expert_id: this expert's id; None reads ``pl_module.hparams.expert_id``.
        eval_dir: the evaluation split (with ``manifest.json``) whose question count is the
            coverage denominator; None uses the datamodule's ``val_dir`` when it has one, and
            otherwise the questions seen in validation plus those in published files.
        publish: write this expert's answers to ``experts_dir``; off for a read-only observer.
    """

    def __init__(
        self,
        experts_dir: str,
        expert_id: int | None = None,
        eval_dir: str | None = None,
        publish: bool = True,
    ) -> None:
        super().__init__()
        if expert_id is not None and expert_id < 0:
            raise ValueError(f"expert_id must be >= 0, got {expert_id}.")
        self.experts_dir = Path(experts_dir)
        self.expert_id = expert_id
        self.eval_dir = eval_dir
        self.publish = publish
        self.last_summary: dict[str, float] = {}
        self._answers: list[dict[str, Any]] = []
        self._questions: list[dict[str, Any]] = []
        self._n_experts_seen = 0
        self._warned_batch_keys = False

    # -- hooks --------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve the expert id. Runs on every rank."""
        if self.expert_id is None:
            expert_id = getattr(pl_module, "hparams", {}).get("expert_id")
            if expert_id is None:
                raise ValueError(
                    f"RoutingCallback has no expert_id and {type(pl_module).__name__} has no hparams.expert_id. "
                    "HINT: pass expert_id to the callback."
                )
            self.expert_id = int(expert_id)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._answers = []
        self._questions = []

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Record every question of the batch and answer those routed to this expert.

        Runs on every rank. Under FSDP each rank must run the same number of forward passes, so a
        rank whose batch has no row for this expert still decodes one row and drops the answer.
        """
        if trainer.sanity_checking:
            return
        missing_keys = [key for key in ("prompt_input_ids", "expert", *_QUESTION_FIELDS) if key not in batch]
        if missing_keys:
            if not self._warned_batch_keys:
                rank_zero_warn(
                    f"RoutingCallback skips validation batches without {missing_keys}; the ensemble needs "
                    "evaluation batches with routes (EvalCollator)."
                )
                self._warned_batch_keys = True
            return
        routes = batch["expert"].tolist()
        route_scores = batch.get("route_scores")
        if route_scores is not None:
            self._n_experts_seen = max(self._n_experts_seen, route_scores.shape[1])
        self._n_experts_seen = max(self._n_experts_seen, max(routes, default=-1) + 1)

        batch_questions = []
        for i, route in enumerate(routes):
            question = {key: batch[key][i] for key in _QUESTION_FIELDS}
            question["question_id"] = str(question["question_id"])
            question["gt_answers"] = list(question["gt_answers"])
            question["expert"] = int(route)
            batch_questions.append(question)
        self._questions.extend(batch_questions)

        rows = [i for i, route in enumerate(routes) if route == self.expert_id]
        answers = self._answers_for(trainer, pl_module, outputs, batch, rows)
        for row, answer in zip(rows, answers, strict=True):
            self._answers.append({**batch_questions[row], "answer": answer})

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Publish this expert's answers, combine them with the others' and log the ensemble scores.

        Runs on every rank: all ranks gather the same records and log the same values; only
        global rank zero writes files.
        """
        if trainer.sanity_checking:
            return
        own = _unique(_gather(self._answers))
        questions = _unique(_gather(self._questions))
        self._answers, self._questions = [], []

        if self.publish and trainer.is_global_zero:
            self._publish(own, trainer)
        published = self._read_published()
        summary = self.summarize(own, questions, published, self._total_questions(trainer))
        self.last_summary = summary
        for key, value in summary.items():
            pl_module.log(f"val/ensemble/{key}", value, on_step=False, on_epoch=True, sync_dist=False)
        headline = ", ".join(f"{key} {value:.4f}" for key, value in summary.items() if "expert_" not in key)
        rank_zero_info(
            f"Routed ensemble at step {trainer.global_step} (expert {self.expert_id}, {len(own)} own answers, "
            f"published by experts {sorted(published)}): {headline}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"expert_id": self.expert_id, "last_summary": dict(self.last_summary)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.expert_id is None:
            self.expert_id = state_dict.get("expert_id")
        self.last_summary = dict(state_dict.get("last_summary", {}))

    # -- answering ----------------------------------------------------------------------------

    def _answers_for(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        rows: list[int],
    ) -> list[str]:
        """Return the answers of ``rows``, from the step outputs or by decoding them."""
        batch_size = len(batch["question_id"])
        if isinstance(outputs, dict) and isinstance(outputs.get("answers"), list):
            if len(outputs["answers"]) != batch_size:
                raise ValueError(
                    f"validation_step returned {len(outputs['answers'])} answers for a batch of {batch_size}."
                )
            return [outputs["answers"][i] for i in rows]
        config = pl_module.model.config
        tiles = count_image_tiles(
            batch["prompt_input_ids"], config.image_token_id, image_seq_length_of(config)
        )
        if not rows:
            if trainer.world_size > 1:
                pl_module.generate_answers(select_samples(batch, [0], tiles))
            return []
        return pl_module.generate_answers(select_samples(batch, rows, tiles))

    # -- publishing and reading ---------------------------------------------------------------

    def _publish(self, records: list[dict[str, Any]], trainer: Trainer) -> None:
        directory = expert_dir(self.experts_dir, self.expert_id)
        n_lines = write_predictions(directory / PREDICTIONS_FILE, records)
        status = {
            "expert": self.expert_id,
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "n_predictions": n_lines,
            "time": time.time(),
        }
        _write_json_atomic(directory / STATUS_FILE, status)

    def _read_published(self) -> dict[int, list[dict[str, Any]]]:
        """Read every other expert's latest predictions, keeping the questions routed to that expert."""
        published: dict[int, list[dict[str, Any]]] = {}
        if not self.experts_dir.is_dir():
            return published
        for directory in sorted(self.experts_dir.glob("expert-*")):
            suffix = directory.name.removeprefix("expert-")
            if not suffix.isdigit() or int(suffix) == self.expert_id:
                continue
            path = directory / PREDICTIONS_FILE
            if not path.is_file():
                continue
            expert = int(suffix)
            try:
                records = read_predictions(path)
            except ValueError as error:
                rank_zero_warn(f"Skipping the predictions of expert {expert}: {error}")
                continue
            published[expert] = [r for r in records if r["expert"] == expert]
        return published

    def _total_questions(self, trainer: Trainer) -> int | None:
        eval_dir = self.eval_dir
        if eval_dir is None:
            eval_dir = (
                getattr(trainer.datamodule, "val_dir", None) if trainer.datamodule is not None else None
            )
        return _manifest_total(eval_dir) if eval_dir is not None else None

    # -- scoring ------------------------------------------------------------------------------

    def summarize(
        self,
        own: list[dict[str, Any]],
        questions: list[dict[str, Any]],
        published: dict[int, list[dict[str, Any]]],
        total: int | None = None,
    ) -> dict[str, float]:
        """Combine own and published answers into the top-1 ensemble's answers and score them.

        Args:
            own: this expert's answer records (questions routed to it).
            questions: every question seen in validation, with its route in ``expert``.
            published: other experts' records by expert id, each routed to that expert.
            total: the number of evaluation questions; None counts the questions seen here and in
                the published files.

        Returns:
            The logged values, keyed without the ``val/ensemble/`` prefix.
        """
        combined = {(r["benchmark"], r["question_id"]): r for r in own}
        for expert in sorted(published):
            for record in published[expert]:
                combined.setdefault((record["benchmark"], record["question_id"]), record)
        universe = {(q["benchmark"], q["question_id"]) for q in questions} | set(combined)
        n_total = max(len(universe), total or 0)

        records = list(combined.values())
        benchmarks = sorted({r["benchmark"] for r in records})
        summary: dict[str, float] = {}
        for benchmark, score in score_records(records).items():
            summary[_score_key(benchmark, benchmarks)] = score
        summary["coverage"] = len(records) / n_total if n_total else 0.0
        summary["answered"] = float(len(records))

        by_expert: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for record in records:
            by_expert[record["expert"]].append(record)
        n_experts = max([self._n_experts_seen, self.expert_id + 1, *(k + 1 for k in published)])
        for k in range(n_experts):
            group = by_expert.get(k, [])
            summary[f"expert_{k}/answered"] = float(len(group))
            for benchmark, score in score_records(group).items():
                summary[f"expert_{k}/{_score_key(benchmark, benchmarks)}"] = score
        return summary


def _score_key(benchmark: str, benchmarks: list[str]) -> str:
    """Return the metric name, prefixed by the benchmark when several benchmarks are scored."""
    name = build_metric(benchmark).metric_name
    return name if len(benchmarks) == 1 else f"{benchmark}/{name}"


def _unique(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop repeated questions (a distributed sampler pads ranks with repeats), keeping input order."""
    unique = {(r["benchmark"], r["question_id"]): r for r in records}
    return list(unique.values())
