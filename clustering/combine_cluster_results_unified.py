"""Merge per-expert prediction files into one result and score the union.

Each expert answers the evaluation questions routed to it and writes a predictions file (jsonl,
one record per question, see ``lightning_modules/predictions.py``; a JSON array of the same
records also loads). This script merges K such files, scores each file and the union with the
benchmark's metric, and checks that the union score equals the size-weighted mean of the
per-expert scores. That equality holds for every metric that is a mean of per-sample scores
when no question appears twice, so a mismatch points at duplicated or mis-scored records. With
``--annotation`` it also lists questions of the benchmark that no file answers and questions
that no annotation contains.

Usage (from the repository root):

    python clustering/combine_cluster_results_unified.py --cluster0 expert0.jsonl \\
        --cluster1 expert1.jsonl --benchmark textvqa --output combined.json
    python clustering/combine_cluster_results_unified.py --cluster-files e0.jsonl e1.jsonl e2.jsonl \\
        --benchmark docvqa --annotation val_questions.jsonl --output combined.json

``--clusterN`` accepts any N (``--cluster0`` ... ``--cluster7`` ...); the index is the expert id.
The exit status is 1 when the union score disagrees with the weighted mean, 2 with
``--strict`` when questions are missing or duplicated, and 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_modules.metrics import MeanScoreMetric, build_metric
from lightning_modules.predictions import read_predictions, validate_record, write_predictions

# The union score and the weighted mean are both float64 sums of the same per-sample scores, added
# in a different order, so they differ only by rounding.
_CHECK_TOLERANCE = 1e-9
_CLUSTER_OPTION = re.compile(r"^--cluster(\d+)(?:=(.*))?$")
# Examples of ids listed in the printed report; the JSON output lists them all.
_SHOWN_IDS = 10


def load_prediction_file(path: str | Path) -> list[dict[str, Any]]:
    """Load a predictions file: jsonl, or a JSON array of the same records.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the record for an
    invalid one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file {path} not found.")
    with path.open(encoding="utf-8") as f:
        first_char = f.read(1)
    if first_char != "[":
        return read_predictions(path)

    records = json.loads(path.read_text(encoding="utf-8"))
    for index, record in enumerate(records):
        problems = validate_record(record) if isinstance(record, dict) else ["not a JSON object"]
        if problems:
            raise ValueError(f"{path}: record {index}: {'; '.join(problems)}.")
    return records


def load_annotation_ids(path: str | Path) -> list[str]:
    """Return the question ids of a benchmark annotation file, as strings, in file order.

    Accepted layouts: jsonl or a JSON array of objects with ``question_id``, or a JSON object
    whose ``data``, ``annotations`` or ``questions`` entry is such an array (the TextVQA and
    VQAv2 annotation files).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} not found.")
    text = path.read_text(encoding="utf-8")
    try:
        content = json.loads(text)
    except json.JSONDecodeError:
        content = None  # not one JSON document, so read it as jsonl below
    if isinstance(content, list):
        entries = content
    elif isinstance(content, dict) and "question_id" not in content:
        entries = next((content[key] for key in ("data", "annotations", "questions") if key in content), None)
        if entries is None:
            raise ValueError(
                f"annotation file {path} is a JSON object without a 'data', 'annotations' or "
                f"'questions' list; found keys {sorted(content)}."
            )
    else:
        entries = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"annotation file {path}:{line_number}: not valid JSON ({error.msg})."
                ) from error

    ids = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "question_id" not in entry:
            raise ValueError(f"annotation file {path}: entry {index} has no 'question_id'.")
        ids.append(str(entry["question_id"]))
    return ids


def _score_records(benchmark: str, records: Sequence[dict[str, Any]]) -> tuple[float, list[float] | None]:
    """Return the metric over ``records`` and, for mean metrics, the per-sample scores."""
    metric = build_metric(benchmark)
    preds = [record["answer"] for record in records]
    targets = [record["gt_answers"] for record in records]
    if not records:
        return float("nan"), [] if isinstance(metric, MeanScoreMetric) else None
    if isinstance(metric, MeanScoreMetric):
        scores = metric.per_sample_scores(preds, targets)
        return math.fsum(scores) / len(scores), scores
    metric.update(preds, targets)
    return float(metric.compute()), None


def combine_results(
    files: Sequence[str | Path],
    benchmark: str,
    annotation: str | Path | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Merge per-expert prediction files, score them and check the union against the parts.

    Args:
        files: K prediction files; file k contains expert k's answers.
        benchmark: benchmark name for ``build_metric``; every record must carry it.
        annotation: optional annotation file whose question ids are the expected set.

    Returns:
        report: a JSON-serialisable dict with ``benchmark``, ``metric``, ``experts`` (per file:
            ``expert``, ``file``, ``n``, ``score``, ``expert_field_mismatches``), ``union``
            (``n``, ``score``), ``weighted_mean``, ``check`` (``applicable``, ``passed``,
            ``abs_diff``, ``reason``), ``duplicated`` (question ids answered more than once,
            with the files), and with an annotation ``missing`` (expected but unanswered) and
            ``unexpected`` (answered but not in the annotation).
        union: the merged records, the first answer kept for a duplicated question, with
            ``expert`` set to the file's index.
    """
    if not files:
        raise ValueError(
            "no prediction files given. HINT: pass --cluster0 A --cluster1 B or --cluster-files A B."
        )
    metric_name = build_metric(benchmark).metric_name

    experts_report = []
    union: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    occurrences: dict[str, list[int]] = {}
    for expert, path in enumerate(files):
        records = load_prediction_file(path)
        wrong_benchmark = Counter(
            r["benchmark"] for r in records if r["benchmark"].lower() != benchmark.lower()
        )
        if wrong_benchmark:
            raise ValueError(
                f"{path} contains records of other benchmarks {dict(wrong_benchmark)}, expected only "
                f"{benchmark!r}. HINT: pass --benchmark matching the files, or split the file by benchmark."
            )
        score, _ = _score_records(benchmark, records)
        experts_report.append(
            {
                "expert": expert,
                "file": str(path),
                "n": len(records),
                "score": score,
                "expert_field_mismatches": sum(r["expert"] != expert for r in records),
            }
        )
        for record in records:
            question_id = str(record["question_id"])
            occurrences.setdefault(question_id, []).append(expert)
            if question_id in seen:
                continue
            seen[question_id] = expert
            union.append({**record, "question_id": question_id, "expert": expert})

    duplicated = {qid: [str(files[k]) for k in where] for qid, where in occurrences.items() if len(where) > 1}
    union_score, union_scores = _score_records(benchmark, union)
    total = sum(entry["n"] for entry in experts_report)
    weighted_mean = (
        math.fsum(entry["n"] * entry["score"] for entry in experts_report if entry["n"]) / total
        if total
        else float("nan")
    )

    check: dict[str, Any] = {"applicable": True, "passed": None, "abs_diff": None, "reason": ""}
    if union_scores is None:
        check.update(applicable=False, reason=f"{metric_name} is not a mean of per-sample scores")
    elif duplicated:
        check.update(
            applicable=False, reason=f"{len(duplicated)} question(s) are answered by more than one record"
        )
    elif total == 0:
        check.update(applicable=False, reason="the files contain no records")
    else:
        diff = abs(union_score - weighted_mean)
        check.update(passed=diff <= _CHECK_TOLERANCE, abs_diff=diff)

    report: dict[str, Any] = {
        "benchmark": benchmark,
        "metric": metric_name,
        "experts": experts_report,
        "union": {"n": len(union), "score": union_score},
        "weighted_mean": weighted_mean,
        "check": check,
        "duplicated": duplicated,
    }
    if annotation is not None:
        expected = load_annotation_ids(annotation)
        expected_set = set(expected)
        report["annotation"] = str(annotation)
        report["annotation_n"] = len(expected_set)
        report["missing"] = [qid for qid in dict.fromkeys(expected) if qid not in seen]
        report["unexpected"] = [qid for qid in seen if qid not in expected_set]
    return report, union


def _collect_cluster_options(argv: Sequence[str]) -> tuple[dict[int, str], list[str]]:
    """Pull ``--clusterN PATH`` (or ``--clusterN=PATH``) out of ``argv``; return them and the rest."""
    clusters: dict[int, str] = {}
    rest: list[str] = []
    index = 0
    while index < len(argv):
        match = _CLUSTER_OPTION.match(argv[index])
        if match is None:
            rest.append(argv[index])
            index += 1
            continue
        number = int(match.group(1))
        if match.group(2) is not None:
            value = match.group(2)
            index += 1
        elif index + 1 < len(argv):
            value = argv[index + 1]
            index += 2
        else:
            raise SystemExit(f"error: --cluster{number} needs a file path.")
        if number in clusters:
            raise SystemExit(f"error: --cluster{number} given twice ({clusters[number]} and {value}).")
        clusters[number] = value
    return clusters, rest


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Merge per-expert prediction files, score the union and check it against the parts.",
        epilog="Also accepts --cluster0 PATH --cluster1 PATH ... (expert k's file as --clusterk).",
    )
    parser.add_argument("--cluster-files", nargs="+", default=None, help="prediction files, expert 0 first")
    parser.add_argument("--benchmark", required=True, help="benchmark name, e.g. textvqa, docvqa, chartqa")
    parser.add_argument("--output", required=True, type=Path, help="path of the combined JSON report")
    parser.add_argument(
        "--annotation",
        type=Path,
        default=None,
        help="annotation file listing every question_id of the benchmark",
    )
    parser.add_argument(
        "--output-predictions", type=Path, default=None, help="also write the merged predictions jsonl here"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 2 when questions are missing or duplicated"
    )
    return parser


def _format_ids(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_SHOWN_IDS])
    return shown + (f" ... ({len(ids) - _SHOWN_IDS} more)" if len(ids) > _SHOWN_IDS else "")


def _print_report(report: dict[str, Any]) -> None:
    metric = report["metric"]
    print(f"benchmark {report['benchmark']}, metric {metric}")
    print(f"{'expert':>6}  {'n':>7}  {metric:>16}  file")
    for entry in report["experts"]:
        print(f"{entry['expert']:>6}  {entry['n']:>7}  {entry['score']:>16.4f}  {entry['file']}")
        if entry["expert_field_mismatches"]:
            print(
                f"        note: {entry['expert_field_mismatches']} record(s) name another expert in 'expert'"
            )
    print(f"{'union':>6}  {report['union']['n']:>7}  {report['union']['score']:>16.4f}")
    check = report["check"]
    if check["applicable"]:
        status = "passed" if check["passed"] else "FAILED"
        print(
            f"check: union {report['union']['score']:.6f} vs size-weighted mean {report['weighted_mean']:.6f} "
            f"(|diff| {check['abs_diff']:.2e}): {status}"
        )
    else:
        print(f"check: not applicable, because {check['reason']}")
    if report["duplicated"]:
        print(
            f"duplicated: {len(report['duplicated'])} question(s): {_format_ids(list(report['duplicated']))}"
        )
    if "missing" in report:
        print(
            f"annotation {report['annotation']}: {report['annotation_n']} questions, "
            f"{len(report['missing'])} missing, {len(report['unexpected'])} not in the annotation"
        )
        if report["missing"]:
            print(f"missing: {_format_ids(report['missing'])}")
        if report["unexpected"]:
            print(f"not in the annotation: {_format_ids(report['unexpected'])}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    clusters, rest = _collect_cluster_options(argv)
    parser = _build_parser()
    args = parser.parse_args(rest)

    if clusters and args.cluster_files:
        parser.error("give either --clusterN options or --cluster-files, not both.")
    if clusters:
        expected_numbers = list(range(len(clusters)))
        if sorted(clusters) != expected_numbers:
            parser.error(
                f"--clusterN options must be numbered 0..{len(clusters) - 1} without gaps, got {sorted(clusters)}."
            )
        files = [clusters[k] for k in expected_numbers]
    elif args.cluster_files:
        files = args.cluster_files
    else:
        parser.error("no prediction files: pass --cluster0 A --cluster1 B ... or --cluster-files A B ...")

    report, union = combine_results(files, args.benchmark, args.annotation)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.output_predictions is not None:
        write_predictions(args.output_predictions, union)
    _print_report(report)
    print(f"wrote {args.output}")

    if report["check"]["applicable"] and not report["check"]["passed"]:
        return 1
    has_gaps = bool(report["duplicated"]) or bool(report.get("missing"))
    if args.strict and has_gaps:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
