"""Write the easy-VQA data shipped by the `easy-vqa` package as InternVL jsonl plus image files.

    python datamodules/prepare_easyvqa.py --output-dir data/easyvqa

Writes ``train.jsonl``, ``test.jsonl`` and ``images/{train,test}/<image id>.png`` (the package's
PNG files, copied byte for byte). Image paths in the jsonl (``images/train/0.png``) are relative
to the output directory, so pass ``--images-dir <output-dir>`` to the clustering and split scripts.

- train: one record per image, one multi-turn conversation holding all of that image's questions
  in the package's order, with `<image>` in the first human turn.
- test: one record per question, with `question_id`, `question`, `gt_answers` (a one-element
  list), `benchmark: "easyvqa"` and `question_type`.

`question_type` comes from the answer, which is exact for this dataset because its answer set
splits into disjoint groups: "yes"/"no" gives ``yes/no``, a shape name (circle, rectangle,
triangle) gives ``shape``, and a colour name gives ``color``. Every question of each group asks
for that kind of answer ("is there a ...", "what shape ...", "what color ...").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import easy_vqa

BENCHMARK = "easyvqa"
YES_NO = ("yes", "no")
SHAPES = ("circle", "rectangle", "triangle")


def question_type(answer: str) -> str:
    """Return `yes/no`, `shape` or `color` for an easy-VQA answer.

    Raises:
        ValueError: `answer` is not in the package's answer list.
    """
    if answer in YES_NO:
        return "yes/no"
    if answer in SHAPES:
        return "shape"
    if answer in easy_vqa.get_answers():
        return "color"
    raise ValueError(f"{answer!r} is not an easy-VQA answer; expected one of {easy_vqa.get_answers()}.")


def _group_by_image(
    texts: list[str], answers: list[str], image_ids: list[int]
) -> dict[int, list[tuple[str, str]]]:
    grouped: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for text, answer, image_id in zip(texts, answers, image_ids, strict=True):
        grouped[image_id].append((text, answer))
    return grouped


def train_records(max_images: int | None = None) -> list[dict[str, Any]]:
    """Build the training records: one multi-turn conversation per image, in image-id order."""
    grouped = _group_by_image(*easy_vqa.get_train_questions())
    image_ids = sorted(grouped)[:max_images]
    records = []
    for image_id in image_ids:
        conversations = []
        for turn, (text, answer) in enumerate(grouped[image_id]):
            prompt = f"<image>\n{text}" if turn == 0 else text
            conversations.append({"from": "human", "value": prompt})
            conversations.append({"from": "gpt", "value": answer})
        records.append(
            {
                "id": f"easyvqa-train-{image_id}",
                "image": f"images/train/{image_id}.png",
                "conversations": conversations,
            }
        )
    return records


def test_records(max_images: int | None = None) -> list[dict[str, Any]]:
    """Build the test records: one per question, ordered by image id and then package order.

    `question_id` is the question's position in the package's test question list, as a string,
    so it stays the same whatever `max_images` is.
    """
    texts, answers, image_ids = easy_vqa.get_test_questions()
    kept = set(sorted(set(image_ids))[:max_images])
    rows = [(image_id, index) for index, image_id in enumerate(image_ids) if image_id in kept]
    records = []
    for image_id, index in sorted(rows):
        text, answer = texts[index], answers[index]
        records.append(
            {
                "id": f"easyvqa-test-{index}",
                "question_id": str(index),
                "image": f"images/test/{image_id}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{text}"},
                    {"from": "gpt", "value": answer},
                ],
                "question": text,
                "gt_answers": [answer],
                "benchmark": BENCHMARK,
                "question_type": question_type(answer),
            }
        )
    return records


def _write_jsonl(records: Iterable[dict[str, Any]], path: Path) -> None:
    """Write under a temporary name and rename, so a finished-looking file is always complete."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(partial, path)


def _copy_images(records: list[dict[str, Any]], sources: dict[int, str], output_dir: Path) -> int:
    copied = 0
    for relative in sorted({record["image"] for record in records}):
        image_id = int(Path(relative).stem)
        target = output_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sources[image_id], target)
        copied += 1
    return copied


def prepare(
    output_dir: str | Path, max_train_images: int | None = None, max_test_images: int | None = None
) -> dict[str, Any]:
    """Write the easy-VQA jsonl files and images to `output_dir`; return counts of what was written."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    train = train_records(max_train_images)
    test = test_records(max_test_images)
    train_images = _copy_images(train, easy_vqa.get_train_image_paths(), output_dir)
    test_images = _copy_images(test, easy_vqa.get_test_image_paths(), output_dir)
    _write_jsonl(train, output_dir / "train.jsonl")
    _write_jsonl(test, output_dir / "test.jsonl")
    return {
        "train_records": len(train),
        "train_questions": sum(len(record["conversations"]) // 2 for record in train),
        "train_images": train_images,
        "test_records": len(test),
        "test_images": test_images,
        "test_question_types": dict(sorted(Counter(record["question_type"] for record in test).items())),
    }


def _positive_or_none(value: str) -> int | None:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of images, got {value}")
    return number


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output-dir", required=True, type=Path, help="directory for the jsonl files and images/"
    )
    parser.add_argument(
        "--max-train-images",
        type=_positive_or_none,
        default=None,
        help="keep only the first N training images by id, with all their questions (default: all 4000)",
    )
    parser.add_argument(
        "--max-test-images",
        type=_positive_or_none,
        default=None,
        help="keep only the questions of the first N test images by id (default: all 1000)",
    )
    args = parser.parse_args(argv)
    counts = prepare(args.output_dir, args.max_train_images, args.max_test_images)
    print(f"Wrote easy-VQA to {args.output_dir}:")
    for key, value in counts.items():
        print(f"  {key}: {value}")
    return counts


if __name__ == "__main__":
    main()
