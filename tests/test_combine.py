"""Prediction files and the script that combines per-expert results."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clustering.combine_cluster_results_unified import combine_results, load_annotation_ids, main
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


# ---------------------------------------------------------------------------------------------
# clustering/combine_cluster_results_unified.py
# ---------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "clustering" / "combine_cluster_results_unified.py"


def _textvqa(question_id: str, answer: str, n_matching: int, expert: int) -> dict:
    # 10 references of which n_matching equal "yes": VQA accuracy of "yes" is 0.3 * n_matching (n <= 3).
    return {
        "question_id": question_id,
        "question": "?",
        "answer": answer,
        "gt_answers": ["yes"] * n_matching + ["no"] * (10 - n_matching),
        "expert": expert,
        "benchmark": "textvqa",
    }


@pytest.fixture
def two_expert_files(tmp_path: Path) -> tuple[Path, Path]:
    first = tmp_path / "expert0.jsonl"
    second = tmp_path / "expert1.jsonl"
    # Expert 0: scores 1.0 and 0.6. Expert 1: scores 0.3, 0.0 and 0.9.
    write_predictions(first, [_textvqa("1", "yes", 10, 0), _textvqa("2", "yes", 2, 0)])
    write_predictions(
        second, [_textvqa("3", "yes", 1, 1), _textvqa("4", "maybe", 5, 1), _textvqa("5", "yes", 3, 1)]
    )
    return first, second


def test_combine_union_equals_weighted_mean(two_expert_files: tuple[Path, Path]) -> None:
    report, union = combine_results(list(two_expert_files), "textvqa")
    assert [entry["n"] for entry in report["experts"]] == [2, 3]
    assert report["experts"][0]["score"] == pytest.approx(0.8)
    assert report["experts"][1]["score"] == pytest.approx(0.4)
    assert report["union"]["n"] == 5
    assert report["union"]["score"] == pytest.approx((1.0 + 0.6 + 0.3 + 0.0 + 0.9) / 5)
    assert report["weighted_mean"] == pytest.approx((2 * 0.8 + 3 * 0.4) / 5)
    assert report["check"]["passed"] is True
    assert report["duplicated"] == {}
    assert [record["question_id"] for record in union] == ["1", "2", "3", "4", "5"]
    assert [record["expert"] for record in union] == [0, 0, 1, 1, 1]


def test_combine_reports_duplicates_and_missing(tmp_path: Path) -> None:
    first = tmp_path / "a.jsonl"
    second = tmp_path / "b.jsonl"
    write_predictions(first, [_textvqa("1", "yes", 10, 0), _textvqa("2", "yes", 10, 0)])
    write_predictions(second, [_textvqa("2", "no", 10, 1), _textvqa("9", "yes", 10, 1)])
    annotation = tmp_path / "annotation.json"
    annotation.write_text(json.dumps({"data": [{"question_id": q} for q in (1, 2, 3, 4)]}))

    report, union = combine_results([first, second], "textvqa", annotation)
    assert report["duplicated"] == {"2": [str(first), str(second)]}
    assert report["missing"] == ["3", "4"]
    assert report["unexpected"] == ["9"]
    assert report["check"]["applicable"] is False
    assert "more than one record" in report["check"]["reason"]
    # The first answer to question 2 ("yes", from expert 0) is the one kept.
    assert [(r["question_id"], r["answer"]) for r in union] == [("1", "yes"), ("2", "yes"), ("9", "yes")]
    assert report["union"]["score"] == pytest.approx(1.0)


def test_combine_yes_no_f1_check_not_applicable(tmp_path: Path) -> None:
    path = tmp_path / "pope.jsonl"
    records = [
        _record(str(i), answer, gt=gt) | {"benchmark": "pope"}
        for i, (answer, gt) in enumerate([("yes", "yes"), ("no", "yes"), ("yes", "no")])
    ]
    write_predictions(path, records)
    report, _ = combine_results([path], "pope")
    assert report["metric"] == "yes_no_f1"
    assert report["union"]["score"] == pytest.approx(0.5)  # TP 1, FN 1, FP 1
    assert report["check"]["applicable"] is False


def test_combine_rejects_other_benchmark(two_expert_files: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="other benchmarks .*'textvqa': 2"):
        combine_results(list(two_expert_files), "docvqa")


def test_combine_reads_json_array(tmp_path: Path) -> None:
    path = tmp_path / "expert0.json"
    path.write_text(json.dumps([_textvqa("1", "yes", 10, 0)]))
    report, _ = combine_results([path], "textvqa")
    assert report["union"]["score"] == pytest.approx(1.0)


def test_annotation_layouts(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"question_id": 5}\n\n{"question_id": "6"}\n')
    single = tmp_path / "b.jsonl"
    single.write_text('{"question_id": 7}\n')
    vqav2 = tmp_path / "c.json"
    vqav2.write_text(json.dumps({"annotations": [{"question_id": 8, "answers": []}]}))
    assert load_annotation_ids(jsonl) == ["5", "6"]
    assert load_annotation_ids(single) == ["7"]
    assert load_annotation_ids(vqav2) == ["8"]
    bad = tmp_path / "d.json"
    bad.write_text(json.dumps({"info": {}}))
    with pytest.raises(ValueError, match="without a 'data', 'annotations' or 'questions' list"):
        load_annotation_ids(bad)


def test_cli_cluster_options(two_expert_files: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    first, second = two_expert_files
    output = tmp_path / "out" / "combined.json"
    merged = tmp_path / "merged.jsonl"
    status = main(
        ["--cluster0", str(first), f"--cluster1={second}", "--benchmark", "textvqa", "--output", str(output),
         "--output-predictions", str(merged)]
    )  # fmt: skip
    assert status == 0
    report = json.loads(output.read_text())
    assert report["union"]["n"] == 5
    assert report["check"]["passed"] is True
    assert len(read_predictions(merged)) == 5
    printed = capsys.readouterr().out
    assert "union        5" in printed
    assert "passed" in printed


def test_cli_cluster_files_any_k(tmp_path: Path) -> None:
    paths = []
    for k in range(3):
        path = tmp_path / f"e{k}.jsonl"
        write_predictions(path, [_textvqa(f"{k}-{i}", "yes", 3 * (i % 2), k) for i in range(k + 1)])
        paths.append(str(path))
    annotation = tmp_path / "ann.jsonl"
    annotation.write_text(
        "".join(json.dumps({"question_id": f"{k}-{i}"}) + "\n" for k in range(3) for i in range(k + 2))
    )
    output = tmp_path / "combined.json"
    args = [
        "--cluster-files",
        *paths,
        "--benchmark",
        "textvqa",
        "--output",
        str(output),
        "--annotation",
        str(annotation),
    ]
    assert main(args) == 0
    report = json.loads(output.read_text())
    assert [entry["n"] for entry in report["experts"]] == [1, 2, 3]
    assert report["missing"] == ["0-1", "1-2", "2-3"]
    assert main([*args, "--strict"]) == 2


def test_cli_rejects_numbering_gap(two_expert_files: tuple[Path, Path], tmp_path: Path) -> None:
    first, second = two_expert_files
    with pytest.raises(SystemExit):
        main(
            [
                "--cluster0",
                str(first),
                "--cluster2",
                str(second),
                "--benchmark",
                "textvqa",
                "--output",
                str(tmp_path / "o.json"),
            ]
        )


def test_script_runs_from_repository_root(two_expert_files: tuple[Path, Path], tmp_path: Path) -> None:
    first, second = two_expert_files
    output = tmp_path / "combined.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT.relative_to(REPO_ROOT)), "--cluster0", str(first), "--cluster1", str(second),
         "--benchmark", "textvqa", "--output", str(output)],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(output.read_text())["union"]["score"] == pytest.approx(0.56)
