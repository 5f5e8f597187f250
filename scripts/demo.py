"""Run the whole method on easy-VQA on a CPU: decentralized experts against a compute-matched dense model.

Every stage runs the project's own command-line scripts, the commands a user would type for their
own data (each stage's exact command is in `<output-dir>/logs/<stage>.log`):

1. `datamodules/prepare_easyvqa.py`: easy-VQA as InternVL jsonl plus PNG images.
2. `clustering/train_demo_clip.py`, then `clustering/extract_features.py`: a small CLIP encoder trained
   contrastively on the training images and captions made from their answers, and its image features.
3. `clustering/two_stage_kmeans.py`: fine spherical k-means, then balanced coarse clusters (K experts),
   with the t-SNE plot.
4. `clustering/split_dataset.py`: the training and test sets as per-expert WebDataset shards.
5. `cli.py fit`: the dense baseline for S steps at batch B, and each expert for its compute-matched budget
   (computed by `--matching.*` from the manifest: p_k * K * S steps at batch B / K).
6. `cli.py test`: the dense model, the top-1 routed ensemble (which also scores each expert on its routed
   questions) and the soft ensemble, on every test question.
7. `<output-dir>/results.md` and `results.json`: accuracy per system and question type, the gap ensemble
   minus dense, cluster sizes and contents, the time of each stage and where the logs and plots are.

A stage is skipped when its done marker (`<output-dir>/stages/<stage>.json`, written last and atomically)
records the same settings and the same upstream runs. Otherwise its outputs are deleted and it runs again,
and so do the stages that read them. `--force` deletes the whole output directory first.

    python scripts/demo.py --output-dir runs/demo
    python scripts/demo.py --output-dir runs/demo --seeds 0 1     # adds a second training seed
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from clustering.router import Router  # noqa: E402
from clustering.train_demo_clip import COLORS, SHAPES, parse_color_shape  # noqa: E402
from lightning_modules.metrics import build_metric  # noqa: E402

BENCHMARK = "easyvqa"
QUESTION_TYPES = ("color", "shape", "yes/no")
CONFIG_DIR = REPO_ROOT / "configs" / "demo"


@dataclass
class DemoSettings:
    """Sizes and budgets of one demo run; each field is a command-line option of the same name."""

    max_train_images: int | None = None
    max_test_images: int | None = None
    clip_steps: int = 500
    clip_batch_size: int = 128
    fine_clusters: int = 64
    experts: int = 2
    cluster_iterations: int = 20
    dense_steps: int = 800
    batch_size: int = 32
    learning_rate: float = 1e-3
    max_length: int = 84
    num_workers: int = 1
    threads: int = 1
    eval_batch_size: int = 64
    soft_temperature: float = 20.0
    seeds: list[int] = field(default_factory=lambda: [0])


# ----------------------------------------------------------------------------------------------
# Stage bookkeeping
# ----------------------------------------------------------------------------------------------


@dataclass
class StageRecord:
    """The done marker of one finished stage."""

    name: str
    params: dict[str, Any]
    run_id: str
    seconds: float
    finished_at: str
    result: dict[str, Any]
    skipped: bool = False


class StageRunner:
    """Run stages in order, skipping those whose done marker matches, and time each one."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.stage_dir = output_dir / "stages"
        self.log_dir = output_dir / "logs"
        self.records: dict[str, StageRecord] = {}

    def marker_path(self, name: str) -> Path:
        return self.stage_dir / f"{name.replace('/', '_')}.json"

    def run(
        self,
        name: str,
        params: dict[str, Any],
        outputs: Sequence[Path],
        body: Callable[[Path], dict[str, Any]],
        upstream: Sequence[str] = (),
    ) -> StageRecord:
        """Run `body(log_path)` unless a matching done marker exists; return the stage's record.

        Args:
            name: stage name, unique within the demo.
            params: the settings the stage's outputs depend on.
            outputs: files and directories the stage writes. They are deleted before it runs, so a run
                that was interrupted never leaves a partial output that a later stage would read.
            body: runs the stage; returns a json-serialisable summary kept in the marker.
            upstream: names of the stages whose outputs this one reads. Their run ids are part of
                the marker, so a re-run upstream stage makes this one run again.
        """
        full_params = {**params, "upstream": {u: self.records[u].run_id for u in upstream}}
        marker = self.marker_path(name)
        if marker.is_file():
            saved = json.loads(marker.read_text())
            if saved["params"] == json.loads(json.dumps(full_params)):
                record = StageRecord(**{**saved, "skipped": True})
                self.records[name] = record
                print(f"[{name}] done earlier in {record.seconds:.1f} s, reusing its outputs")
                return record
            print(f"[{name}] settings or inputs changed since the last run: running it again")
            marker.unlink()

        for path in outputs:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name.replace('/', '_')}.log"
        log_path.write_text("")
        print(f"[{name}] running (log: {log_path})", flush=True)
        start = time.perf_counter()
        result = body(log_path)
        seconds = time.perf_counter() - start
        record = StageRecord(
            name=name,
            params=json.loads(json.dumps(full_params)),
            run_id=uuid.uuid4().hex,
            seconds=seconds,
            finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            result=result,
        )
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, {k: v for k, v in asdict(record).items() if k != "skipped"})
        self.records[name] = record
        print(f"[{name}] finished in {seconds:.1f} s", flush=True)
        return record


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write json to a temporary file beside `path`, then rename it into place."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    partial.replace(path)


def run_command(command: Sequence[str], log_path: Path, threads: int = 1) -> None:
    """Run one command from the repository root, appending its output to `log_path`.

    `threads` sets OMP_NUM_THREADS, torch's intra-op thread count. A training process with two
    threads beside its DataLoader worker, or beside any other busy process, oversubscribes two cores,
    and PyTorch's OpenMP threads then spend most of their time waiting on each other.

    Raises:
        RuntimeError: the command exited with a non-zero status; the message contains the tail of the log.
    """
    printable = " ".join(str(part) for part in command)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(threads),
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with log_path.open("a") as log:
        log.write(f"$ {printable}\n")
        log.flush()
        status = subprocess.run(
            [str(part) for part in command], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
        ).returncode
    if status != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(
            f"command failed with exit status {status}: {printable}\n--- {log_path} (tail) ---\n{tail}"
        )


# ----------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------


@dataclass
class DemoPaths:
    """Every location the demo writes, under one output directory."""

    root: Path

    def __post_init__(self) -> None:
        self.data = self.root / "data"
        self.clip = self.root / "clip"
        self.features = self.root / "features"
        self.clusters = self.root / "clusters"
        self.shards_train = self.root / "shards" / "train"
        self.shards_test = self.root / "shards" / "test"
        self.processor = self.root / "processor"
        self.tensorboard = self.root / "tensorboard"

    def run_name(self, model: str, seed: int) -> str:
        return f"{model}-seed{seed}"

    def checkpoints(self, run: str) -> Path:
        return self.root / "checkpoints" / run

    def predictions(self, run: str) -> Path:
        return self.root / "predictions" / run


def python_command(script: str, *arguments: Any) -> list[str]:
    return [sys.executable, str(REPO_ROOT / script), *[str(a) for a in arguments]]


def optional_flag(flag: str, value: Any) -> list[str]:
    return [] if value is None else [flag, str(value)]


def stage_prepare(runner: StageRunner, paths: DemoPaths, settings: DemoSettings) -> None:
    params = {"max_train_images": settings.max_train_images, "max_test_images": settings.max_test_images}

    def body(log: Path) -> dict[str, Any]:
        run_command(
            python_command(
                "datamodules/prepare_easyvqa.py",
                "--output-dir",
                paths.data,
                *optional_flag("--max-train-images", settings.max_train_images),
                *optional_flag("--max-test-images", settings.max_test_images),
            ),
            log,
            settings.threads,
        )
        return {
            "train_records": count_lines(paths.data / "train.jsonl"),
            "test_records": count_lines(paths.data / "test.jsonl"),
        }

    runner.run("prepare", params, [paths.data], body)


def stage_features(runner: StageRunner, paths: DemoPaths, settings: DemoSettings) -> None:
    clip_params = {
        "steps": settings.clip_steps,
        "batch_size": settings.clip_batch_size,
        "seed": settings.seeds[0],
    }

    def train_clip(log: Path) -> dict[str, Any]:
        run_command(
            python_command(
                "clustering/train_demo_clip.py",
                "--input-jsonl",
                paths.data / "train.jsonl",
                "--images-dir",
                paths.data,
                "--output-dir",
                paths.clip,
                "--steps",
                settings.clip_steps,
                "--batch-size",
                settings.clip_batch_size,
                "--seed",
                settings.seeds[0],
            ),
            log,
            settings.threads,
        )
        metrics = json.loads((paths.clip / "demo_clip_metrics.json").read_text())
        return {"retrieval": metrics["retrieval"], "train_seconds": metrics["train_seconds"]}

    runner.run(
        "clip", clip_params, [paths.clip, paths.clip.with_name("clip.partial")], train_clip, ["prepare"]
    )

    def extract(log: Path) -> dict[str, Any]:
        rows = {}
        for split in ("train", "test"):
            run_command(
                python_command(
                    "clustering/extract_features.py",
                    "--input-jsonl",
                    paths.data / f"{split}.jsonl",
                    "--images-dir",
                    paths.data,
                    "--output-dir",
                    paths.features / split,
                    "--clip-model",
                    paths.clip,
                    "--num-workers",
                    settings.num_workers,
                ),
                log,
                settings.threads,
            )
            rows[split] = count_lines(paths.features / split / "keys.txt")
        return {"rows": rows}

    runner.run("features", {}, [paths.features], extract, ["prepare", "clip"])


def stage_cluster(runner: StageRunner, paths: DemoPaths, settings: DemoSettings) -> None:
    params = {
        "fine_clusters": settings.fine_clusters,
        "experts": settings.experts,
        "iterations": settings.cluster_iterations,
        "seed": settings.seeds[0],
    }

    def body(log: Path) -> dict[str, Any]:
        run_command(
            python_command(
                "clustering/two_stage_kmeans.py",
                paths.features / "train" / "features.npy",
                "--output-dir",
                paths.clusters,
                "--n-fine-clusters",
                settings.fine_clusters,
                "--n-coarse-clusters",
                settings.experts,
                "--n-iter",
                settings.cluster_iterations,
                "--seed",
                settings.seeds[0],
            ),
            log,
            settings.threads,
        )
        metadata = json.loads((paths.clusters / "clustering_metadata.json").read_text())
        return {"metadata": metadata}

    runner.run("cluster", params, [paths.clusters], body, ["features"])


def stage_split(runner: StageRunner, paths: DemoPaths, settings: DemoSettings) -> None:
    def split(name: str, jsonl: Path, output: Path, features: Path) -> None:
        def body(log: Path) -> dict[str, Any]:
            run_command(
                python_command(
                    "clustering/split_dataset.py",
                    "--input-jsonl",
                    jsonl,
                    "--images-dir",
                    paths.data,
                    "--clustering-results-dir",
                    paths.clusters,
                    "--output-dir",
                    output,
                    "--clip-model",
                    paths.clip,
                    "--image-tokens",
                    16,
                    "--features",
                    features / "features.npy",
                    "--keys",
                    features / "keys.txt",
                ),
                log,
                settings.threads,
            )
            manifest = json.loads((output / "manifest.json").read_text())
            return {
                "total_records": manifest["total_records"],
                "samples": [row["samples"] for row in manifest["experts"]],
                "skipped": len(manifest["skipped"]),
            }

        # The small processor's tokenizer is trained on the training split's text, so it goes with it.
        outputs = [output] + ([paths.processor] if name == "split-train" else [])
        runner.run(name, {}, outputs, body, ["prepare", "features", "cluster"])

    split("split-train", paths.data / "train.jsonl", paths.shards_train, paths.features / "train")
    split("split-test", paths.data / "test.jsonl", paths.shards_test, paths.features / "test")


def stage_train(runner: StageRunner, paths: DemoPaths, settings: DemoSettings, seed: int) -> dict[str, Path]:
    """Train the dense baseline and every expert for one seed; return each run's last checkpoint."""
    checkpoints: dict[str, Path] = {}
    common = [
        "--seed_everything",
        seed,
        "--data.init_args.train_dir",
        paths.shards_train,
        "--data.init_args.processor",
        paths.processor,
        "--data.init_args.num_workers",
        settings.num_workers,
        "--data.init_args.seed",
        seed,
        "--model.init_args.processor_name_or_path",
        paths.processor,
        "--model.init_args.learning_rate",
        settings.learning_rate,
        "--data.init_args.max_length",
        settings.max_length,
        "--trainer.logger.init_args.save_dir",
        paths.tensorboard,
    ]
    models = ["dense"] + [f"expert{k}" for k in range(settings.experts)]
    for model in models:
        run = paths.run_name(model, seed)
        checkpoint_dir = paths.checkpoints(run)
        if model == "dense":
            specific = [
                "--config",
                CONFIG_DIR / "dense.yaml",
                "--trainer.max_steps",
                settings.dense_steps,
                "--data.init_args.batch_size",
                settings.batch_size,
            ]
        else:
            expert = int(model.removeprefix("expert"))
            if settings.batch_size % settings.experts:
                raise ValueError(
                    f"--batch-size {settings.batch_size} is not divisible by --experts {settings.experts}, "
                    "so the experts' batch B / K is not a whole number. HINT: use a multiple of --experts."
                )
            # The experts' steps come from `cli.py --matching.*` (lightning_modules/compute_matching.py).
            specific = [
                "--config",
                CONFIG_DIR / "expert.yaml",
                "--data.init_args.expert",
                expert,
                "--model.init_args.expert_id",
                expert,
                "--data.init_args.batch_size",
                settings.batch_size // settings.experts,
                "--matching.manifest",
                paths.shards_train,
                "--matching.dense_steps",
                settings.dense_steps,
                "--matching.dense_global_batch",
                settings.batch_size,
            ]
        command = python_command(
            "cli.py",
            "fit",
            *specific,
            *common,
            "--trainer.logger.init_args.name",
            run,
            "--checkpoint.dirpath",
            checkpoint_dir,
        )
        params = {
            "seed": seed,
            "dense_steps": settings.dense_steps,
            "batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate,
            "max_length": settings.max_length,
            "config": (CONFIG_DIR / ("dense.yaml" if model == "dense" else "expert.yaml")).read_text(),
        }

        def body(
            log: Path, command: list[str] = command, run: str = run, checkpoint_dir: Path = checkpoint_dir
        ):
            run_command(command, log, settings.threads)
            last = checkpoint_dir / "last.ckpt"
            if not last.is_file():
                raise RuntimeError(f"{run}: training finished but wrote no {last}. See {log}.")
            return {
                "checkpoint": str(last),
                "steps": read_checkpoint_step(last),
                "tensorboard": str(paths.tensorboard / run),
            }

        record = runner.run(
            f"fit-{run}",
            params,
            [checkpoint_dir, paths.tensorboard / run],
            body,
            ["split-train"],
        )
        checkpoints[model] = Path(record.result["checkpoint"])
    return checkpoints


def stage_test(
    runner: StageRunner, paths: DemoPaths, settings: DemoSettings, seed: int, checkpoints: dict[str, Path]
) -> dict[str, Path]:
    """Evaluate the dense model and both ensembles of one seed; return each system's predictions file."""
    predictions: dict[str, Path] = {}
    common = [
        "--data.init_args.eval_dir",
        paths.shards_test,
        "--data.init_args.train_dir",
        paths.shards_train,
        "--data.init_args.processor",
        paths.processor,
        "--data.init_args.batch_size",
        settings.eval_batch_size,
        "--data.init_args.num_workers",
        settings.num_workers,
        "--trainer.logger.init_args.save_dir",
        paths.tensorboard,
    ]
    train_runs = [f"fit-{paths.run_name(model, seed)}" for model in checkpoints]
    systems = {
        "dense": [
            "--config",
            CONFIG_DIR / "test_dense.yaml",
            "--model.init_args.processor_name_or_path",
            paths.processor,
            "--ckpt_path",
            checkpoints["dense"],
        ],
        "top1": [
            "--config",
            CONFIG_DIR / "ensemble.yaml",
            "--model.init_args.mode",
            "top1",
        ],
        "soft": [
            "--config",
            CONFIG_DIR / "ensemble.yaml",
            "--model.init_args.mode",
            "soft",
            "--model.init_args.temperature",
            settings.soft_temperature,
        ],
    }
    expert_checkpoints = [str(checkpoints[f"expert{k}"]) for k in range(settings.experts)]
    for system, specific in systems.items():
        run = f"test-{system}-seed{seed}"
        prediction_dir = paths.predictions(run)
        ensemble_args = []
        if system != "dense":
            ensemble_args = [
                "--model.init_args.checkpoints",
                json.dumps(expert_checkpoints),
                "--model.init_args.clustering_dir",
                paths.clusters,
            ]
        command = python_command(
            "cli.py",
            "test",
            *specific,
            *ensemble_args,
            *common,
            "--model.init_args.predictions_dir",
            prediction_dir,
            "--trainer.logger.init_args.name",
            run,
        )
        config_name = "test_dense.yaml" if system == "dense" else "ensemble.yaml"
        params = {
            "seed": seed,
            "config": (CONFIG_DIR / config_name).read_text(),
            "command_tail": [str(part) for part in specific[2:]],
        }
        params["soft_temperature"] = settings.soft_temperature if system == "soft" else None

        def body(
            log: Path, command: list[str] = command, prediction_dir: Path = prediction_dir, run: str = run
        ):
            run_command(command, log, settings.threads)
            # With --ckpt_path, LightningCLI (2.6) replaces the model's options by the hyperparameters
            # saved in the checkpoint, so the dense run's predictions_dir is the training value (None)
            # and the answers land in the default <log_dir>/predictions.
            files = sorted(prediction_dir.glob("test-*.jsonl"))
            files += sorted((paths.tensorboard / run).glob("version_*/predictions/test-*.jsonl"))
            if len(files) != 1:
                raise RuntimeError(f"expected one test predictions file for {run}, found {files}. See {log}.")
            return {"predictions": str(files[0])}

        upstream = ["split-test", "cluster"] + (train_runs[:1] if system == "dense" else train_runs[1:])
        record = runner.run(run, params, [prediction_dir, paths.tensorboard / run], body, upstream)
        predictions[system] = Path(record.result["predictions"])
    return predictions


# ----------------------------------------------------------------------------------------------
# Scoring and the results table
# ----------------------------------------------------------------------------------------------


def count_lines(path: Path) -> int:
    with path.open() as handle:
        return sum(1 for line in handle if line.strip())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_checkpoint_step(path: Path) -> int:
    """Return the global step saved in a Lightning checkpoint."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return int(checkpoint["global_step"])


def score_by_type(
    answers: dict[str, str], questions: list[dict[str, Any]], subset: set[str] | None = None
) -> dict[str, Any]:
    """Score answers against the test questions with the easy-VQA metric, overall and per question type.

    Args:
        answers: question_id -> answer text.
        questions: the test records (`question_id`, `gt_answers`, `question_type`).
        subset: score only these question ids; None scores every test question.

    Returns:
        {"all": accuracy, "<type>": accuracy, ..., "n": questions scored}. A question without an answer
        counts as wrong, so a system that skipped questions cannot look better than it is.
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for question in questions:
        if subset is not None and question["question_id"] not in subset:
            continue
        groups["all"].append(question)
        groups[question["question_type"]].append(question)
    scores: dict[str, Any] = {"n": len(groups["all"])}
    for name in ("all", *QUESTION_TYPES):
        group = groups.get(name, [])
        if not group:
            scores[name] = None
            continue
        metric = build_metric(BENCHMARK)
        metric.update([answers.get(q["question_id"], "") for q in group], [q["gt_answers"] for q in group])
        scores[name] = float(metric.compute())
    return scores


def check_predictions(path: Path, questions: list[dict[str, Any]]) -> dict[str, str]:
    """Read a predictions file and check that it answers every test question exactly once.

    Raises:
        ValueError: a question is answered twice, missing, or not a test question.
    """
    records = read_jsonl(path)
    counts = Counter(record["question_id"] for record in records)
    expected = {question["question_id"] for question in questions}
    twice = sorted(qid for qid, n in counts.items() if n > 1)
    missing = sorted(expected - set(counts))
    unknown = sorted(set(counts) - expected)
    if twice or missing or unknown:
        raise ValueError(
            f"{path}: {len(twice)} questions answered more than once (first {twice[:5]}), {len(missing)} missing "
            f"(first {missing[:5]}), {len(unknown)} not in the test set (first {unknown[:5]}). "
            "HINT: rerun this stage with --force; a predictions file must cover the test split once."
        )
    return {record["question_id"]: record["answer"] for record in records}


def majority_baselines(train_path: Path, questions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Score the most frequent training answer, overall and per question type, on the test questions."""
    overall: Counter[str] = Counter()
    per_type: dict[str, Counter[str]] = defaultdict(Counter)
    per_question: dict[str, Counter[str]] = defaultdict(Counter)
    for record in read_jsonl(train_path):
        turns = [t for t in record["conversations"] if t["from"] in ("human", "gpt")]
        for question_turn, answer_turn in zip(turns[::2], turns[1::2], strict=False):
            answer = answer_turn["value"].strip()
            overall[answer] += 1
            per_type[answer_type(answer)][answer] += 1
            per_question[normalize_question(question_turn["value"])][answer] += 1
    majority = overall.most_common(1)[0][0]
    typed = {kind: counter.most_common(1)[0][0] for kind, counter in per_type.items()}
    prior = {
        q["question_id"]: per_question[q["question"]].most_common(1)[0][0]
        if q["question"] in per_question
        else majority
        for q in questions
    }
    return {
        "majority": {
            "answer": majority,
            "scores": score_by_type({q["question_id"]: majority for q in questions}, questions),
        },
        "majority_per_type": {
            "answer": typed,
            "scores": score_by_type(
                {q["question_id"]: typed.get(q["question_type"], majority) for q in questions}, questions
            ),
        },
        # A text-only model at its best: the most frequent training answer to the same question text.
        # easy-VQA's yes/no questions are skewed enough that this reaches about 82% on them without
        # looking at the image, so a model must beat this row, not the majority answer, to show it
        # reads the image.
        "question_prior": {"scores": score_by_type(prior, questions)},
    }


def normalize_question(text: str) -> str:
    """Return a question without its image placeholder, lower-cased and stripped."""
    return text.replace("<image>", " ").strip().lower()


def answer_type(answer: str) -> str:
    """Return the easy-VQA question type that an answer belongs to."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


def cluster_contents(paths: DemoPaths) -> list[dict[str, Any]]:
    """Describe each expert's training images by the colours and shapes their answers name.

    Routes the training features with the same `Router` that split the data, so the counts are the
    split's, and reads each image's colour and shape from its conversation.
    """
    router = Router.from_dir(paths.clusters)
    features = np.load(paths.features / "train" / "features.npy")
    keys = (paths.features / "train" / "keys.txt").read_text().splitlines()
    experts = router.route(features).experts
    expert_of_key = dict(zip(keys, experts.tolist(), strict=True))
    colors: list[Counter[str]] = [Counter() for _ in range(router.n_experts)]
    shapes: list[Counter[str]] = [Counter() for _ in range(router.n_experts)]
    for record in read_jsonl(paths.data / "train.jsonl"):
        image = record["image"][0] if isinstance(record["image"], list) else record["image"]
        if image not in expert_of_key:
            continue
        color, shape = parse_color_shape(record["conversations"])
        expert = expert_of_key[image]
        colors[expert][color or "unknown"] += 1
        shapes[expert][shape or "unknown"] += 1
    rows = []
    for expert in range(router.n_experts):
        images = sum(colors[expert].values())
        rows.append(
            {
                "expert": expert,
                "images": images,
                "colors": {c: colors[expert][c] / images for c in (*COLORS, "unknown") if colors[expert][c]},
                "shapes": {s: shapes[expert][s] / images for s in (*SHAPES, "unknown") if shapes[expert][s]},
            }
        )
    return rows


def collect_results(
    runner: StageRunner,
    paths: DemoPaths,
    settings: DemoSettings,
    predictions: dict[int, dict[str, Path]],
    total_seconds: float,
) -> dict[str, Any]:
    """Score every system and gather cluster sizes, timings and locations into one dict."""
    questions = [
        {
            "question_id": str(record["question_id"]),
            "gt_answers": record["gt_answers"],
            "question_type": record["question_type"],
            "question": normalize_question(record["question"]),
        }
        for record in read_jsonl(paths.data / "test.jsonl")
    ]
    systems: dict[str, Any] = majority_baselines(paths.data / "train.jsonl", questions)
    per_seed: dict[str, Any] = {}
    for seed, files in predictions.items():
        seed_systems: dict[str, Any] = {}
        for system, path in files.items():
            answers = check_predictions(path, questions)
            seed_systems[system] = {"predictions": str(path), "scores": score_by_type(answers, questions)}
        # Each expert on the questions routed to it, from the top-1 ensemble's answers.
        top1_records = read_jsonl(files["top1"])
        for expert in range(settings.experts):
            routed = {
                r["question_id"] for r in top1_records if int(r.get("routed_expert", r["expert"])) == expert
            }
            answers = {r["question_id"]: r["answer"] for r in top1_records if r["question_id"] in routed}
            seed_systems[f"expert{expert}_routed"] = {
                "scores": score_by_type(answers, questions, subset=routed),
                "dense_on_same_questions": score_by_type(
                    check_predictions(files["dense"], questions), questions, subset=routed
                ),
            }
        dense_all = seed_systems["dense"]["scores"]["all"]
        seed_systems["gap_top1_minus_dense"] = seed_systems["top1"]["scores"]["all"] - dense_all
        seed_systems["gap_soft_minus_dense"] = seed_systems["soft"]["scores"]["all"] - dense_all
        seed_systems["dense_minus_majority"] = dense_all - systems["majority"]["scores"]["all"]
        per_seed[str(seed)] = seed_systems

    def spread(key: str) -> dict[str, float]:
        values = np.array([per_seed[s][key] for s in per_seed], dtype=np.float64)
        # One seed has no sample standard deviation: null in results.json, left out of the table.
        return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else None}

    train_manifest = json.loads((paths.shards_train / "manifest.json").read_text())
    test_manifest = json.loads((paths.shards_test / "manifest.json").read_text())
    # The optimiser steps each run took, read back from its checkpoint (the experts' come from
    # compute matching). They are the same for every seed.
    first_seed = next(iter(predictions))
    steps = {
        model: runner.records[f"fit-{paths.run_name(model, first_seed)}"].result["steps"]
        for model in ["dense"] + [f"expert{k}" for k in range(settings.experts)]
    }
    clip = runner.records["clip"].result
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": machine_description(settings.threads),
        "settings": asdict(settings),
        "systems": systems,
        "seeds": per_seed,
        "summary": {
            "gap_top1_minus_dense": spread("gap_top1_minus_dense"),
            "gap_soft_minus_dense": spread("gap_soft_minus_dense"),
            "dense_minus_majority": spread("dense_minus_majority"),
        },
        "clusters": {
            "train_samples": [row["samples"] for row in train_manifest["experts"]],
            "test_questions": [row["samples"] for row in test_manifest["experts"]],
            "train_skipped": len(train_manifest["skipped"]),
            "test_skipped": len(test_manifest["skipped"]),
            "contents": cluster_contents(paths),
            "metadata": runner.records["cluster"].result["metadata"],
        },
        "optimizer_steps": steps,
        "clip_encoder": {"path": str(paths.clip), **clip},
        "stage_seconds": {name: record.seconds for name, record in runner.records.items()},
        "stages_reused": sorted(name for name, record in runner.records.items() if record.skipped),
        "total_seconds_this_invocation": total_seconds,
        "locations": {
            "tensorboard": str(paths.tensorboard),
            "checkpoints": str(paths.root / "checkpoints"),
            "predictions": str(paths.root / "predictions"),
            "clusters": str(paths.clusters),
            "plots": sorted(str(p) for p in paths.clusters.glob("*.png")),
            "logs": str(runner.log_dir),
        },
    }


def machine_description(threads: int) -> str:
    import platform

    import torch

    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"Python {platform.python_version()}; stages ran with OMP_NUM_THREADS={threads}; "
        f"load average at the end {load} (1, 5, 15 min)"
    )


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"



def _format_spread(entry: dict[str, float | None]) -> str:
    """Format a gap in accuracy points, with its standard deviation when there are several seeds."""
    text = f"{100 * entry['mean']:+.1f}"
    return text if entry["std"] is None else f"{text} (std {100 * entry['std']:.1f})"

def format_results(results: dict[str, Any]) -> str:
    """Render the results dict as the markdown page `results.md`."""
    lines = [
        "# easy-VQA demo: decentralized experts against a compute-matched dense model",
        "",
        f"Date {results['date']}; machine: {results['machine']}.",
        f"Command: `{results['command']}`.",
        "",
        "Accuracy (exact match, %) on every easy-VQA test question, overall and per question type.",
        "",
        "| system | seed | all | color | shape | yes/no | questions |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def row(name: str, seed: str, scores: dict[str, Any]) -> str:
        cells = " | ".join(percent(scores[key]) for key in ("all", *QUESTION_TYPES))
        return f"| {name} | {seed} | {cells} | {scores['n']} |"

    systems = results["systems"]
    lines.append(
        row(f'majority answer ("{systems["majority"]["answer"]}")', "-", systems["majority"]["scores"])
    )
    lines.append(row("majority answer per question type", "-", systems["majority_per_type"]["scores"]))
    lines.append(row("question prior (text only)", "-", systems["question_prior"]["scores"]))
    for seed, seed_systems in results["seeds"].items():
        lines.append(row("dense", seed, seed_systems["dense"]["scores"]))
        lines.append(row("top-1 routed ensemble", seed, seed_systems["top1"]["scores"]))
        lines.append(row("soft ensemble", seed, seed_systems["soft"]["scores"]))
        for key, value in seed_systems.items():
            if key.startswith("expert") and key.endswith("_routed"):
                expert = key.removeprefix("expert").removesuffix("_routed")
                lines.append(row(f"expert {expert}, its routed questions", seed, value["scores"]))
                lines.append(
                    row(f"dense, expert {expert}'s routed questions", seed, value["dense_on_same_questions"])
                )

    summary = results["summary"]
    n_seeds = len(results["seeds"])
    spread_note = "mean and sample standard deviation" if n_seeds > 1 else "one seed, so no spread"
    lines += [
        "",
        f"Gaps in accuracy points over {n_seeds} training seed(s) ({spread_note}):",
        "",
        f"- top-1 ensemble minus dense: {_format_spread(summary['gap_top1_minus_dense'])}",
        f"- soft ensemble minus dense: {_format_spread(summary['gap_soft_minus_dense'])}",
        f"- dense minus majority answer: {_format_spread(summary['dense_minus_majority'])}",
        "",
        "## Clusters",
        "",
        f"Training samples per expert: {results['clusters']['train_samples']} "
        f"({results['clusters']['train_skipped']} skipped); test questions per expert: "
        f"{results['clusters']['test_questions']} ({results['clusters']['test_skipped']} skipped). "
        f"Optimiser steps: {results['optimizer_steps']}.",
        "",
        "| expert | images | colours (share) | shapes (share) |",
        "| --- | --- | --- | --- |",
    ]
    for content in results["clusters"]["contents"]:
        colors = ", ".join(
            f"{c} {100 * s:.0f}%" for c, s in sorted(content["colors"].items(), key=lambda x: -x[1])
        )
        shapes = ", ".join(
            f"{c} {100 * s:.0f}%" for c, s in sorted(content["shapes"].items(), key=lambda x: -x[1])
        )
        lines.append(f"| {content['expert']} | {content['images']} | {colors} | {shapes} |")
    retrieval = results["clip_encoder"]["retrieval"]
    lines += [
        "",
        f"Routing encoder: the demo CLIP in `{results['clip_encoder']['path']}` (trained here, not OpenAI's "
        f"weights). Zero-shot caption retrieval on held-out training images: colour "
        f"{percent(retrieval['color_accuracy'])}%, shape {percent(retrieval['shape_accuracy'])}%.",
        "",
        "## Time per stage",
        "",
        "| stage | seconds | reused |",
        "| --- | --- | --- |",
    ]
    for name, seconds in results["stage_seconds"].items():
        lines.append(f"| {name} | {seconds:.1f} | {'yes' if name in results['stages_reused'] else 'no'} |")
    lines += [
        "",
        f"This invocation took {results['total_seconds_this_invocation']:.1f} s.",
        "",
        "## Where things are",
        "",
    ]
    lines += [f"- {name}: `{value}`" for name, value in results["locations"].items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, DemoSettings]:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output-dir", type=Path, default=Path("runs/demo"), help="Where every stage writes."
    )
    parser.add_argument("--force", action="store_true", help="Delete --output-dir and run every stage.")
    parser.add_argument(
        "--max-train-images", type=int, default=None, help="First N training images (all 4000)."
    )
    parser.add_argument("--max-test-images", type=int, default=None, help="First N test images (all 1000).")
    parser.add_argument(
        "--clip-steps", type=int, default=defaults.clip_steps, help="Demo CLIP optimiser steps."
    )
    parser.add_argument(
        "--clip-batch-size", type=int, default=defaults.clip_batch_size, help="Demo CLIP batch."
    )
    parser.add_argument(
        "--fine-clusters", type=int, default=defaults.fine_clusters, help="Fine k-means clusters."
    )
    parser.add_argument(
        "--experts", type=int, default=defaults.experts, help="K: coarse clusters and experts."
    )
    parser.add_argument(
        "--cluster-iterations", type=int, default=defaults.cluster_iterations, help="k-means iterations."
    )
    parser.add_argument(
        "--dense-steps", type=int, default=defaults.dense_steps, help="S: optimiser steps of the dense run."
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="B: dense batch; each expert uses B / K."
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=defaults.learning_rate,
        help="Peak AdamW learning rate (all runs).",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=defaults.max_length,
        help="Training context in tokens; a conversation is cut after this many (image tokens are never cut).",
    )
    parser.add_argument(
        "--num-workers", type=int, default=defaults.num_workers, help="DataLoader workers of every stage."
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=defaults.threads,
        help="OMP_NUM_THREADS of every stage (torch's intra-op threads).",
    )
    parser.add_argument(
        "--eval-batch-size", type=int, default=defaults.eval_batch_size, help="Test questions per batch."
    )
    parser.add_argument(
        "--soft-temperature", type=float, default=defaults.soft_temperature, help="T of softmax(T * cos)."
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=defaults.seeds,
        help="Training seeds: one dense run and K expert runs each. The first also seeds CLIP and k-means.",
    )
    args = parser.parse_args(argv)
    settings = DemoSettings(
        max_train_images=args.max_train_images,
        max_test_images=args.max_test_images,
        clip_steps=args.clip_steps,
        clip_batch_size=args.clip_batch_size,
        fine_clusters=args.fine_clusters,
        experts=args.experts,
        cluster_iterations=args.cluster_iterations,
        dense_steps=args.dense_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        num_workers=args.num_workers,
        threads=args.threads,
        eval_batch_size=args.eval_batch_size,
        soft_temperature=args.soft_temperature,
        seeds=list(dict.fromkeys(args.seeds)),
    )
    return args, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    output_dir = args.output_dir.resolve()
    if args.force and output_dir.exists():
        print(f"--force: deleting {output_dir} and starting over")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # The results files are rewritten at the end; until then an old copy must not pass for this run's.
    for stale in (output_dir / "results.md", output_dir / "results.json"):
        stale.unlink(missing_ok=True)

    start = time.perf_counter()
    paths = DemoPaths(output_dir)
    runner = StageRunner(output_dir)
    try:
        stage_prepare(runner, paths, settings)
        stage_features(runner, paths, settings)
        stage_cluster(runner, paths, settings)
        stage_split(runner, paths, settings)
        predictions = {}
        for seed in settings.seeds:
            checkpoints = stage_train(runner, paths, settings, seed)
            predictions[seed] = stage_test(runner, paths, settings, seed, checkpoints)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    results = collect_results(runner, paths, settings, predictions, time.perf_counter() - start)
    # results.json is written last: its presence marks a complete demo.
    (output_dir / "results.md").write_text(format_results(results))
    write_json_atomic(output_dir / "results.json", results)
    print()
    print(format_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
