"""Per-sample encoding of shard samples and their collation into the batch format.

The batch keys and shapes are fixed in ``docs/architecture.md``. Training batches contain
``pixel_values``, ``input_ids``, ``attention_mask`` and ``labels``, and evaluation batches add the
left-padded prompt, the question fields and the route. Encoders and collators are top-level
classes so that DataLoader workers can pickle them.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from typing import Any

import torch

from datamodules.chat import IGNORE_INDEX, ConversationEncoder, SampleTooLong, pad_left, pad_right
from datamodules.images import decode_rgb

log = logging.getLogger(__name__)

SKIP_UNREADABLE_IMAGE = "unreadable image"
SKIP_TOO_LONG = "over max_length"


class SkipCounter:
    """Counts skipped samples by reason and logs a warning at the 1st, 2nd, 4th, 8th, ... skip.

    Each DataLoader worker has its own copy, so the counts and warnings are per worker process.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: Counter[str] = Counter()
        self.seen = 0

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        total = sum(self.counts.values())
        # Powers of two: a bad shard warns about 20 times per million samples, not a million.
        if total & (total - 1) == 0:
            log.warning(
                "%s skipped a sample (%s: %s); %d skipped of %d seen in this process so far: %s",
                self.name,
                reason,
                detail,
                total,
                self.seen,
                dict(self.counts),
            )


def _sample_images(sample: dict[str, Any], meta: dict[str, Any]) -> list[Any]:
    return [decode_rgb(sample[member]) for member in meta["images"]]


class TrainSampleEncoder:
    """Decode a raw shard sample into (input_ids, labels, pixel_values), or None to skip it.

    Samples whose images do not decode, and samples that `ConversationEncoder` rejects as too
    long, are counted in `skips` and return None.
    """

    def __init__(self, encoder: ConversationEncoder) -> None:
        self.encoder = encoder
        self.skips = SkipCounter("training data")

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        self.skips.seen += 1
        meta = json.loads(sample["json"])
        where = f"{sample.get('__url__', '?')} key {sample.get('__key__', '?')} ({meta.get('source')} line {meta.get('line')})"
        try:
            images = _sample_images(sample, meta)
        except (OSError, ValueError, KeyError) as error:
            self.skips.add(SKIP_UNREADABLE_IMAGE, f"{where}: {error}")
            return None
        pixel_values, tiles = self.encoder.encode_images(images)
        try:
            text = self.encoder.encode_text(meta["conversations"], tiles)
        except SampleTooLong as error:
            self.skips.add(SKIP_TOO_LONG, f"{where}: {error}")
            return None
        return {"input_ids": text.input_ids, "labels": text.labels, "pixel_values": pixel_values}


def _route_scores(meta: dict[str, Any], n_experts: int) -> list[float]:
    scores = meta.get("route_scores")
    if scores is None or len(scores) != n_experts:
        return [math.nan] * n_experts
    return [float(score) for score in scores]


class EvalSampleEncoder:
    """Decode an evaluation sample; unlike training, a sample that cannot be encoded raises.

    Skipping an evaluation question would silently change the score, so an over-long sample or
    an unreadable image raises `ValueError` naming the question.
    """

    def __init__(self, encoder: ConversationEncoder, n_experts: int) -> None:
        self.encoder = encoder
        self.n_experts = n_experts

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        meta = json.loads(sample["json"])
        question_id = str(meta.get("question_id", meta.get("id")))
        try:
            images = _sample_images(sample, meta)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(
                f"Evaluation question {question_id} ({meta.get('source')} line {meta.get('line')}): its image "
                f"could not be decoded ({error}). HINT: re-run split_dataset.py on readable images."
            ) from error
        pixel_values, tiles = self.encoder.encode_images(images)
        try:
            text = self.encoder.encode_text(meta["conversations"], tiles)
        except SampleTooLong as error:
            raise ValueError(
                f"Evaluation question {question_id} does not fit: {error}. HINT: raise max_length; evaluation "
                "samples are never skipped, because a skipped question would change the score."
            ) from error
        return {
            "input_ids": text.input_ids,
            "labels": text.labels,
            "prompt_ids": text.prompt_ids,
            "pixel_values": pixel_values,
            "question_id": question_id,
            "question": str(meta.get("question", _first_question(meta["conversations"]))),
            "gt_answers": [
                str(answer) for answer in meta.get("gt_answers", _last_answer(meta["conversations"]))
            ],
            "benchmark": str(meta.get("benchmark", meta.get("dataset", ""))),
            "question_type": str(meta.get("question_type", "")),
            "expert": int(meta["expert"]),
            "route_scores": _route_scores(meta, self.n_experts),
        }


def _first_question(conversations: list[dict[str, str]]) -> str:
    text = next(turn["value"] for turn in conversations if turn["from"] == "human")
    return text.replace("<image>", "").strip()


def _last_answer(conversations: list[dict[str, str]]) -> list[str]:
    return [next(turn["value"] for turn in reversed(conversations) if turn["from"] == "gpt")]


def _stack_pixel_values(samples: list[dict[str, Any]]) -> torch.Tensor | None:
    tiles = [sample["pixel_values"] for sample in samples if sample["pixel_values"] is not None]
    return torch.cat(tiles) if tiles else None  # (T, 3, H, W)


class TrainCollator:
    """Right-pad a list of encoded samples into a training batch."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids = [sample["input_ids"] for sample in samples]
        return {
            "pixel_values": _stack_pixel_values(samples),
            "input_ids": pad_right(input_ids, self.pad_token_id),  # (B, L)
            "attention_mask": pad_right([torch.ones_like(ids) for ids in input_ids], 0),  # (B, L)
            "labels": pad_right([sample["labels"] for sample in samples], IGNORE_INDEX),  # (B, L)
        }


class EvalCollator(TrainCollator):
    """Collate evaluation samples: the training keys, the left-padded prompt and the question fields."""

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(samples)
        prompts = [sample["prompt_ids"] for sample in samples]
        batch["prompt_input_ids"] = pad_left(prompts, self.pad_token_id)  # (B, Lp)
        batch["prompt_attention_mask"] = pad_left([torch.ones_like(ids) for ids in prompts], 0)  # (B, Lp)
        for key in ("question_id", "question", "benchmark", "question_type", "gt_answers"):
            batch[key] = [sample[key] for sample in samples]
        batch["expert"] = torch.tensor([sample["expert"] for sample in samples], dtype=torch.long)  # (B,)
        batch["route_scores"] = torch.tensor(
            [sample["route_scores"] for sample in samples], dtype=torch.float32
        )  # (B, K)
        return batch
