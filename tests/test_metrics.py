"""Benchmark metrics against hand-computed scores."""

import math

import pytest
import torch

from lightning_modules.metrics import (
    ANLS,
    ExactMatch,
    RelaxedAccuracy,
    VQAAccuracy,
    YesNoF1,
    build_metric,
    normalize_vqa_answer,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The Two dogs.", "2 dogs"),
        ("dont know", "don't know"),
        ("couldnt've", "couldn't've"),
        ("1,000", "1000"),
        ("red, white", "red white"),
        ("black-and-white", "black and white"),
        ("2.5 m.", "2.5 m"),
        ("an apple\n", "apple"),
        ("none", "0"),
        ("Yes!", "yes"),
        ("well", "well"),
    ],
)
def test_vqa_normalization(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(
    ("n_matching", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_vqa_accuracy_leave_one_out(n_matching: int, expected: float) -> None:
    # With m of 10 references equal to the answer: the m subsets that leave out a match see
    # m - 1 matches and the 10 - m others see m, each scored min(1, matches / 3).
    refs = ["cat"] * n_matching + ["dog"] * (10 - n_matching)
    metric = VQAAccuracy()
    metric.update(["cat"], [refs])
    assert metric.compute().item() == pytest.approx(expected, abs=1e-6)


def test_vqa_accuracy_normalizes_both_sides() -> None:
    metric = VQAAccuracy()
    refs = ["two"] * 3 + ["2 dogs"] * 7
    metric.update(["2"], [refs])  # "two" -> "2": three matches -> 0.9
    metric.update(["The 2 dogs."], [refs])  # seven matches -> 1.0
    assert metric.compute().item() == pytest.approx((0.9 + 1.0) / 2, abs=1e-6)


def test_vqa_accuracy_single_reference() -> None:
    metric = VQAAccuracy()
    assert metric.per_sample_scores(["Two", "three"], [["2"], ["2"]]) == [1.0, 0.0]


def test_anls_threshold_and_max_over_refs() -> None:
    metric = ANLS()
    scores = metric.per_sample_scores(
        ["hello", "abc", "abcd", "  Hello  World ", "abcde"],
        [["hallo"], ["xyz"], ["abxy"], ["hello world"], ["zzzzz", "abxde"]],
    )
    # hello/hallo: distance 1 of 5 -> 0.8; abcd/abxy: distance 2 of 4 = 0.5, at the threshold -> 0.
    assert scores == pytest.approx([0.8, 0.0, 0.0, 1.0, 0.8])
    metric.update(["hello", "abc"], [["hallo"], ["xyz"]])
    assert metric.compute().item() == pytest.approx(0.4, abs=1e-6)


def test_relaxed_accuracy_tolerance() -> None:
    metric = RelaxedAccuracy()
    scores = metric.per_sample_scores(
        ["10.4", "10.6", "40%", "Yes", "0", "1", "blue"],
        [["10"], ["10"], ["0.41"], ["yes"], ["0.0"], ["0"], ["red", "Blue "]],
    )
    # 4 % off -> correct; 6 % off -> wrong; 0.40 vs 0.41 is 2.4 % off -> correct.
    assert scores == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]


def test_exact_match_normalization() -> None:
    metric = ExactMatch()
    metric.update(["Circle.", " dark  Blue", "A", "B"], [["circle"], ["dark blue"], ["a"], ["C"]])
    assert metric.compute().item() == pytest.approx(0.75)


def test_yes_no_f1_confusion_counts() -> None:
    metric = YesNoF1()
    preds = ["yes", "no", "Yes.", "No, there is not.", "Yes there is a dog"]
    targets = [["yes"], ["yes"], ["no"], ["no"], ["yes"]]
    metric.update(preds, targets)
    # TP = 2, FN = 1, FP = 1, TN = 1: F1 = 4 / 6, accuracy = 3 / 5.
    assert metric.true_positives.item() == 2
    assert metric.false_positives.item() == 1
    assert metric.false_negatives.item() == 1
    assert metric.compute().item() == pytest.approx(2 / 3, abs=1e-6)
    assert metric.accuracy().item() == pytest.approx(0.6, abs=1e-6)


def test_metric_accumulates_and_resets() -> None:
    metric = ExactMatch()
    metric.update(["a"], [["a"]])
    metric.update(["b", "c"], [["x"], ["c"]])
    assert metric.compute().item() == pytest.approx(2 / 3, abs=1e-6)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute().item() == 0.0
    metric.update(["b"], [["b"]])
    assert metric.compute().item() == 1.0


def test_metric_merges_states_like_ddp() -> None:
    # Two ranks' states summed give the score of the union, as the "sum" reduction does under DDP.
    first, second = VQAAccuracy(), VQAAccuracy()
    first.update(["cat"], [["cat"] * 2 + ["dog"] * 8])
    second.update(["dog", "cow"], [["dog"] * 10, ["cat"] * 10])
    first.merge_state(second)
    assert first.compute().item() == pytest.approx((0.6 + 1.0 + 0.0) / 3, abs=1e-6)


@pytest.mark.parametrize(
    ("benchmark", "metric_type"),
    [
        ("vqav2", VQAAccuracy),
        ("TextVQA", VQAAccuracy),
        ("docvqa", ANLS),
        ("infovqa", ANLS),
        ("chartqa", RelaxedAccuracy),
        ("gqa", ExactMatch),
        ("ai2d", ExactMatch),
        ("scienceqa", ExactMatch),
        ("easy-vqa", ExactMatch),
        ("easyvqa", ExactMatch),
        ("pope", YesNoF1),
    ],
)
def test_build_metric_mapping(benchmark: str, metric_type: type) -> None:
    assert type(build_metric(benchmark)) is metric_type


def test_build_metric_unknown_benchmark() -> None:
    with pytest.raises(ValueError, match="unknown benchmark 'mmmu'.*textvqa"):
        build_metric("mmmu")


def test_update_rejects_mismatched_inputs() -> None:
    metric = ExactMatch()
    with pytest.raises(ValueError, match="2 predictions but 1 target"):
        metric.update(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="expected a list of reference answers"):
        metric.update(["a"], ["a"])
    with pytest.raises(ValueError, match="targets\\[0\\] is empty"):
        metric.update(["a"], [[]])


def test_compute_returns_float_scalar() -> None:
    metric = ANLS()
    metric.update(["x"], [["x"]])
    value = metric.compute()
    assert value.dtype == torch.float32
    assert value.ndim == 0
    assert math.isclose(value.item(), 1.0)
