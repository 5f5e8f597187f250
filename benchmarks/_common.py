"""Shared parts of the benchmark scripts: machine description, peak memory, tables and test models.

The benchmark models are the project's own classes with random weights: the `internvl-tiny` preset
and a ~40M-parameter variant of it (`MODEL_SIZES`), each saved as a `save_pretrained` checkpoint
directory with its processor, so that every script loads them through the same
`InternVLExpert(model_name_or_path=...)` path as a trained expert.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import re
import statistics
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.chat import ConversationEncoder
from datamodules.collate import EvalCollator, TrainCollator
from datamodules.synthetic import make_conversation, make_image
from lightning_modules.presets import PRESETS, SMALL_PRESET, Preset, build_model_config, build_small_processor

# ---------------------------------------------------------------------------------------------
# Machine and environment


def cpu_model_name() -> str:
    """Return the CPU model name from /proc/cpuinfo (what `lscpu` prints as "Model name")."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else platform.processor() or "unknown"


def usable_cpus() -> int:
    """Return the CPUs this process may run on (what `nproc` prints)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_summary() -> str:
    """Return one line with the date, CPU, core count, load and library versions, for the results record."""
    import lightning
    import transformers

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{now}; CPU: {cpu_model_name()}, nproc {usable_cpus()}, torch threads {torch.get_num_threads()}, "
        f"load average {load}; "
        f"python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
        f"transformers {transformers.__version__}"
    )


def limit_threads(threads: int) -> None:
    """Set torch's intra-op threads and the BLAS/OpenMP pools of numpy to `threads`; 0 changes nothing.

    numpy's BLAS keeps its own pool: on a 2-core machine shared with other jobs, a (4, 512) x (512, 1024)
    routing matmul took 40 ms with the default pool and 0.3 ms with one thread.
    """
    if threads <= 0:
        return
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)


# ---------------------------------------------------------------------------------------------
# Peak memory


class PeakRSS:
    """Peak resident set size of this process over a stretch of code, in MiB.

    On Linux, `reset()` writes 5 to /proc/self/clear_refs, which sets the kernel's high-water mark
    (VmHWM) back to the current RSS, and `read()` returns VmHWM. Elsewhere `reset()` does nothing and
    `read()` returns `ru_maxrss`, the peak since the process started, so the figures are then upper
    bounds that include earlier work; `resettable` is True in the first case.
    """

    def __init__(self) -> None:
        self.resettable = self._try_reset()

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        """Start a new measurement at the current resident size."""
        self.resettable = self._try_reset()

    def read(self) -> float:
        """Return the peak resident size since the last `reset()` (see the class note), in MiB."""
        if self.resettable:
            status = Path("/proc/self/status").read_text()
            match = re.search(r"^VmHWM:\s*(\d+)\s*kB", status, flags=re.MULTILINE)
            if match:
                return int(match.group(1)) / 1024
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is in KiB on Linux and in bytes on macOS.
        return peak / (1024 * 1024) if platform.system() == "Darwin" else peak / 1024


class ProcessTreeRSS:
    """Sample the summed RSS of this process and its children (DataLoader workers) every `interval` s.

    Use as a context manager; `peak_mib` is the largest sum seen. Pages shared between processes (the
    torch libraries that every worker maps) count once per process, so the sum overstates the memory
    that the job takes from the machine. Needs psutil (in the `dev` extra); without it `peak_mib` is None.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ProcessTreeRSS:
        try:
            import psutil
        except ImportError:
            return self
        process = psutil.Process()
        self.peak_mib = 0.0

        def sample() -> None:
            while not self._stop.is_set():
                total = 0
                for member in [process, *process.children(recursive=True)]:
                    try:
                        total += member.memory_info().rss
                    except psutil.Error:  # the worker exited between listing and reading
                        continue
                self.peak_mib = max(self.peak_mib or 0.0, total / (1024 * 1024))
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# ---------------------------------------------------------------------------------------------
# Timing and tables


def median(values: Sequence[float]) -> float:
    """Return the median of `values`; raise `ValueError` on an empty sequence."""
    if not values:
        raise ValueError("no timings were recorded; raise the number of steps or batches.")
    return float(statistics.median(values))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Render a Markdown table; floats get 4 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_list(text: str) -> list[str]:
    """Split a comma-separated command-line value into its non-empty items."""
    return [item.strip() for item in text.split(",") if item.strip()]


# ---------------------------------------------------------------------------------------------
# Benchmark models and data

# Model sizes the scripts accept. "tiny" is the small CPU preset; "40m" keeps its 64 px images and
# tokenizer but widens and deepens both towers to about 40M parameters (28M in the language model).
MODEL_SIZES: dict[str, Preset] = {
    "tiny": PRESETS[SMALL_PRESET],
    "40m": dataclasses.replace(
        PRESETS[SMALL_PRESET],
        vision_hidden_size=384,
        vision_layers=6,
        vision_heads=6,
        vision_intermediate_size=1536,
        text_hidden_size=512,
        text_layers=10,
        text_heads=8,
        text_kv_heads=2,
        text_intermediate_size=1408,
    ),
}


def check_model_sizes(sizes: Sequence[str]) -> None:
    """Raise `ValueError` naming the valid sizes when one of `sizes` is unknown."""
    unknown = [size for size in sizes if size not in MODEL_SIZES]
    if unknown:
        raise ValueError(f"unknown model sizes {unknown}; valid sizes: {', '.join(MODEL_SIZES)}.")


def benchmark_texts(n: int = 200, seed: int = 0) -> list[str]:
    """Return `n` question-answer texts of the synthetic dataset, to train the small tokenizer on."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        for turn in make_conversation(rng, 3):
            texts.append(turn["value"].replace("<image>\n", ""))
    return texts


def build_benchmark_processor(directory: Path) -> Any:
    """Build and save the small preset's processor (64 px tiles, 16 image tokens) into `directory`."""
    return build_small_processor(benchmark_texts(), directory)


def build_checkpoint(size: str, processor: Any, directory: Path, seed: int = 0) -> Path:
    """Save a randomly initialised InternVL model of `size` with `processor` as a checkpoint directory.

    The config comes from `build_model_config`, so it has the preset's structure and the tokenizer's
    vocabulary and token ids. Returns `directory`.
    """
    from transformers import InternVLForConditionalGeneration

    check_model_sizes([size])
    name = f"benchmark-{size}"
    PRESETS[name] = MODEL_SIZES[size]
    try:
        config = build_model_config(name, processor.tokenizer)
    finally:
        del PRESETS[name]
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def count_parameters(model: torch.nn.Module) -> int:
    """Return the number of parameters of `model` (tied weights counted once)."""
    return sum(parameter.numel() for parameter in model.parameters())


def encode_samples(
    encoder: ConversationEncoder,
    n: int,
    seed: int = 0,
    n_experts: int = 1,
    image_size: int = 64,
    max_turns: int = 3,
) -> list[dict[str, Any]]:
    """Encode `n` synthetic single-image conversations into the per-sample dicts the collators take.

    Each sample carries the training keys, the evaluation prompt of its first question and the
    question fields; `expert` and `route_scores` are placeholders that the caller overwrites when it
    routes the samples.
    """
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(n):
        image = make_image(rng, image_size)
        conversation = make_conversation(rng, int(rng.integers(1, max_turns + 1)))
        pixel_values, tiles = encoder.encode_images([image])
        text = encoder.encode_text(conversation, tiles)
        question = conversation[0]["value"].replace("<image>\n", "")
        samples.append(
            {
                "input_ids": text.input_ids,
                "labels": text.labels,
                "prompt_ids": text.prompt_ids,
                "pixel_values": pixel_values,
                "question_id": f"q{index:05d}",
                "question": question,
                "gt_answers": [conversation[1]["value"]],
                "benchmark": "easyvqa",
                "question_type": "",
                "expert": 0,
                "route_scores": [0.0] * n_experts,
            }
        )
    return samples


def training_batches(encoder: ConversationEncoder, n_batches: int, batch_size: int, seed: int = 0) -> list[dict]:
    """Return `n_batches` collated training batches of `batch_size` synthetic samples each."""
    samples = encode_samples(encoder, n_batches * batch_size, seed=seed)
    collate = TrainCollator(encoder.pad_token_id)
    return [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]


def evaluation_batch(samples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Collate evaluation samples into one batch of the evaluation format."""
    return EvalCollator(pad_token_id)(samples)
