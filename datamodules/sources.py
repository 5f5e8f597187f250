"""Readers for the source formats: InternVL jsonl, LLaVA-style json and InternVL mixture files.

Every reader yields one `RawRecord` per input record, malformed ones included, so that the split
can account for each input line. `parse_record` turns a raw record into a `SourceRecord` (image
paths and a normalised conversation) or raises `RecordError` with the reason for skipping it.

InternVL jsonl: one JSON object per line, ``{"id", "image": str | list[str], "conversations":
[{"from": "system"|"human"|"gpt", "value": str}, ...]}``, with ``<image>`` in a human turn.
LLaVA json: one JSON array of objects of the same shape. A mixture ("meta") file maps dataset
names to ``{"root", "annotation", "repeat_time"}``, as in InternVL's fine-tuning scripts.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"

# Role spellings seen in InternVL and LLaVA data, mapped to the InternVL names.
ROLE_ALIASES = {
    "system": "system",
    "human": "human",
    "user": "human",
    "gpt": "gpt",
    "assistant": "gpt",
}

# Skip reasons written to the manifest. They are fixed strings so that counts can be grouped.
REASON_MALFORMED = "malformed line"
REASON_NO_CONVERSATION = "no conversation"
REASON_MISSING_IMAGE = "missing image"
REASON_UNREADABLE_IMAGE = "unreadable image"
REASON_PLACEHOLDERS = "image placeholder count"
REASON_TEXT_ONLY = "text-only record"
REASON_MISSING_FEATURE = "missing feature"
REASON_BLANK = "blank line"


class RecordError(ValueError):
    """A source record that cannot be used; `reason` is one of the `REASON_*` strings."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of a mixture: where its annotation and images are, and its sampling weight."""

    name: str
    annotation: Path
    root: Path
    repeat_time: float = 1.0


@dataclass(frozen=True)
class RawRecord:
    """One input record as read, before validation.

    `line` is the 1-based line number in a jsonl file, or the 1-based position in a json array.
    `data` is the decoded object, or None when the line is blank or not valid JSON, in which case
    `error` contains the `RecordError` to report.
    """

    dataset: DatasetEntry
    line: int
    data: dict[str, Any] | None
    error: RecordError | None = None


@dataclass
class SourceRecord:
    """A validated record: image paths relative to the dataset root and a normalised conversation."""

    raw: RawRecord
    id: str
    images: list[str]
    conversations: list[dict[str, str]]
    extra: dict[str, Any] = field(default_factory=dict)
    """Evaluation fields copied through unchanged (`question_id`, `gt_answers`, ...)."""


# Fields copied from a source record into the shard json as they are.
EVAL_FIELDS = ("question_id", "question", "gt_answers", "benchmark", "question_type")


def iter_jsonl(dataset: DatasetEntry) -> Iterator[RawRecord]:
    """Yield every line of an InternVL jsonl file; blank and malformed lines become errors."""
    with open(dataset.annotation, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                yield RawRecord(dataset, line_number, None, RecordError(REASON_BLANK, "the line is empty"))
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                detail = f"{dataset.annotation} line {line_number} is not valid JSON ({error.msg} at column {error.colno})"
                yield RawRecord(dataset, line_number, None, RecordError(REASON_MALFORMED, detail))
                continue
            if not isinstance(data, dict):
                detail = f"{dataset.annotation} line {line_number} contains a JSON {type(data).__name__}, not an object"
                yield RawRecord(dataset, line_number, None, RecordError(REASON_MALFORMED, detail))
                continue
            yield RawRecord(dataset, line_number, data)


def iter_json_array(dataset: DatasetEntry) -> Iterator[RawRecord]:
    """Yield every element of a LLaVA-style json array; `line` is the 1-based element position.

    Raises:
        ValueError: the file is not valid JSON or does not hold an array, so no record can be read.
    """
    try:
        data = json.loads(Path(dataset.annotation).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{dataset.annotation} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}). "
            "HINT: a .json annotation must contain one array of records; use .jsonl for one record per line."
        ) from error
    if not isinstance(data, list):
        raise ValueError(
            f"{dataset.annotation} contains a JSON {type(data).__name__}; a LLaVA-style .json annotation "
            "must contain an array of records."
        )
    for position, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            detail = f"{dataset.annotation} element {position} is a JSON {type(item).__name__}, not an object"
            yield RawRecord(dataset, position, None, RecordError(REASON_MALFORMED, detail))
            continue
        yield RawRecord(dataset, position, item)


def iter_raw_records(dataset: DatasetEntry) -> Iterator[RawRecord]:
    """Yield the records of one annotation file, choosing the reader by its suffix (.jsonl or .json)."""
    suffix = Path(dataset.annotation).suffix.lower()
    if suffix == ".jsonl":
        return iter_jsonl(dataset)
    if suffix == ".json":
        return iter_json_array(dataset)
    raise ValueError(
        f"Unsupported annotation file {dataset.annotation}: expected .jsonl (InternVL) or .json (LLaVA)."
    )


def _normalise_conversations(conversations: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(conversations, list) or not conversations:
        raise RecordError(REASON_NO_CONVERSATION, f"{where} has no `conversations` list")
    turns = []
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RecordError(REASON_NO_CONVERSATION, f"{where} turn {index} has no string `value`")
        role = ROLE_ALIASES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise RecordError(
                REASON_NO_CONVERSATION,
                f"{where} turn {index} has role {turn.get('from')!r}; expected one of {sorted(ROLE_ALIASES)}",
            )
        turns.append({"from": role, "value": turn["value"]})
    if not any(turn["from"] == "gpt" for turn in turns):
        raise RecordError(REASON_NO_CONVERSATION, f"{where} has no assistant (`gpt`) turn to learn from")
    if not any(turn["from"] == "human" for turn in turns):
        raise RecordError(REASON_NO_CONVERSATION, f"{where} has no `human` turn")
    return turns


def _insert_placeholders(turns: list[dict[str, str]], n_images: int, where: str) -> None:
    """Put one `<image>` per image in the conversation, the way InternVL's loader does.

    A record without any `<image>` gets them prepended to its first human turn. A record whose
    count differs from its number of images is rejected, because the images could not be placed.
    """
    found = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in turns)
    if found == n_images:
        return
    if found == 0:
        first_human = next(turn for turn in turns if turn["from"] == "human")
        first_human["value"] = f"{IMAGE_PLACEHOLDER}\n" * n_images + first_human["value"]
        return
    raise RecordError(
        REASON_PLACEHOLDERS,
        f"{where} has {found} {IMAGE_PLACEHOLDER} placeholders for {n_images} images",
    )


def parse_record(raw: RawRecord) -> SourceRecord:
    """Validate a raw record and return its image list and normalised conversation.

    Raises:
        RecordError: the line was malformed or blank, the record has no usable conversation,
            or its `<image>` placeholders do not match its images.
    """
    if raw.error is not None:
        raise raw.error
    assert raw.data is not None
    data = raw.data
    where = f"{raw.dataset.annotation} line {raw.line}"

    image_field = data.get("image")
    if image_field is None or image_field == []:
        images: list[str] = []
    elif isinstance(image_field, str):
        images = [image_field]
    elif isinstance(image_field, list) and all(isinstance(path, str) for path in image_field):
        images = list(image_field)
    else:
        raise RecordError(REASON_MALFORMED, f"{where} has `image` of type {type(image_field).__name__}")

    turns = _normalise_conversations(data.get("conversations"), where)
    _insert_placeholders(turns, len(images), where)
    record_id = str(data.get("id", f"{raw.dataset.name}:{raw.line}"))
    extra = {name: data[name] for name in EVAL_FIELDS if name in data}
    return SourceRecord(raw=raw, id=record_id, images=images, conversations=turns, extra=extra)


def _as_repeat_time(value: Any, name: str, meta_path: Path) -> float:
    try:
        repeat_time = float(value)
    except (TypeError, ValueError):
        repeat_time = math.nan
    if not math.isfinite(repeat_time) or repeat_time <= 0:
        raise ValueError(
            f"{meta_path}: dataset {name!r} has repeat_time={value!r}; it must be a number > 0 "
            "(1 samples the dataset at its size, 2 twice as often, 0.5 half as often)."
        )
    return repeat_time


def load_meta(meta_path: str | Path) -> list[DatasetEntry]:
    """Read an InternVL mixture file: ``{name: {"root", "annotation", "repeat_time"}}``.

    Relative `root` and `annotation` paths are taken relative to the current directory, as
    InternVL's training scripts do. Other keys InternVL uses (`data_augment`, `length`, ...) are
    ignored.

    Raises:
        ValueError: listing every dataset entry that lacks a field or has an invalid repeat_time.
        FileNotFoundError: an annotation file is missing.
    """
    meta_path = Path(meta_path)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or not meta:
        raise ValueError(
            f"{meta_path} must contain a non-empty JSON object of datasets, got {type(meta).__name__}."
        )
    problems = []
    entries = []
    for name, spec in meta.items():
        if not isinstance(spec, dict):
            problems.append(f"dataset {name!r} is a {type(spec).__name__}, not an object")
            continue
        missing = [key for key in ("root", "annotation") if key not in spec]
        if missing:
            problems.append(f"dataset {name!r} lacks {', '.join(missing)}")
            continue
        try:
            repeat_time = _as_repeat_time(spec.get("repeat_time", 1), name, meta_path)
        except ValueError as error:
            problems.append(str(error))
            continue
        root = Path(spec["root"]).resolve()
        annotation = Path(spec["annotation"]).resolve()
        if not annotation.is_file():
            problems.append(f"dataset {name!r}: annotation file {annotation} not found")
            continue
        entries.append(DatasetEntry(name=name, annotation=annotation, root=root, repeat_time=repeat_time))
    if problems:
        raise ValueError(f"{meta_path} has invalid entries:\n  " + "\n  ".join(problems))
    return entries
