"""Tests of datamodules/prepare_easyvqa.py on the data shipped with the easy-vqa package."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import easy_vqa
import pytest

from datamodules import prepare_easyvqa
from datamodules.sources import DatasetEntry, iter_raw_records, parse_record

REPO = Path(__file__).resolve().parents[1]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("easyvqa")
    counts = prepare_easyvqa.main(
        ["--output-dir", str(output), "--max-train-images", "5", "--max-test-images", "3"]
    )
    return output, counts


def test_question_type_from_answer() -> None:
    assert prepare_easyvqa.question_type("yes") == "yes/no"
    assert prepare_easyvqa.question_type("no") == "yes/no"
    assert prepare_easyvqa.question_type("triangle") == "shape"
    assert prepare_easyvqa.question_type("teal") == "color"
    with pytest.raises(ValueError, match="'purple' is not an easy-VQA answer"):
        prepare_easyvqa.question_type("purple")


def test_question_types_agree_with_questions() -> None:
    """Every question of a type requests that kind of answer, so typing by answer is exact."""
    texts, answers, _ = easy_vqa.get_test_questions()
    for text, answer in zip(texts, answers, strict=True):
        kind = prepare_easyvqa.question_type(answer)
        if kind == "color":
            assert "color" in text
        elif kind == "shape":
            assert text.startswith("what")
            assert "color" not in text
        else:
            assert not text.startswith("what")


def test_train_is_one_conversation_per_image(prepared) -> None:
    output, counts = prepared
    records = _read_jsonl(output / "train.jsonl")
    texts, answers, image_ids = easy_vqa.get_train_questions()
    expected = [(t, a) for t, a, i in zip(texts, answers, image_ids, strict=True) if i == 0]

    assert [r["image"] for r in records] == [f"images/train/{i}.png" for i in range(5)]
    first = records[0]["conversations"]
    assert [turn["from"] for turn in first] == ["human", "gpt"] * len(expected)
    assert first[0]["value"] == f"<image>\n{expected[0][0]}"
    assert [turn["value"] for turn in first[2::2]] == [t for t, _ in expected[1:]]
    assert [turn["value"] for turn in first[1::2]] == [a for _, a in expected]
    assert sum(turn["value"].count("<image>") for turn in first) == 1
    assert counts["train_records"] == 5
    assert counts["train_questions"] == sum(len(r["conversations"]) // 2 for r in records)


def test_test_is_one_record_per_question(prepared) -> None:
    output, counts = prepared
    records = _read_jsonl(output / "test.jsonl")
    texts, answers, image_ids = easy_vqa.get_test_questions()
    expected = [index for index, image_id in enumerate(image_ids) if image_id < 3]

    assert sorted(int(r["question_id"]) for r in records) == sorted(expected)
    assert len({r["question_id"] for r in records}) == len(records)
    for record in records:
        index = int(record["question_id"])
        assert record["question"] == texts[index]
        assert record["gt_answers"] == [answers[index]]
        assert record["benchmark"] == "easyvqa"
        assert record["question_type"] == prepare_easyvqa.question_type(answers[index])
        assert record["image"] == f"images/test/{image_ids[index]}.png"
        assert record["conversations"] == [
            {"from": "human", "value": f"<image>\n{texts[index]}"},
            {"from": "gpt", "value": answers[index]},
        ]
    assert counts["test_question_types"] == dict(sorted(Counter(r["question_type"] for r in records).items()))


def test_images_are_copied_byte_for_byte(prepared) -> None:
    output, _ = prepared
    sources = easy_vqa.get_test_image_paths()
    for image_id in range(3):
        assert (output / "images" / "test" / f"{image_id}.png").read_bytes() == Path(
            sources[image_id]
        ).read_bytes()
    assert len(list((output / "images" / "train").iterdir())) == 5


def test_output_parses_as_internvl_records(prepared) -> None:
    output, _ = prepared
    for name in ("train.jsonl", "test.jsonl"):
        dataset = DatasetEntry(name, output / name, output)
        for raw in iter_raw_records(dataset):
            record = parse_record(raw)
            assert (output / record.images[0]).is_file()


def test_script_runs_from_repository_root(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "datamodules/prepare_easyvqa.py",
            "--output-dir",
            str(tmp_path),
            "--max-train-images",
            "1",
            "--max-test-images",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "train_records: 1" in result.stdout
    assert (tmp_path / "train.jsonl").is_file()
