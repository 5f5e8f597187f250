"""Prediction files and the script that combines per-expert results."""

import json
from pathlib import Path

import numpy as np
import pytest

from lightning_modules.predictions import read_predictions, records_from_batch, write_predictions


def _record(question_id: str, answer: str, expert: int = 0, gt: str | None = None) -> dict:
    return {
        "question_id": question_id,
        "question": f"what is {question_id}?",
        "answer": answer,
        "gt_answers": [gt if gt is not None else answer],
        "expert": expert,
        "benchmark": "easyvqa",
    }


def test_predictions_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "predictions.jsonl"
    records = [_record("q1", "circle"), _record("q2", "red", expert=1) | {"route_similarity": 0.75}]
    assert write_predictions(path, records) == 2
    assert read_predictions(path) == records
    # Only the final file is left: the temporary file was renamed.
    assert [p.name for p in path.parent.iterdir()] == ["predictions.jsonl"]


def test_predictions_normalize_ids(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    write_predictions(path, [_record("x", "a") | {"question_id": 7, "expert": np.int64(3)}])
    (record,) = read_predictions(path)
    assert record["question_id"] == "7"
    assert record["expert"] == 3
    assert type(record["expert"]) is int


def test_predictions_write_rejects_bad_records(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    bad = _record("q1", "a")
    del bad["answer"]
    with pytest.raises(ValueError, match="record 1: missing field 'answer'"):
        write_predictions(path, [_record("q0", "a"), bad])
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_predictions_overwrite_keeps_old_file_on_error(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    write_predictions(path, [_record("q0", "a")])
    with pytest.raises(ValueError, match="'gt_answers' must be list"):
        write_predictions(path, [_record("q0", "b") | {"gt_answers": "b"}])
    assert read_predictions(path)[0]["answer"] == "a"


def test_predictions_read_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(_record("q0", "a")) + "\n\n{not json\n")
    with pytest.raises(ValueError, match="p.jsonl:3: not valid JSON"):
        read_predictions(path)
    path.write_text(json.dumps(_record("q0", "a") | {"expert": "0"}) + "\n")
    with pytest.raises(ValueError, match="p.jsonl:1: field 'expert' must be int"):
        read_predictions(path)


def test_records_from_batch() -> None:
    batch = {
        "question_id": ["a", "b"],
        "question": ["q a", "q b"],
        "gt_answers": [["x"], ["y", "z"]],
        "benchmark": ["textvqa", "textvqa"],
    }
    records = records_from_batch(batch, ["x", "w"], [1, 0])
    assert records[1] == {
        "question_id": "b",
        "question": "q b",
        "answer": "w",
        "gt_answers": ["y", "z"],
        "expert": 0,
        "benchmark": "textvqa",
    }
    with pytest.raises(ValueError, match="2 questions but got 1 answers"):
        records_from_batch(batch, ["x"], [1, 0])
