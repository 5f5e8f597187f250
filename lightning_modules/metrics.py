"""Benchmark metrics for visual question answering, as torchmetrics ``Metric`` objects.

Every metric takes the same input: ``update(preds, targets)`` with ``preds`` a list of B model
answers and ``targets`` a list of B lists of reference answers (10 human answers for VQAv2 and
TextVQA, one or a few for the others). ``compute()`` returns a scalar tensor in [0, 1].

| benchmark | metric |
| --- | --- |
| vqav2, textvqa | ``VQAAccuracy``: min(1, matches / 3) over leave-one-out subsets of the answers |
| docvqa, infovqa | ``ANLS``: average normalised Levenshtein similarity, threshold 0.5 |
| chartqa | ``RelaxedAccuracy``: numbers within 5 % of the target, exact match otherwise |
| gqa, ai2d, scienceqa, easyvqa | ``ExactMatch`` after lower-casing and whitespace clean-up |
| pope | ``YesNoF1``: F1 of the "yes" class |

All metrics except ``YesNoF1`` are means of per-sample scores, and ``per_sample_scores`` returns
those scores, so that a caller can check that a union of disjoint prediction sets scores the
size-weighted mean of its parts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from rapidfuzz.distance import Levenshtein
from torchmetrics import Metric

__all__ = [
    "ANLS",
    "BENCHMARK_METRICS",
    "ExactMatch",
    "MeanScoreMetric",
    "RelaxedAccuracy",
    "VQAAccuracy",
    "YesNoF1",
    "build_metric",
    "normalize_vqa_answer",
]


def _check_inputs(preds: Sequence[str], targets: Sequence[Sequence[str]]) -> None:
    """Raise ``ValueError`` unless ``preds`` is a list of strings and ``targets`` a list of string lists of the same length."""
    if isinstance(preds, str) or isinstance(targets, str):
        raise ValueError(
            "preds and targets must be lists (one entry per question), got a single string. "
            "HINT: wrap a single answer as update([answer], [[reference, ...]])."
        )
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} predictions but {len(targets)} target lists; they must match.")
    for i, refs in enumerate(targets):
        if isinstance(refs, str):
            raise ValueError(
                f"targets[{i}] is the string {refs!r}, expected a list of reference answers. "
                f"HINT: pass [[{refs!r}]] for a single reference."
            )
        if len(refs) == 0:
            raise ValueError(f"targets[{i}] is empty: every question needs at least one reference answer.")


# ---------------------------------------------------------------------------------------------
# VQA answer normalisation (VQAv2 / TextVQA evaluation rules)
# ---------------------------------------------------------------------------------------------

# Punctuation that the VQA rules delete or turn into a space. The apostrophe, colon and period
# are not in it: apostrophes belong to contractions, and periods have their own rule below.
_VQA_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# A period that is not followed by a digit, so "2.5" keeps its decimal point.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# English contractions in their written form. Answers often drop the apostrophes ("dont",
# "wouldnt've"), so the normaliser maps every apostrophe-less or partly apostrophe-less
# spelling back to the written form below.
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't",
    "don't", "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd",
    "how'll", "how's", "i'd", "i'd've", "i'm", "i've", "isn't", "it'd", "it'd've", "it'll",
    "let's", "ma'am", "mightn't", "mightn't've", "might've", "mustn't", "must've", "needn't",
    "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd", "she'd've", "she'll", "she's",
    "should've", "shouldn't", "shouldn't've", "somebody'd", "somebody'd've", "somebody'll",
    "somebody's", "someone'd", "someone'd've", "someone'll", "someone's", "something'd",
    "something'd've", "something'll", "that's", "there'd", "there'd've", "there're", "there's",
    "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't", "we'd", "we'd've",
    "we'll", "we're", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's",
    "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who're", "who's", "who've",
    "why'll", "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all",
    "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
)  # fmt: skip


_ORDINARY_WORDS = ("id", "ill", "its", "shell", "well", "were", "wed")


def _contraction_spellings() -> dict[str, str]:
    """Map each spelling of a contraction with one or more apostrophes left out to its written form."""
    spellings: dict[str, str] = {}
    for written in _CONTRACTIONS:
        parts = written.split("'")
        n_gaps = len(parts) - 1
        # Every subset of the apostrophes may be missing, except "none missing" (already correct).
        for mask in range(1, 2**n_gaps):
            pieces = [parts[0]]
            for gap in range(n_gaps):
                pieces.append("" if mask & (1 << gap) else "'")
                pieces.append(parts[gap + 1])
            spellings.setdefault("".join(pieces), written)
    # Spellings that are also ordinary words ("well", "were", "shell") keep their meaning.
    for word in _ORDINARY_WORDS:
        spellings.pop(word, None)
    return spellings


_CONTRACTION_SPELLINGS = _contraction_spellings()


def _strip_vqa_punctuation(text: str) -> str:
    """Apply the VQA punctuation rule: a mark next to a space is deleted, a mark inside a word becomes a space.

    A text with a comma between digits ("1,000") has every mark deleted, so numbers keep their
    digits together. Periods are deleted unless a digit follows.
    """
    # Every decision looks at the input text, not at the text as earlier marks left it.
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    output = text
    for mark in _VQA_PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or has_digit_comma:
            output = output.replace(mark, "")
        else:
            output = output.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", output)


def normalize_vqa_answer(answer: str) -> str:
    """Normalise an answer with the VQAv2 evaluation rules.

    Steps, in order: tabs and newlines become spaces; punctuation is deleted or replaced by a
    space; the text is lower-cased; number words up to ten become digits ("two" -> "2", "none"
    -> "0"); the articles a, an and the are dropped; contractions written without apostrophes
    get them back ("dont" -> "don't"); words are joined by single spaces.
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_vqa_punctuation(text)
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTION_SPELLINGS.get(word, word))
    return " ".join(words)


def _normalize_whitespace_case(text: str) -> str:
    """Lower-case ``text`` and collapse runs of whitespace to one space."""
    return " ".join(text.lower().split())


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


class MeanScoreMetric(Metric):
    """Base class for metrics that average a per-sample score in [0, 1] over all samples.

    Subclasses implement ``score_sample(pred, refs) -> float``. The states are a float64 sum
    and a sample count, both summed across processes.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    #: Name used in log keys such as ``val/ensemble/<metric_name>``.
    metric_name: str = "score"

    score_sum: torch.Tensor
    count: torch.Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def score_sample(self, pred: str, refs: Sequence[str]) -> float:
        raise NotImplementedError

    def per_sample_scores(self, preds: Sequence[str], targets: Sequence[Sequence[str]]) -> list[float]:
        """Score each prediction against its references without touching the metric state."""
        _check_inputs(preds, targets)
        return [self.score_sample(pred, refs) for pred, refs in zip(preds, targets, strict=True)]

    def update(self, preds: Sequence[str], targets: Sequence[Sequence[str]]) -> None:
        """Add B predictions and their B reference lists."""
        scores = self.per_sample_scores(preds, targets)
        self.score_sum += sum(scores)
        self.count += len(scores)

    def compute(self) -> torch.Tensor:
        """Return the mean score as a float32 scalar; 0 when no sample was seen."""
        if self.count == 0:
            return torch.tensor(0.0)
        return (self.score_sum / self.count).float()


class VQAAccuracy(MeanScoreMetric):
    """VQAv2 / TextVQA accuracy.

    Both the prediction and the references are normalised with ``normalize_vqa_answer``. With n
    references (10 in VQAv2 and TextVQA) the score is the mean over the n leave-one-out subsets
    of min(1, matches / 3), where matches counts the subset's answers equal to the prediction.
    With 10 references, an answer given by 4 or more humans scores 1, by 3 humans 0.9, by 2
    humans 0.6 and by 1 human 0.3. With a single reference there is no leave-one-out subset, and the score is an
    exact match of the normalised strings.
    """

    metric_name = "vqa_accuracy"

    def score_sample(self, pred: str, refs: Sequence[str]) -> float:
        answer = normalize_vqa_answer(pred)
        normalized_refs = [normalize_vqa_answer(ref) for ref in refs]
        if len(normalized_refs) == 1:
            return float(answer == normalized_refs[0])
        total_matches = sum(ref == answer for ref in normalized_refs)
        subset_scores = []
        for ref in normalized_refs:
            # Matches among the other n - 1 answers: leave this reference out.
            matches = total_matches - (ref == answer)
            subset_scores.append(min(1.0, matches / 3.0))
        return sum(subset_scores) / len(subset_scores)


class ANLS(MeanScoreMetric):
    """Average normalised Levenshtein similarity (DocVQA, InfoVQA).

    Strings are lower-cased and whitespace-collapsed. Per reference, the normalised distance is
    the Levenshtein distance divided by the longer string's length; the similarity is 1 minus
    that distance, or 0 when the distance is ``threshold`` (0.5) or more. A sample scores the
    maximum similarity over its references.
    """

    metric_name = "anls"

    def __init__(self, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}.")
        self.threshold = threshold

    def score_sample(self, pred: str, refs: Sequence[str]) -> float:
        answer = _normalize_whitespace_case(pred)
        best = 0.0
        for ref in refs:
            distance = Levenshtein.normalized_distance(answer, _normalize_whitespace_case(ref))
            similarity = 1.0 - distance if distance < self.threshold else 0.0
            best = max(best, similarity)
        return best


def _parse_number(text: str) -> float | None:
    """Parse ``text`` as a float; a trailing "%" divides by 100. Return None if it is not a number."""
    text = text.strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text)
    except ValueError:
        return None


class RelaxedAccuracy(MeanScoreMetric):
    """ChartQA relaxed accuracy.

    When both prediction and reference parse as numbers ("12.5", "40%"), the prediction is
    correct if its relative difference from the reference is at most ``tolerance`` (5 %).
    Otherwise the strings must match after lower-casing and stripping. A sample scores 1 if it
    is correct for any reference.

    NOTE: a reference of 0 has no relative difference, so it requires the parsed prediction to
    equal 0; the pix2struct reference code compares the strings instead ("0.0" != "0" there).
    """

    metric_name = "relaxed_accuracy"

    def __init__(self, tolerance: float = 0.05, **kwargs) -> None:
        super().__init__(**kwargs)
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}.")
        self.tolerance = tolerance

    def _is_correct(self, pred: str, ref: str) -> bool:
        pred_number, ref_number = _parse_number(pred), _parse_number(ref)
        if pred_number is not None and ref_number is not None:
            if ref_number == 0.0:
                return pred_number == 0.0
            return abs(pred_number - ref_number) / abs(ref_number) <= self.tolerance
        return pred.strip().lower() == ref.strip().lower()

    def score_sample(self, pred: str, refs: Sequence[str]) -> float:
        return float(any(self._is_correct(pred, ref) for ref in refs))


class ExactMatch(MeanScoreMetric):
    """Exact match after lower-casing, collapsing whitespace and dropping one trailing period.

    Used for short closed-vocabulary answers: GQA words, AI2D and ScienceQA option letters,
    easy-VQA shapes and colours. A sample scores 1 if it matches any reference.
    """

    metric_name = "exact_match"

    @staticmethod
    def _normalize(text: str) -> str:
        text = _normalize_whitespace_case(text)
        return text[:-1].rstrip() if text.endswith(".") else text

    def score_sample(self, pred: str, refs: Sequence[str]) -> float:
        answer = self._normalize(pred)
        return float(any(answer == self._normalize(ref) for ref in refs))


def _to_yes_no(text: str) -> str:
    """Reduce a free-form answer to "yes" or "no" as the POPE evaluation does.

    An answer is "no" if it contains the word "no" or "not" (after lower-casing and stripping
    punctuation), and "yes" otherwise.
    """
    words = re.findall(r"[a-z']+", text.lower())
    return "no" if ("no" in words or "not" in words) else "yes"


class YesNoF1(Metric):
    """F1 score of the "yes" class for yes/no questions (POPE).

    Predictions and references are reduced to yes/no with the POPE rule (a "no" or "not" word
    means no). Only the first reference of each sample is used. ``compute`` returns
    2 TP / (2 TP + FP + FN), and 0 when that denominator is 0. ``accuracy()`` returns the
    share of correct answers, which POPE reports next to F1.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    metric_name = "yes_no_f1"

    true_positives: torch.Tensor
    false_positives: torch.Tensor
    false_negatives: torch.Tensor
    true_negatives: torch.Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("true_positives", "false_positives", "false_negatives", "true_negatives"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Sequence[Sequence[str]]) -> None:
        """Add B predictions and their B reference lists."""
        _check_inputs(preds, targets)
        for pred, refs in zip(preds, targets, strict=True):
            predicted_yes = _to_yes_no(pred) == "yes"
            actual_yes = _to_yes_no(refs[0]) == "yes"
            if predicted_yes and actual_yes:
                self.true_positives += 1
            elif predicted_yes:
                self.false_positives += 1
            elif actual_yes:
                self.false_negatives += 1
            else:
                self.true_negatives += 1

    def compute(self) -> torch.Tensor:
        """Return the F1 score of the "yes" class as a float32 scalar."""
        denominator = 2 * self.true_positives + self.false_positives + self.false_negatives
        if denominator == 0:
            return torch.tensor(0.0)
        return (2 * self.true_positives / denominator).float()

    def accuracy(self) -> torch.Tensor:
        """Return the share of correct yes/no answers (unsynchronised across processes)."""
        total = self.true_positives + self.false_positives + self.false_negatives + self.true_negatives
        if total == 0:
            return torch.tensor(0.0)
        return ((self.true_positives + self.true_negatives) / total).float()


#: Benchmark name (lower case) to the metric class that scores it.
BENCHMARK_METRICS: dict[str, type[Metric]] = {
    "vqav2": VQAAccuracy,
    "textvqa": VQAAccuracy,
    "docvqa": ANLS,
    "infovqa": ANLS,
    "chartqa": RelaxedAccuracy,
    "gqa": ExactMatch,
    "ai2d": ExactMatch,
    "scienceqa": ExactMatch,
    "easyvqa": ExactMatch,
    "pope": YesNoF1,
}


def build_metric(benchmark: str) -> MeanScoreMetric | YesNoF1:
    """Return a new metric object for ``benchmark`` (case-insensitive, "-" and "_" ignored).

    Raises ``ValueError`` for an unknown benchmark name and lists the known ones.
    """
    key = benchmark.lower().replace("-", "").replace("_", "")
    if key not in BENCHMARK_METRICS:
        raise ValueError(
            f"unknown benchmark {benchmark!r}; known benchmarks: {', '.join(sorted(BENCHMARK_METRICS))}. "
            "HINT: add it to BENCHMARK_METRICS in lightning_modules/metrics.py with the metric that scores it."
        )
    return BENCHMARK_METRICS[key]()
