"""Routing callback: own answers, other experts' published answers, coverage and TensorBoard logs."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from routed_experts import EXPERT_ANSWERS, RoutedExperts, build_routed_experts, make_eval_batch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from callbacks.routing import RoutingCallback, expert_dir
from lightning_modules.internvl_module import InternVLExpert
from lightning_modules.predictions import read_predictions, write_predictions

# Five evaluation questions: q000, q003 routed to expert 0; q001, q002, q004 to expert 1.
ROUTES = [0, 1, 1, 0, 1]


class _BatchList(torch.utils.data.Dataset):
    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict:
        return self.batches[index]


@pytest.fixture(scope="module")
def experts() -> RoutedExperts:
    return build_routed_experts()


@pytest.fixture(scope="module")
def expert0(experts: RoutedExperts) -> InternVLExpert:
    return InternVLExpert.load_from_checkpoint(experts.checkpoints[0], map_location="cpu")


@pytest.fixture(scope="module")
def expert1(experts: RoutedExperts) -> InternVLExpert:
    module = InternVLExpert(model_name_or_path=str(experts.checkpoints[1]), expert_id=1, max_new_tokens=6)
    module.configure_model()
    return module


def _validate(module: InternVLExpert, callback: RoutingCallback, experts: RoutedExperts, root: Path) -> dict:
    # Two batches so that one of them (rows 3-4) has a row for each expert.
    batches = [make_eval_batch(experts, ROUTES[:3]), make_eval_batch(experts, ROUTES[3:], start=3)]
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    (metrics,) = trainer.validate(module, DataLoader(_BatchList(batches), batch_size=None))
    return metrics


def test_callback_partial_coverage_before_others_publish(
    experts: RoutedExperts, expert0: InternVLExpert, tmp_path: Path
) -> None:
    experts_dir = tmp_path / "experts"
    metrics = _validate(expert0, RoutingCallback(str(experts_dir)), experts, tmp_path)

    # Expert 1 has published nothing: only expert 0's two questions are answered, both correctly.
    assert metrics["val/ensemble/exact_match"] == pytest.approx(1.0)
    assert metrics["val/ensemble/coverage"] == pytest.approx(2 / 5)
    assert metrics["val/ensemble/answered"] == 2
    assert metrics["val/ensemble/expert_0/answered"] == 2
    assert metrics["val/ensemble/expert_1/answered"] == 0
    assert "val/ensemble/expert_1/exact_match" not in metrics

    published = read_predictions(expert_dir(experts_dir, 0) / "predictions.jsonl")
    assert [(r["question_id"], r["answer"], r["expert"]) for r in published] == [
        ("q000", "circle", 0),
        ("q003", "circle", 0),
    ]
    status = json.loads((expert_dir(experts_dir, 0) / "status.json").read_text())
    assert status["expert"] == 0
    assert status["n_predictions"] == 2


def test_callback_combines_published_answers(
    experts: RoutedExperts, expert0: InternVLExpert, expert1: InternVLExpert, tmp_path: Path
) -> None:
    experts_dir = tmp_path / "experts"
    _validate(expert0, RoutingCallback(str(experts_dir)), experts, tmp_path / "run0")
    # Expert 1 validates next: it answers its three questions and reads expert 0's two.
    callback = RoutingCallback(str(experts_dir))
    metrics = _validate(expert1, callback, experts, tmp_path / "run1")
    assert callback.expert_id == 1
    assert metrics["val/ensemble/coverage"] == pytest.approx(1.0)
    assert metrics["val/ensemble/exact_match"] == pytest.approx(1.0)
    assert metrics["val/ensemble/expert_0/answered"] == 2
    assert metrics["val/ensemble/expert_1/answered"] == 3
    published = read_predictions(expert_dir(experts_dir, 1) / "predictions.jsonl")
    assert {r["answer"] for r in published} == {EXPERT_ANSWERS[1]}


def test_callback_scores_other_experts_answers(
    experts: RoutedExperts, expert0: InternVLExpert, tmp_path: Path
) -> None:
    experts_dir = tmp_path / "experts"
    # Expert 1 published two of its three questions, one of them wrong, and a stray record
    # routed to expert 0, which the callback must ignore in favour of expert 0's own answer.
    stale = [
        {"question_id": "q001", "question": "?", "answer": "red", "gt_answers": ["red"], "expert": 1,
         "benchmark": "easyvqa"},
        {"question_id": "q002", "question": "?", "answer": "blue", "gt_answers": ["red"], "expert": 1,
         "benchmark": "easyvqa"},
        {"question_id": "q000", "question": "?", "answer": "wrong", "gt_answers": ["circle"], "expert": 0,
         "benchmark": "easyvqa"},
    ]  # fmt: skip
    write_predictions(expert_dir(experts_dir, 1) / "predictions.jsonl", stale)
    metrics = _validate(expert0, RoutingCallback(str(experts_dir)), experts, tmp_path)
    assert metrics["val/ensemble/answered"] == 4
    assert metrics["val/ensemble/coverage"] == pytest.approx(4 / 5)
    assert metrics["val/ensemble/exact_match"] == pytest.approx(3 / 4)
    assert metrics["val/ensemble/expert_1/exact_match"] == pytest.approx(1 / 2)
    assert metrics["val/ensemble/expert_0/exact_match"] == pytest.approx(1.0)


def test_callback_coverage_uses_manifest_total(
    experts: RoutedExperts, expert0: InternVLExpert, tmp_path: Path
) -> None:
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    # The evaluation split contains 10 questions although this validation only sees 5.
    manifest = {"n_experts": 2, "experts": [{"samples": 4, "shards": []}, {"samples": 6, "shards": []}]}
    (eval_dir / "manifest.json").write_text(json.dumps(manifest))
    callback = RoutingCallback(str(tmp_path / "experts"), eval_dir=str(eval_dir))
    metrics = _validate(expert0, callback, experts, tmp_path)
    assert metrics["val/ensemble/coverage"] == pytest.approx(2 / 10)


def test_callback_uses_step_outputs(experts: RoutedExperts, tmp_path: Path) -> None:
    class AnsweringExpert(L.LightningModule):
        """Returns fixed answers from validation_step, so the callback must not decode."""

        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"expert_id": 0})
            self.layer = torch.nn.Linear(1, 1)

        def validation_step(self, batch: dict, batch_idx: int) -> dict:
            return {"answers": [f"answer-{qid}" for qid in batch["question_id"]]}

        def generate_answers(self, batch: dict) -> list[str]:
            raise AssertionError("the callback decoded although validation_step returned answers")

    experts_dir = tmp_path / "experts"
    _validate(AnsweringExpert(), RoutingCallback(str(experts_dir)), experts, tmp_path)
    published = read_predictions(expert_dir(experts_dir, 0) / "predictions.jsonl")
    assert [r["answer"] for r in published] == ["answer-q000", "answer-q003"]


def test_callback_logs_to_tensorboard_during_fit(experts: RoutedExperts, tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    module = InternVLExpert(
        preset="internvl-tiny",
        processor_name_or_path=str(experts.processor_dir),
        expert_id=1,
        max_new_tokens=4,
        log_throughput=False,
    )
    train_batch = make_eval_batch(experts, [1, 1])
    val_batch = make_eval_batch(experts, ROUTES)
    logger = TensorBoardLogger(tmp_path, name="expert-1", version=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=logger,
        callbacks=[RoutingCallback(str(tmp_path / "experts"))],
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(
        module,
        DataLoader(_BatchList([train_batch]), batch_size=None),
        DataLoader(_BatchList([val_batch]), batch_size=None),
    )
    events = EventAccumulator(str(Path(logger.log_dir)))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val/ensemble/exact_match", "val/ensemble/coverage", "val/ensemble/expert_1/answered"} <= tags
    (coverage,) = events.Scalars("val/ensemble/coverage")
    assert coverage.value == pytest.approx(3 / 5)
    assert (expert_dir(tmp_path / "experts", 1) / "predictions.jsonl").is_file()


def test_callback_reads_datamodule_val_dir(
    experts: RoutedExperts, expert0: InternVLExpert, tmp_path: Path
) -> None:
    class EvalData(L.LightningDataModule):
        def __init__(self, val_dir: Path) -> None:
            super().__init__()
            self.val_dir = val_dir

        def val_dataloader(self) -> DataLoader:
            return DataLoader(_BatchList([make_eval_batch(experts, ROUTES)]), batch_size=None)

    val_dir = tmp_path / "eval"
    val_dir.mkdir()
    manifest = {"n_experts": 2, "experts": [{"samples": 2, "shards": []}, {"samples": 6, "shards": []}]}
    (val_dir / "manifest.json").write_text(json.dumps(manifest))
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[RoutingCallback(str(tmp_path / "experts"))],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    (metrics,) = trainer.validate(expert0, datamodule=EvalData(val_dir))
    assert metrics["val/ensemble/coverage"] == pytest.approx(2 / 8)


def test_callback_decodes_without_step_outputs(experts: RoutedExperts, tmp_path: Path) -> None:
    class SilentExpert(InternVLExpert):
        """An expert whose validation_step returns nothing, so the callback decodes its rows itself."""

        generate_calls = 0

        def validation_step(self, batch: dict, batch_idx: int) -> None:
            super().validation_step(batch, batch_idx)

        def generate_answers(self, batch: dict) -> list[str]:
            self.generate_calls += 1
            return super().generate_answers(batch)

    module = SilentExpert.load_from_checkpoint(experts.checkpoints[0], map_location="cpu")
    experts_dir = tmp_path / "experts"
    metrics = _validate(module, RoutingCallback(str(experts_dir)), experts, tmp_path)
    # Two batches: validation_step decodes each once, and the callback decodes each batch's own rows.
    assert module.generate_calls == 4
    assert metrics["val/ensemble/exact_match"] == pytest.approx(1.0)
    published = read_predictions(expert_dir(experts_dir, 0) / "predictions.jsonl")
    assert [(r["question_id"], r["answer"]) for r in published] == [("q000", "circle"), ("q003", "circle")]
