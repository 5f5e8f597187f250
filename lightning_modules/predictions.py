"""Prediction files: one JSON object per line, one line per question.

Required fields of each record:

| field | type | meaning |
| --- | --- | --- |
| ``question_id`` | str | the evaluation record's id, unique within a benchmark |
| ``question`` | str | the question text |
| ``answer`` | str | the model's answer |
| ``gt_answers`` | list[str] | the reference answers |
| ``expert`` | int | the expert that answered (the routed one, or the fallback) |
| ``benchmark`` | str | benchmark name as known to ``lightning_modules.metrics.build_metric`` |

Extra fields (for example ``route_similarity``) are kept as they are. Files are written to a
temporary name in the same directory and renamed when complete, so a reader never sees a
partial file, even when another process publishes a new version while it reads.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "REQUIRED_FIELDS",
    "read_predictions",
    "records_from_batch",
    "validate_record",
    "write_predictions",
]

#: Field name to the Python type every record must carry.
REQUIRED_FIELDS: dict[str, type] = {
    "question_id": str,
    "question": str,
    "answer": str,
    "gt_answers": list,
    "expert": int,
    "benchmark": str,
}


def validate_record(record: Mapping[str, Any]) -> list[str]:
    """Return every problem of one record as a message; an empty list means it is valid."""
    problems = []
    for field, expected_type in REQUIRED_FIELDS.items():
        if field not in record:
            problems.append(f"missing field {field!r}")
            continue
        value = record[field]
        # bool is a subclass of int, but an expert id of True is a bug.
        if not isinstance(value, expected_type) or (expected_type is int and isinstance(value, bool)):
            problems.append(
                f"field {field!r} must be {expected_type.__name__}, got {type(value).__name__} {value!r}"
            )
    gt_answers = record.get("gt_answers")
    if isinstance(gt_answers, list) and not all(isinstance(answer, str) for answer in gt_answers):
        problems.append(f"field 'gt_answers' must contain only strings, got {gt_answers!r}")
    return problems


def _normalize_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Copy ``record`` with ``question_id`` as str and ``expert`` as int (numpy and tensor ids included)."""
    normalized = dict(record)
    if "question_id" in normalized and not isinstance(normalized["question_id"], str):
        normalized["question_id"] = str(normalized["question_id"])
    expert = normalized.get("expert")
    if expert is not None and not isinstance(expert, (int, bool)) and hasattr(expert, "__index__"):
        normalized["expert"] = int(expert)
    if isinstance(normalized.get("gt_answers"), tuple):
        normalized["gt_answers"] = list(normalized["gt_answers"])
    return normalized


def write_predictions(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Write ``records`` to ``path`` as jsonl, atomically, and return the number of lines written.

    Each record is checked against ``REQUIRED_FIELDS`` (a non-str ``question_id`` is converted to
    str, an integer-like ``expert`` to int) before anything is written; ``ValueError`` lists the
    first problems found. The parent directory is created if needed. The data go to a temporary
    file in the same directory, are flushed to disk, and the file is renamed over ``path``.
    """
    path = Path(path)
    normalized = [_normalize_record(record) for record in records]
    errors = []
    for index, record in enumerate(normalized):
        errors.extend(f"record {index}: {problem}" for problem in validate_record(record))
    if errors:
        shown = "; ".join(errors[:10])
        more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
        raise ValueError(f"invalid prediction records for {path}: {shown}{more}")

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in normalized:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return len(normalized)


def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a predictions jsonl file and validate every record.

    Blank lines are skipped. Raises ``FileNotFoundError`` when ``path`` does not exist and
    ``ValueError`` naming the file and line number for a line that is not JSON or misses a field.
    """
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg}).") from error
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}."
                )
            problems = validate_record(record)
            if problems:
                raise ValueError(f"{path}:{line_number}: {'; '.join(problems)}.")
            records.append(record)
    return records


def records_from_batch(
    batch: Mapping[str, Any], answers: Sequence[str], experts: Sequence[int]
) -> list[dict[str, Any]]:
    """Build one prediction record per sample of an evaluation batch.

    Args:
        batch: an evaluation batch with ``question_id``, ``question``, ``gt_answers`` and
            ``benchmark`` lists of length B.
        answers: the B model answers.
        experts: the B expert ids that produced them.
    """
    n = len(batch["question_id"])
    if len(answers) != n or len(experts) != n:
        raise ValueError(
            f"batch has {n} questions but got {len(answers)} answers and {len(experts)} experts."
        )
    return [
        {
            "question_id": str(batch["question_id"][i]),
            "question": batch["question"][i],
            "answer": answers[i],
            "gt_answers": list(batch["gt_answers"][i]),
            "expert": int(experts[i]),
            "benchmark": batch["benchmark"][i],
        }
        for i in range(n)
    ]
