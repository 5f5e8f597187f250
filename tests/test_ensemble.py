"""Routed ensemble: top-1 grouping, soft mixing, fallback, temperature fit and the Lightning loop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from routed_experts import (
    EXPERT_ANSWERS,
    RoutedExperts,
    build_routed_experts,
    make_eval_batch,
    make_eval_split,
)
from torch.utils.data import DataLoader

from datamodules.evaluation import EvalDataModule
from lightning_modules.ensemble import RoutedEnsemble
from lightning_modules.ensemble_routing import (
    fit_temperature,
    mixture_greedy_decode,
    resolve_routes,
    routing_weights,
    select_samples,
)
from lightning_modules.predictions import read_predictions

ROUTES = [0, 1, 1, 0, 1]


@pytest.fixture(scope="module")
def experts() -> RoutedExperts:
    return build_routed_experts()


@pytest.fixture(scope="module")
def top1(experts: RoutedExperts) -> RoutedEnsemble:
    ensemble = RoutedEnsemble([str(p) for p in experts.checkpoints], str(experts.clustering_dir))
    ensemble.configure_model()
    return ensemble


@pytest.fixture(scope="module")
def soft(experts: RoutedExperts) -> RoutedEnsemble:
    ensemble = RoutedEnsemble([str(p) for p in experts.checkpoints], str(experts.clustering_dir), mode="soft")
    ensemble.configure_model()
    return ensemble


class _BatchList(torch.utils.data.Dataset):
    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict:
        return self.batches[index]


# ---------------------------------------------------------------------------------------------
# Routing arithmetic
# ---------------------------------------------------------------------------------------------


def test_routing_weights_limits() -> None:
    scores = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.3, 0.3]])
    uniform = routing_weights(scores, 0.0)
    assert torch.allclose(uniform, torch.full((2, 3), 1 / 3))
    sharp = routing_weights(scores, 1e4)
    assert torch.equal(sharp.argmax(1), torch.tensor([0, 1]))
    assert sharp[0, 0].item() == pytest.approx(1.0)
    # top_k=2 at T=0: the two best experts share the weight, ties going to the lower id.
    top2 = routing_weights(scores, 0.0, top_k=2)
    assert torch.allclose(top2, torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.5, 0.5]]))
    masked = routing_weights(scores, 0.0, available=torch.tensor([True, False, True]))
    assert torch.allclose(masked, torch.tensor([[0.5, 0.0, 0.5], [0.5, 0.0, 0.5]]))
    expected = torch.softmax(torch.tensor([1.8, 0.4, 1.0]), dim=0)
    assert torch.allclose(routing_weights(scores, 2.0)[0], expected)


def test_resolve_routes_fallback() -> None:
    routed = torch.tensor([0, 1, 2, 1])
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.9, 0.5], [0.1, 0.2, 0.9], [0.6, 0.9, 0.1]])
    available = torch.tensor([True, False, True])
    answering, moved = resolve_routes(routed, scores, available, "next_nearest")
    assert answering.tolist() == [0, 2, 2, 0]
    assert moved.tolist() == [False, True, False, True]
    with pytest.raises(RuntimeError, match=r"2 sample\(s\) are routed to experts \[1\]"):
        resolve_routes(routed, scores, available, "fail")


def test_select_samples_keeps_tiles_and_trims_padding(experts: RoutedExperts) -> None:
    batch = make_eval_batch(experts, ROUTES)
    sub = select_samples(batch, [3, 1], tiles=[1] * len(ROUTES))
    assert sub["question_id"] == ["q003", "q001"]
    assert torch.equal(sub["pixel_values"], batch["pixel_values"][[3, 1]])
    assert torch.equal(sub["expert"], torch.tensor([0, 1]))
    assert sub["prompt_attention_mask"][:, 0].any()
    for row, source in enumerate([3, 1]):
        kept = sub["prompt_input_ids"][row][sub["prompt_attention_mask"][row].bool()]
        original = batch["prompt_input_ids"][source][batch["prompt_attention_mask"][source].bool()]
        assert torch.equal(kept, original)


def test_fit_temperature_prefers_informative_routes() -> None:
    # Two experts, each confident on its own sequences. Route scores that point at the right expert
    # favour a large T; scores that point at the wrong one favour T = 0 (hedging).
    log_probs = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]]))
    right = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    fit = fit_temperature(log_probs, right, temperatures=(0.0, 1.0, 10.0, 100.0))
    assert fit.temperature == 100.0
    assert fit.log_likelihoods == sorted(fit.log_likelihoods)
    assert fit.log_likelihoods[0] == pytest.approx(4 * np.log(0.5))
    assert fit.log_likelihoods[-1] == pytest.approx(4 * np.log(0.9), abs=1e-6)
    wrong = right.flip(1)
    assert fit_temperature(log_probs, wrong, temperatures=(0.0, 1.0, 10.0, 100.0)).temperature == 0.0


# ---------------------------------------------------------------------------------------------
# The ensemble on two trained experts
# ---------------------------------------------------------------------------------------------


def test_top1_answers_match_experts_on_routed_subsets(experts: RoutedExperts, top1: RoutedEnsemble) -> None:
    batch = make_eval_batch(experts, ROUTES)
    answers, routed, answering, moved = top1.answer_batch(batch)
    assert answers == [EXPERT_ANSWERS[k] for k in ROUTES]
    assert answering.tolist() == ROUTES
    assert not moved.any()
    for k in range(2):
        rows = [i for i, route in enumerate(ROUTES) if route == k]
        # The expert alone, on a batch built from only its routed questions.
        own_batch = make_eval_batch(experts, [k] * len(rows))
        subset = select_samples(batch, rows, tiles=[1] * len(ROUTES))
        assert top1.expert(k).generate_answers(subset) == [answers[i] for i in rows]
        assert set(top1.expert(k).generate_answers(own_batch)) == {EXPERT_ANSWERS[k]}


def test_route_by_route_scores(experts: RoutedExperts) -> None:
    # The stored route is expert 0 but the scores point at expert 1 for the last row.
    ensemble = RoutedEnsemble(
        [str(p) for p in experts.checkpoints], str(experts.clustering_dir), route_by="route_scores"
    )
    ensemble.configure_model()
    batch = make_eval_batch(experts, [0, 0], route_scores=[[0.9, 0.1], [0.2, 0.7]])
    answers, routed, _, _ = ensemble.answer_batch(batch)
    assert routed.tolist() == [0, 1]
    assert answers == ["circle", "red"]


def test_soft_large_temperature_equals_top1(
    experts: RoutedExperts, top1: RoutedEnsemble, soft: RoutedEnsemble
) -> None:
    batch = make_eval_batch(experts, ROUTES)
    soft.temperature = 1e4
    assert soft.answer_batch(batch)[0] == top1.answer_batch(batch)[0]


def test_soft_top_k_one_equals_top1(experts: RoutedExperts, top1: RoutedEnsemble) -> None:
    ensemble = RoutedEnsemble(
        [str(p) for p in experts.checkpoints],
        str(experts.clustering_dir),
        mode="soft",
        temperature=0.0,
        top_k=1,
    )
    ensemble.configure_model()
    batch = make_eval_batch(experts, ROUTES)
    assert ensemble.answer_batch(batch)[0] == top1.answer_batch(batch)[0]


def _uniform_mixture_reference(models: list, batch: dict, steps: int, eos: int) -> list[list[int]]:
    """Greedy decoding of the 50/50 mixture without KV caches: every step re-reads the whole sequence."""
    results = []
    for row in range(batch["prompt_input_ids"].shape[0]):
        mask = batch["prompt_attention_mask"][row].bool()
        ids = batch["prompt_input_ids"][row][mask][None, :]  # (1, Lp) without padding
        pixel_values = batch["pixel_values"][row : row + 1]
        tokens: list[int] = []
        for _ in range(steps):
            with torch.no_grad():
                probs = sum(
                    0.5 * torch.softmax(model(input_ids=ids, pixel_values=pixel_values).logits[0, -1], dim=-1)
                    for model in models
                )
            token = int(probs.argmax())
            tokens.append(token)
            if token == eos:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        results.append(tokens)
    return results


def test_soft_zero_temperature_is_uniform_mixture(experts: RoutedExperts, soft: RoutedEnsemble) -> None:
    batch = make_eval_batch(experts, ROUTES[:3])
    soft.temperature = 0.0
    tokenizer = soft.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    models = [soft.expert(k).model for k in range(2)]
    weights = routing_weights(batch["route_scores"], 0.0)
    tokens = mixture_greedy_decode(
        models, batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["pixel_values"], weights,
        max_new_tokens=6, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    reference = _uniform_mixture_reference(models, batch, steps=6, eos=eos)
    for row, expected in enumerate(reference):
        assert tokens[row, : len(expected)].tolist() == expected
    answers = soft.answer_batch(batch)[0]
    assert answers == [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def test_one_hot_mixture_equals_generate(experts: RoutedExperts, top1: RoutedEnsemble) -> None:
    batch = make_eval_batch(experts, ROUTES)
    tokenizer = top1.tokenizer
    models = [top1.expert(k).model for k in range(2)]
    for k in range(2):
        weights = torch.zeros(len(ROUTES), 2)
        weights[:, k] = 1.0
        tokens = mixture_greedy_decode(
            models, batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["pixel_values"], weights,
            max_new_tokens=6, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        decoded = [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        assert decoded == top1.expert(k).generate_answers(batch)


def test_fit_temperature_on_expert_batches(experts: RoutedExperts, soft: RoutedEnsemble) -> None:
    held_out = [make_eval_batch(experts, [0, 1, 0], start=20), make_eval_batch(experts, [1, 1], start=30)]
    fit = soft.fit_temperature_on(held_out)
    assert fit.n_sequences == 5
    assert fit.n_tokens > 5
    # The routes name the expert that was trained on each answer, so sharp weights win. Beyond
    # T = 10 the weights are one-hot to float precision and the likelihood is flat.
    assert fit.temperature >= 10.0
    assert soft.temperature == fit.temperature
    by_temperature = dict(zip(fit.temperatures, fit.log_likelihoods, strict=True))
    assert by_temperature[0.0] < by_temperature[1.0] < by_temperature[5.0] < by_temperature[10.0]
    assert max(fit.log_likelihoods) == pytest.approx(by_temperature[1000.0], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Options and missing experts
# ---------------------------------------------------------------------------------------------


def test_rejects_expert_count_mismatch(experts: RoutedExperts) -> None:
    with pytest.raises(ValueError, match="got 1 expert checkpoints but .* has 2 clusters"):
        RoutedEnsemble([str(experts.checkpoints[0])], str(experts.clustering_dir))


def test_rejects_bad_options(experts: RoutedExperts) -> None:
    paths = [str(p) for p in experts.checkpoints]
    with pytest.raises(ValueError) as error:
        RoutedEnsemble(paths, str(experts.clustering_dir), mode="mixture", top_k=3, fallback="skip")
    message = str(error.value)
    assert "mode must be one of ('top1', 'soft'), got 'mixture'" in message
    assert "top_k must be in [1, 2]" in message
    assert "fallback must be one of ('fail', 'next_nearest'), got 'skip'" in message


def test_missing_expert_fails_by_default(experts: RoutedExperts, tmp_path: Path) -> None:
    missing = tmp_path / "expert-1-missing"
    with pytest.raises(
        ValueError, match=r"expert checkpoints not found \(expert 1: .*expert-1-missing\).*next_nearest"
    ):
        RoutedEnsemble([str(experts.checkpoints[0]), str(missing)], str(experts.clustering_dir))


def test_missing_expert_falls_back_to_next_nearest(experts: RoutedExperts, tmp_path: Path) -> None:
    missing = tmp_path / "expert-1-missing"
    ensemble = RoutedEnsemble(
        [str(experts.checkpoints[0]), str(missing)],
        str(experts.clustering_dir),
        fallback="next_nearest",
        predictions_dir=str(tmp_path / "predictions"),
    )
    ensemble.configure_model()
    assert ensemble.available_ids == [0]
    batch = make_eval_batch(experts, ROUTES)
    answers, routed, answering, moved = ensemble.answer_batch(batch)
    assert answers == ["circle"] * len(ROUTES)
    assert answering.tolist() == [0] * len(ROUTES)
    assert moved.tolist() == [route == 1 for route in ROUTES]

    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    with pytest.warns(UserWarning, match="3 of 5 val samples were routed to missing experts"):
        (metrics,) = trainer.validate(ensemble, DataLoader(_BatchList([batch]), batch_size=None))
    assert metrics["val/moved_samples"] == 3
    assert metrics["val/route_count/expert_1"] == 3
    # Only the two questions routed to expert 0 are answered correctly.
    assert metrics["val/easyvqa/exact_match"] == pytest.approx(0.4)


# ---------------------------------------------------------------------------------------------
# Lightning validate / test
# ---------------------------------------------------------------------------------------------


def test_validate_logs_scores_and_writes_predictions(experts: RoutedExperts, tmp_path: Path) -> None:
    ensemble = RoutedEnsemble(
        [str(p) for p in experts.checkpoints],
        str(experts.clustering_dir),
        predictions_dir=str(tmp_path / "predictions"),
    )
    batches = [
        make_eval_batch(experts, ROUTES),
        make_eval_batch(experts, [1, 1, 0], benchmark="gqa", start=10),
    ]
    # One wrong reference: q011 is routed to expert 1 ("red") but its reference is "circle".
    batches[1]["gt_answers"][1] = ["circle"]
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (metrics,) = trainer.validate(ensemble, DataLoader(_BatchList(batches), batch_size=None))

    assert metrics["val/easyvqa/exact_match"] == pytest.approx(1.0)
    assert metrics["val/gqa/exact_match"] == pytest.approx(2 / 3)
    assert metrics["val/gqa/expert_1/exact_match"] == pytest.approx(0.5)
    assert metrics["val/gqa/expert_0/exact_match"] == pytest.approx(1.0)
    assert metrics["val/easyvqa/expert_0/exact_match"] == pytest.approx(1.0)
    assert metrics["val/route_count/expert_0"] == 3
    assert metrics["val/route_count/expert_1"] == 5
    assert metrics["val/moved_samples"] == 0

    records = read_predictions(tmp_path / "predictions" / "val-ensemble-top1.jsonl")
    assert len(records) == 8
    by_id = {record["question_id"]: record for record in records}
    assert by_id["q001"]["expert"] == 1
    assert by_id["q001"]["answer"] == "red"
    assert by_id["q003"]["answer"] == "circle"
    assert by_id["q012"]["benchmark"] == "gqa"
    assert all(record["routed_expert"] == record["expert"] for record in records)


def test_validate_rejects_temperature_fit(experts: RoutedExperts, tmp_path: Path) -> None:
    ensemble = RoutedEnsemble(
        [str(p) for p in experts.checkpoints], str(experts.clustering_dir), mode="soft", fit_temperature=True
    )
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    loader = DataLoader(_BatchList([make_eval_batch(experts, ROUTES)]), batch_size=None)
    with pytest.raises(RuntimeError, match="without fit_dir, so T would be fitted on the validation split"):
        trainer.validate(ensemble, loader)


def test_test_fits_temperature_on_validation_data(experts: RoutedExperts, tmp_path: Path) -> None:
    class HeldOut(L.LightningDataModule):
        def val_dataloader(self) -> DataLoader:
            return DataLoader(_BatchList([make_eval_batch(experts, [0, 1, 1], start=40)]), batch_size=None)

        def test_dataloader(self) -> DataLoader:
            return DataLoader(_BatchList([make_eval_batch(experts, ROUTES)]), batch_size=None)

    ensemble = RoutedEnsemble(
        [str(p) for p in experts.checkpoints],
        str(experts.clustering_dir),
        mode="soft",
        temperature=0.0,
        fit_temperature=True,
        temperature_grid=(0.0, 5.0, 500.0),
        predictions_dir=str(tmp_path),
    )
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (metrics,) = trainer.test(ensemble, datamodule=HeldOut())
    assert metrics["test/temperature"] == 500.0
    assert metrics["test/easyvqa/exact_match"] == pytest.approx(1.0)
    records = [json.loads(line) for line in (tmp_path / "test-ensemble-soft.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in records] == [EXPERT_ANSWERS[k] for k in ROUTES]


def test_exported_directory_without_config_is_missing(experts: RoutedExperts, tmp_path: Path) -> None:
    # A directory counts as a checkpoint only when it contains config.json.
    empty = tmp_path / "empty-export"
    shutil.copytree(experts.processor_dir, empty)
    with pytest.raises(ValueError, match="expert checkpoints not found"):
        RoutedEnsemble([str(experts.checkpoints[0]), str(empty)], str(experts.clustering_dir))


def test_eval_datamodule_split_and_fit_dir(experts: RoutedExperts, tmp_path: Path) -> None:
    # A real evaluation split routed by the router, read by the real EvalDataModule.
    eval_dir = make_eval_split(experts, ROUTES, tmp_path / "eval")
    fit_dir = make_eval_split(experts, [1, 0, 1, 0], tmp_path / "held-out", start=50)
    datamodule = EvalDataModule(
        eval_dir=str(eval_dir),
        processor=str(experts.processor_dir),
        batch_size=4,
        num_workers=0,
        max_length=256,
    )
    ensemble = RoutedEnsemble(
        [str(p) for p in experts.checkpoints],
        str(experts.clustering_dir),
        mode="soft",
        temperature=0.0,
        fit_temperature=True,
        temperature_grid=(0.0, 500.0),
        fit_dir=str(fit_dir),
        predictions_dir=str(tmp_path / "predictions"),
    )
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (metrics,) = trainer.validate(ensemble, datamodule=datamodule)
    assert ensemble.temperature_fit.n_sequences == 4
    assert metrics["val/temperature"] == 500.0
    assert metrics["val/easyvqa/exact_match"] == pytest.approx(1.0)
    assert metrics["val/route_count/expert_0"] == 2
    assert metrics["val/route_count/expert_1"] == 3
    records = read_predictions(tmp_path / "predictions" / "val-ensemble-soft.jsonl")
    assert {r["question_id"]: r["routed_expert"] for r in records} == {
        f"q{i:03d}": route for i, route in enumerate(ROUTES)
    }


def test_rejects_split_of_other_clustering(experts: RoutedExperts, tmp_path: Path) -> None:
    eval_dir = make_eval_split(experts, ROUTES[:2], tmp_path / "eval")
    # Same K, centroids swapped: every route of the split would now be the other expert.
    other = tmp_path / "other-clusters"
    other.mkdir()
    np.save(other / "clustering_centroids.npy", experts.centroids[::-1].copy())
    np.save(other / "clustering_assignments.npy", np.array([0, 1], dtype=np.int64))
    datamodule = EvalDataModule(
        eval_dir=str(eval_dir), processor=str(experts.processor_dir), batch_size=2, num_workers=0, max_length=256
    )
    ensemble = RoutedEnsemble([str(p) for p in experts.checkpoints], str(other))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)

    with pytest.raises(ValueError, match="was routed by another clustering"):
        trainer.validate(ensemble, datamodule=datamodule)


def test_test_rejects_fit_on_test_questions(experts: RoutedExperts, tmp_path: Path) -> None:
    # EvalDataModule serves one split for validation and test, so fitting on it would leak.
    eval_dir = make_eval_split(experts, ROUTES[:2], tmp_path / "eval")
    datamodule = EvalDataModule(
        eval_dir=str(eval_dir),
        processor=str(experts.processor_dir),
        batch_size=2,
        num_workers=0,
        max_length=256,
    )
    ensemble = RoutedEnsemble(
        [str(p) for p in experts.checkpoints], str(experts.clustering_dir), mode="soft", fit_temperature=True
    )
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    with pytest.raises(RuntimeError, match="same dataset for validation and test"):
        trainer.test(ensemble, datamodule=datamodule)


@pytest.mark.parametrize("config", ["ensemble.yaml", "ensemble_soft.yaml"])
def test_cli_validate_with_ensemble_config(experts: RoutedExperts, tmp_path: Path, config: str) -> None:
    from cli import main as cli_main

    eval_dir = make_eval_split(experts, ROUTES, tmp_path / "eval")
    held_out = make_eval_split(experts, [0, 1], tmp_path / "held-out", start=60)
    repo_root = Path(__file__).resolve().parents[1]
    cli = cli_main(
        [
            "validate",
            "--config", str(repo_root / "configs" / config),
            "--trainer.accelerator", "cpu",
            "--trainer.precision", "32-true",
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--model.checkpoints", json.dumps([str(p) for p in experts.checkpoints]),
            "--model.clustering_dir", str(experts.clustering_dir),
            "--model.max_new_tokens", "6",
            *(["--model.fit_dir", str(held_out), "--model.temperature_grid", "[0.0, 500.0]"]
              if config == "ensemble_soft.yaml" else []),
            "--data.eval_dir", str(eval_dir),
            "--data.processor", str(experts.processor_dir),
            "--data.num_workers", "0",
            "--data.max_length", "256",
        ]
    )  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert metrics["val/easyvqa/exact_match"].item() == pytest.approx(1.0)
    assert metrics["val/route_count/expert_1"].item() == 3
    mode = "top1" if config == "ensemble.yaml" else "soft"
    predictions = Path(cli.trainer.log_dir) / "predictions" / f"val-ensemble-{mode}.jsonl"
    assert [r["answer"] for r in read_predictions(predictions)] == [EXPERT_ANSWERS[k] for k in ROUTES]


def test_loads_sharded_checkpoint_directory(experts: RoutedExperts, tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    # The layout ModelParallelStrategy writes: tensors through torch.distributed.checkpoint plus meta.pt.
    checkpoint = torch.load(experts.checkpoints[0], map_location="cpu", weights_only=False)
    sharded = tmp_path / "last.ckpt"
    dcp.save({"state_dict": checkpoint.pop("state_dict")}, checkpoint_id=sharded, no_dist=True)
    torch.save(checkpoint, sharded / "meta.pt")

    ensemble = RoutedEnsemble([str(sharded), str(experts.checkpoints[1])], str(experts.clustering_dir))
    ensemble.configure_model()
    answers = ensemble.answer_batch(make_eval_batch(experts, ROUTES))[0]
    assert answers == [EXPERT_ANSWERS[k] for k in ROUTES]
