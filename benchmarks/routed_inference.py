"""Routed inference: the top-1 `RoutedEnsemble` against one expert, and soft routing against K experts.

All K experts are copies of one randomly initialised checkpoint, so every mode decodes the same
tokens and does the same model work per question. Only the routing and the batching differ.
Each mode answers the same `--questions` evaluation questions in batches of `--batch-size`, with
greedy decoding of up to `--max-new-tokens` tokens:

- single: `InternVLExpert.generate_answers` of one expert on every batch.
- top-1: per batch, `Router.scores` and `Router.route` on the questions' CLIP features (a
  two-stage clustering with `--fine-centroids` fine centroids), then `RoutedEnsemble.answer_batch`,
  which groups the batch by expert and decodes each group in one `generate_answers` call.
- K single: each of the K experts answers every batch (what running K experts one after another
  costs).
- soft: `RoutedEnsemble.answer_batch` in soft mode, which decodes from the mixture of all K
  experts, each with its own KV cache.

Two question orders are measured. `input` batches the questions in their input order, as the
evaluation split is read, so every batch mixes the experts' questions and top-1 splits it into K
smaller generations. `by-expert` sorts the questions by route first, so a batch holds one expert's
questions except where two experts' runs meet.

The table gives questions per second of wall time and per second of process CPU time, top-1 /
single (target: at least 0.9) and soft / K single, the share of answers equal to the single
expert's (all of them, because the experts share weights), and the peak resident memory of each
mode, loading included. Every batch is answered by all modes in turn, in a rotating order, so that
a change in machine load reaches all modes alike; the median of `--rounds` rounds is reported. On
a shared machine the CPU-time figures are the steadier ones, because they leave out the time the
process waited for a core.

Usage:
    python benchmarks/routed_inference.py --sizes tiny,40m --experts 2 --questions 32 --batch-size 16
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import (  # noqa: E402
    PeakRSS,
    build_benchmark_processor,
    build_checkpoint,
    check_model_sizes,
    encode_samples,
    evaluation_batch,
    format_table,
    limit_threads,
    machine_summary,
    median,
    parse_list,
)
from clustering.router import COARSE_CENTROIDS, FINE_CENTROIDS, FINE_TO_COARSE, Router  # noqa: E402
from datamodules.chat import ConversationEncoder  # noqa: E402
from lightning_modules.ensemble import RoutedEnsemble, load_expert  # noqa: E402

TARGET_TOP1_RATIO = 0.9
FEATURE_DIM = 512  # CLIP ViT-B/16 image embeddings
ORDERS = ("input", "by-expert")


def write_two_stage_clustering(directory: Path, n_fine: int, n_experts: int, seed: int) -> np.ndarray:
    """Write a two-stage clustering results directory; return the (F, D) unit fine centroids.

    Fine centroid f belongs to expert f % K; each coarse centroid is the normalised mean of its fine ones.
    """
    rng = np.random.default_rng(seed)
    fine = rng.standard_normal((n_fine, FEATURE_DIM)).astype(np.float32)
    fine /= np.linalg.norm(fine, axis=1, keepdims=True)
    owner = np.arange(n_fine, dtype=np.int64) % n_experts
    coarse = np.stack([fine[owner == k].mean(axis=0) for k in range(n_experts)])
    coarse /= np.linalg.norm(coarse, axis=1, keepdims=True)
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / FINE_CENTROIDS, fine)
    np.save(directory / FINE_TO_COARSE, owner)
    np.save(directory / COARSE_CENTROIDS, coarse.astype(np.float32))
    return fine


def question_features(fine_centroids: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Return (n, D) unit features, each near a random fine centroid, so routes spread over the experts."""
    rng = np.random.default_rng(seed + 1)
    nearest = rng.integers(0, len(fine_centroids), size=n)
    features = fine_centroids[nearest] + 0.05 * rng.standard_normal((n, fine_centroids.shape[1])).astype(np.float32)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def route_batch(router: Router, batch: dict[str, Any], features: np.ndarray) -> None:
    """Write the router's top-1 experts and scores for `features` (B, D) into the batch."""
    scores = router.scores(features)  # (B, K)
    routes = router.route(features)
    batch["expert"] = torch.from_numpy(routes.experts)
    batch["route_scores"] = torch.from_numpy(scores)


@dataclass
class ModeTimes:
    """Wall and CPU seconds that one mode spent on each round, summed over the batches."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def measure_size(
    size: str, order: str, checkpoint: Path, options: argparse.Namespace, workdir: Path, processor: Any
) -> list[list[Any]]:
    """Measure the four modes on the `size` model with the questions in `order`; return its table rows."""
    clustering_dir = workdir / "clusters"
    fine = write_two_stage_clustering(clustering_dir, options.fine_centroids, options.experts, options.seed)
    features = question_features(fine, options.questions, options.seed)
    router = Router.from_dir(clustering_dir)
    routes = router.route(features).experts
    route_counts = np.bincount(routes, minlength=options.experts)

    encoder = ConversationEncoder(processor, max_length=512)
    samples = encode_samples(encoder, options.questions, seed=options.seed, n_experts=options.experts)
    if order == "by-expert":
        # What an evaluation loader that reads the questions expert by expert would batch: every batch but
        # the ones at a boundary between experts contains one expert's questions.
        permutation = np.argsort(routes, kind="stable")
        samples = [samples[i] for i in permutation]
        features = features[permutation]
    size_b = options.batch_size
    batches = [evaluation_batch(samples[i : i + size_b], encoder.pad_token_id) for i in range(0, len(samples), size_b)]
    batch_features = [features[i : i + size_b] for i in range(0, len(samples), size_b)]

    def single() -> Callable[[int], list[str]]:
        expert = load_expert(str(checkpoint), 0, options.max_new_tokens)
        return lambda index: expert.generate_answers(batches[index])

    def k_single() -> Callable[[int], list[str]]:
        experts = [load_expert(str(checkpoint), k, options.max_new_tokens) for k in range(options.experts)]

        def answer(index: int) -> list[str]:
            per_expert = [expert.generate_answers(batches[index]) for expert in experts]
            return per_expert[0]

        return answer

    def ensemble(mode: str) -> Callable[[], Callable[[int], list[str]]]:
        def build() -> Callable[[int], list[str]]:
            module = RoutedEnsemble(
                checkpoints=[str(checkpoint)] * options.experts,
                clustering_dir=str(clustering_dir),
                mode=mode,
                temperature=options.temperature,
                max_new_tokens=options.max_new_tokens,
            )
            module.configure_model()

            def answer(index: int) -> list[str]:
                route_batch(router, batches[index], batch_features[index])
                return module.answer_batch(batches[index])[0]

            return answer

        return build

    builders = {"single": single, "top-1": ensemble("top1"), "K single": k_single, "soft": ensemble("soft")}
    names = list(builders)

    # Memory: each mode alone in the process, from loading its experts through answering one batch.
    peak = PeakRSS()
    memory: dict[str, float] = {}
    for mode in names:
        gc.collect()
        peak.reset()
        builders[mode]()(0)
        memory[mode] = peak.read()
    gc.collect()

    # Time: all modes loaded; every batch is answered by each mode in turn, in a rotating order, so that
    # a change in machine load reaches all modes alike.
    answer_fns = {mode: build() for mode, build in builders.items()}
    times = {mode: ModeTimes() for mode in names}
    answers: dict[str, list[str]] = {mode: [] for mode in names}
    for round_index in range(options.rounds):
        for mode in names:
            times[mode].wall.append(0.0)
            times[mode].cpu.append(0.0)
        for index in range(len(batches)):
            shift = (round_index * len(batches) + index) % len(names)
            for mode in names[shift:] + names[:shift]:
                wall, cpu = time.perf_counter(), time.process_time()
                batch_answers = answer_fns[mode](index)
                times[mode].wall[-1] += time.perf_counter() - wall
                times[mode].cpu[-1] += time.process_time() - cpu
                if round_index == 0:
                    answers[mode].extend(batch_answers)
        summary = ", ".join(f"{mode} {options.questions / times[mode].wall[-1]:.2f}" for mode in names)
        print(f"  {size}, {order} order, round {round_index + 1}/{options.rounds} questions/s: {summary}", flush=True)

    wall_qps = {mode: options.questions / median(times[mode].wall) for mode in names}
    cpu_qps = {mode: options.questions / median(times[mode].cpu) for mode in names}
    reference = answers["single"]

    def agreement(mode: str) -> str:
        same = sum(a == b for a, b in zip(answers[mode], reference, strict=True))
        return f"{same}/{len(reference)}"

    top1 = wall_qps["top-1"] / wall_qps["single"]
    top1_cpu = cpu_qps["top-1"] / cpu_qps["single"]
    soft = wall_qps["soft"] / wall_qps["K single"]
    soft_cpu = cpu_qps["soft"] / cpu_qps["K single"]
    verdict = "meets" if top1 >= TARGET_TOP1_RATIO else "misses"
    routes = "/".join(str(int(count)) for count in route_counts)
    experts = options.experts
    size = f"{size}, {order}"
    return [
        [size, "single", 1, wall_qps["single"], cpu_qps["single"], "", agreement("single"), memory["single"]],
        [
            size,
            f"top-1 (routes {routes})",
            experts,
            wall_qps["top-1"],
            cpu_qps["top-1"],
            f"top-1/single {top1:.3f} ({verdict} {TARGET_TOP1_RATIO}), CPU {top1_cpu:.3f}",
            agreement("top-1"),
            memory["top-1"],
        ],
        [size, "K single", experts, wall_qps["K single"], cpu_qps["K single"], "", agreement("K single"), memory["K single"]],
        [
            size,
            "soft",
            experts,
            wall_qps["soft"],
            cpu_qps["soft"],
            f"soft/K single {soft:.3f}, CPU {soft_cpu:.3f}",
            agreement("soft"),
            memory["soft"],
        ],
    ]


HEADERS = [
    "model, question order",
    "mode",
    "experts loaded",
    "questions/s (wall)",
    "questions/CPU-s",
    "ratio (wall-clock, then CPU time)",
    "answers = single",
    "peak RSS MiB",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,40m", help="Comma-separated model sizes: tiny, 40m.")
    parser.add_argument(
        "--orders",
        default="input,by-expert",
        help="Question orders to batch in: input (random routes in every batch, as the evaluation split is read) "
        "and by-expert (sorted by route first).",
    )
    parser.add_argument("--experts", type=int, default=2, help="K, the number of experts.")
    parser.add_argument("--questions", type=int, default=32, help="Evaluation questions per mode and round.")
    parser.add_argument("--batch-size", type=int, default=16, help="Questions per evaluation batch.")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="Maximum answer length in tokens (greedy decoding).")
    parser.add_argument("--fine-centroids", type=int, default=1024, help="Fine centroids of the two-stage router.")
    parser.add_argument("--temperature", type=float, default=20.0, help="T of the soft weights softmax(T * cos).")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds over all modes, alternating their order.")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared machine; 0: torch's default)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights, data and centroids.")
    return parser


def main(argv: Sequence[str] | None = None) -> list[list[Any]]:
    parser = build_parser()
    options = parser.parse_args(argv)
    sizes = parse_list(options.sizes)
    orders = parse_list(options.orders)
    unknown_orders = [order for order in orders if order not in ORDERS]
    if unknown_orders or not orders:
        parser.error(f"--orders must list some of {', '.join(ORDERS)}, got {options.orders!r}")
    try:
        check_model_sizes(sizes)
    except ValueError as error:
        parser.error(str(error))
    for name in ("experts", "questions", "batch_size", "max_new_tokens", "rounds"):
        if getattr(options, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(options, name)}")
    if options.fine_centroids < options.experts:
        parser.error(f"--fine-centroids ({options.fine_centroids}) must be >= --experts ({options.experts})")
    limit_threads(options.threads)

    print(f"Routed inference benchmark. {machine_summary()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="routed-inference-") as tmp:
        workdir = Path(tmp)
        processor = build_benchmark_processor(workdir / "processor")
        for size in sizes:
            checkpoint = build_checkpoint(size, processor, workdir / f"checkpoint-{size}", seed=options.seed)
            for order in orders:
                rows.extend(measure_size(size, order, checkpoint, options, workdir, processor))
    print()
    print(format_table(HEADERS, rows))
    return rows


if __name__ == "__main__":
    main()
