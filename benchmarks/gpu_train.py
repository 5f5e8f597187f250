"""GPU recipe throughput: `InternVLExpert` on the `internvl2_5-1b` preset under FSDP2.

The run is the expert recipe's training step on random weights. Lightning's
`ModelParallelStrategy` makes each vision and decoder layer its own FSDP2 unit (see
`InternVLExpert.configure_model`), in bf16 mixed precision. Every device trains on one sequence of
`--seq-len` tokens (8192) per step, with one 448x448 tile (256 image tokens). The sequences are random
token ids around one image block, so no dataset or tokenizer download is needed.

The recipe's other settings are those of `configs/expert_internvl2_5_1b.yaml`: gradient
checkpointing on, gradient clipping at 1.0, SDPA attention, AdamW with the module's defaults.

Reported: step time, tokens/s (per device and in all), model FLOPs utilisation (MFU) against the
GPU's dense bf16 peak, and peak GPU memory. The script exits 0 with a message where CUDA is
missing; `--accelerator cpu` runs the same code path with a small preset, only to check it.

FLOPs per sequence and step (training = 3 x forward: the backward pass costs twice the forward;
recomputation under gradient checkpointing is not counted, so this is MFU, not hardware FLOPs
utilisation):

    forward = 2 * P_vision * n_v * tiles + 4 * L_v * n_v^2 * d_v * tiles        (ViT, bidirectional)
            + 2 * P_projector * s * tiles                                      (MLP projector)
            + 2 * P_llm * T + 2 * L * T^2 * d_attn                             (LLM incl. LM head, causal)

P_* are the weights of the `nn.Linear` layers of each part (embedding lookups cost no FLOPs; the
tied LM head is counted as a matmul), n_v = (448 / 14)^2 + 1 = 1025 patch tokens per tile, s =
256 image tokens per tile after pixel shuffle, T = `--seq-len`, d_attn = heads x head_dim. The
causal attention counts half of the T x T score and value matmuls, the bidirectional vision
attention all of them.

Usage:
    python benchmarks/gpu_train.py                      # internvl2_5-1b, 1 GPU, seq 8192
    python benchmarks/gpu_train.py --devices 2 --steps 30
    python benchmarks/gpu_train.py --no-gradient-checkpointing --json runs/gpu_train.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from transformers import InternVLConfig, InternVLForConditionalGeneration  # noqa: E402

from benchmarks._common import PeakRSS, format_table, machine_summary  # noqa: E402
from lightning_modules.presets import (  # noqa: E402
    PRESETS,
    build_model_config,
    build_small_processor,
    get_preset,
    image_seq_length_of,
)

TARGET_MFU = 0.35
IGNORE_INDEX = -100

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets, matched in order
# against `torch.cuda.get_device_name()`; the first substring that matches wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),  # also GH200
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """Return the dense bf16 peak of the GPU called `device_name`, or None when it is not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


# ---------------------------------------------------------------------------------------------
# FLOPs


@dataclass(frozen=True)
class TrainingFlops:
    """Model FLOPs of one training step on one sequence, by part (see the module docstring)."""

    vision: float
    projector: float
    llm: float

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.llm


def linear_weight_counts(config: InternVLConfig) -> dict[str, int]:
    """Count the `nn.Linear` weights (biases excluded) of the vision tower, projector and LLM + LM head.

    The model is built on the meta device, so no memory is allocated.
    """
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    parts = {
        "vision": "model.vision_tower.",
        "projector": "model.multi_modal_projector.",
        "llm": "model.language_model.",
        "lm_head": "lm_head.",
    }
    counts = dict.fromkeys(parts, 0)
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for part, prefix in parts.items():
            if f"{name}.".startswith(prefix):
                counts[part] += module.weight.numel()
    counts["llm"] += counts.pop("lm_head")
    return counts


def training_flops(config: InternVLConfig, seq_len: int, tiles: int = 1) -> TrainingFlops:
    """Return the model FLOPs of one training step on one sequence of `seq_len` tokens with `tiles` tiles."""
    counts = linear_weight_counts(config)
    vision, text = config.vision_config, config.text_config
    image_size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    patch_size = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    vision_tokens = (image_size // patch_size) ** 2 + 1  # patches + the class token
    image_tokens = image_seq_length_of(config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    attention_width = text.num_attention_heads * head_dim

    vision_forward = tiles * (
        2 * counts["vision"] * vision_tokens + 4 * vision.num_hidden_layers * vision_tokens**2 * vision.hidden_size
    )
    projector_forward = tiles * 2 * counts["projector"] * image_tokens
    llm_forward = 2 * counts["llm"] * seq_len + 2 * text.num_hidden_layers * seq_len**2 * attention_width
    return TrainingFlops(vision=3.0 * vision_forward, projector=3.0 * projector_forward, llm=3.0 * llm_forward)


# ---------------------------------------------------------------------------------------------
# Processor and data


def build_placeholder_processor(directory: Path, preset: str) -> Any:
    """Build an InternVL processor for `preset` offline, with the vocabulary size of its real tokenizer.

    The tokenizer is the small preset's byte-level BPE, trained on a few words. Its vocabulary is
    padded with unreachable `<|placeholder_i|>` entries up to the preset's `default_vocab_size`
    (151674 for `internvl2_5-1b`), so the model built from it has the real embedding and LM-head
    shapes. Its text encodings are not Qwen2's, which does not matter for random token ids.
    """
    shapes = get_preset(preset)
    texts = ["what color is the shape in the image", "the shape is a red circle", "yes", "no"] * 4
    build_small_processor(texts, directory, image_size=shapes.image_size, vocab_size=300, preset=preset)
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    first_free = max(vocab.values()) + 1
    if shapes.default_vocab_size < first_free:
        raise ValueError(
            f"preset {preset!r} has default_vocab_size {shapes.default_vocab_size}, below the {first_free} "
            "tokens of the small tokenizer. HINT: raise default_vocab_size in the preset."
        )
    for token_id in range(first_free, shapes.default_vocab_size):
        vocab[f"<|placeholder_{token_id}|>"] = token_id
    path.write_text(json.dumps(data), encoding="utf-8")

    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(directory)


class RandomSequences(Dataset):
    """Training batches of one random sequence each: an image block of `tiles` tiles, then random text.

    Each item is the batch format of the training DataModule with B = 1: `input_ids`,
    `attention_mask` and `labels` of shape (1, seq_len) and `pixel_values` (tiles, 3, H, W). Labels
    cover every text token after the image block.
    """

    def __init__(self, config: InternVLConfig, tokenizer: Any, seq_len: int, tiles: int, length: int, seed: int = 0):
        image_tokens = image_seq_length_of(config) * tiles
        if seq_len < image_tokens + 4:
            raise ValueError(
                f"--seq-len {seq_len} cannot hold {image_tokens} image tokens plus text. HINT: raise --seq-len."
            )
        self.config = config
        self.seq_len = seq_len
        self.tiles = tiles
        self.length = length
        self.seed = seed
        self.image_tokens = image_tokens
        self.start_id = tokenizer.start_image_token_id
        self.end_id = tokenizer.end_image_token_id
        # Text ids lie above every special token, so no sequence contains a stray image token.
        self.first_text_id = max(tokenizer.all_special_ids + [self.start_id, self.end_id, config.image_token_id]) + 1

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + index)
        vocab_size = self.config.text_config.vocab_size
        input_ids = torch.randint(self.first_text_id, vocab_size, (1, self.seq_len), generator=generator)
        block_end = 1 + self.image_tokens  # position of the image end token
        input_ids[0, 0] = self.start_id
        input_ids[0, 1:block_end] = self.config.image_token_id
        input_ids[0, block_end] = self.end_id
        labels = input_ids.clone()
        labels[0, : block_end + 1] = IGNORE_INDEX
        size = self.config.vision_config.image_size
        side = size[0] if isinstance(size, (list, tuple)) else size
        return {
            "input_ids": input_ids,  # (1, L)
            "attention_mask": torch.ones_like(input_ids),  # (1, L)
            "labels": labels,  # (1, L)
            "pixel_values": torch.randn(self.tiles, 3, side, side, generator=generator),  # (T, 3, H, W)
        }


# ---------------------------------------------------------------------------------------------
# The run


def make_step_timer(warmup: int) -> Any:
    """Return a Lightning callback that records the wall time of every step after `warmup` steps."""
    from lightning.pytorch import Callback

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.step_seconds: list[float] = []
            self._last: float | None = None

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's kernels are queued, not finished, until this point
            now = time.perf_counter()
            if self._last is not None and batch_idx >= warmup:
                self.step_seconds.append(now - self._last)
            self._last = now

    return StepTimer()


def run(options: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Train `options.steps` + `options.warmup` steps and return the measurements."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_modules.internvl_module import InternVLExpert

    processor_dir = workdir / "processor"
    processor = build_placeholder_processor(processor_dir, options.preset)
    config = build_model_config(options.preset, processor.tokenizer)
    flops = training_flops(config, options.seq_len, options.tiles)

    expert = InternVLExpert(
        preset=options.preset,
        processor_name_or_path=str(processor_dir),
        gradient_checkpointing=options.gradient_checkpointing,
        attn_implementation=options.attn_implementation,
    )
    timer = make_step_timer(options.warmup)
    trainer = Trainer(
        accelerator=options.accelerator,
        devices=options.devices,
        strategy=ModelParallelStrategy(data_parallel_size=options.devices, tensor_parallel_size=1),
        precision=options.precision,
        gradient_clip_val=options.gradient_clip_val,
        max_steps=options.warmup + options.steps,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=workdir,
    )
    # Lightning's distributed sampler gives each rank 1/devices of the dataset, so every rank needs `steps` items.
    steps = options.warmup + options.steps
    data = RandomSequences(
        config, processor.tokenizer, options.seq_len, options.tiles, length=steps * options.devices, seed=options.seed
    )
    host_peak = PeakRSS()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(expert, DataLoader(data, batch_size=None, num_workers=0))

    step_seconds = sorted(timer.step_seconds)
    median_step = step_seconds[len(step_seconds) // 2]
    n_params = sum(p.numel() for p in expert.model.parameters())  # a DTensor's numel is the global one
    result: dict[str, Any] = {
        "rank": trainer.global_rank,
        "preset": options.preset,
        "parameters": n_params,
        "devices": options.devices,
        "seq_len": options.seq_len,
        "median_step_s": median_step,
        "tokens_per_s_per_device": options.seq_len / median_step,
        "tokens_per_s": options.seq_len * options.devices / median_step,
        "flops_per_step_per_device": asdict(flops) | {"total": flops.total},
        "achieved_tflops_per_device": flops.total / median_step / 1e12,
        "host_peak_rss_mib": host_peak.read(),
    }
    if options.accelerator == "cuda":
        name = torch.cuda.get_device_name()
        peak = options.peak_tflops or peak_bf16_tflops(name)
        result |= {
            "device_name": name,
            "peak_bf16_tflops": peak,
            "mfu": None if peak is None else flops.total / median_step / (peak * 1e12),
            "gpu_max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "gpu_max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
    return result


def print_result(result: dict[str, Any]) -> None:
    flops = result["flops_per_step_per_device"]
    rows = [
        ["preset", result["preset"]],
        ["parameters", f"{result['parameters'] / 1e6:.1f}M"],
        ["devices x sequence", f"{result['devices']} x {result['seq_len']} tokens"],
        ["median step", f"{result['median_step_s'] * 1e3:.1f} ms"],
        ["tokens/s per device", f"{result['tokens_per_s_per_device']:.0f}"],
        ["tokens/s, all devices", f"{result['tokens_per_s']:.0f}"],
        [
            "model TFLOP per step per device",
            f"{flops['total'] / 1e12:.2f} (vision {flops['vision'] / 1e12:.2f}, "
            f"projector {flops['projector'] / 1e12:.3f}, LLM {flops['llm'] / 1e12:.2f})",
        ],
        ["achieved TFLOP/s per device", f"{result['achieved_tflops_per_device']:.1f}"],
    ]
    if "device_name" in result:
        mfu = result["mfu"]
        verdict = "meets" if mfu is not None and mfu >= TARGET_MFU else "misses"
        rows += [
            ["GPU", f"{result['device_name']} (dense bf16 peak {result['peak_bf16_tflops'] or 'unknown'} TFLOP/s)"],
            ["MFU", "n/a (pass --peak-tflops)" if mfu is None else f"{100 * mfu:.1f}% ({verdict} {TARGET_MFU:.0%})"],
            ["GPU peak allocated / reserved", f"{result['gpu_max_allocated_gib']:.1f} / {result['gpu_max_reserved_gib']:.1f} GiB"],
        ]
    rows.append(["host peak RSS (rank 0)", f"{result['host_peak_rss_mib']:.0f} MiB"])
    print(format_table(["measure", "value"], rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="internvl2_5-1b", choices=sorted(PRESETS), help="Model preset.")
    parser.add_argument("--seq-len", type=int, default=8192, help="Tokens per sequence (context length).")
    parser.add_argument("--tiles", type=int, default=1, help="Image tiles per sequence.")
    parser.add_argument("--devices", type=int, default=1, help="GPUs; each trains on one sequence per step.")
    parser.add_argument("--steps", type=int, default=20, help="Timed optimiser steps.")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed optimiser steps first.")
    parser.add_argument("--precision", default="bf16-mixed", help="Lightning precision: bf16-mixed or bf16-true.")
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Recompute each layer's activations in the backward pass (on in configs/expert_internvl2_5_1b.yaml).",
    )
    parser.add_argument(
        "--gradient-clip-val", type=float, default=1.0, help="Gradient norm clipping (1.0 in the expert config)."
    )
    parser.add_argument(
        "--attn-implementation", default="sdpa", help="transformers attention: sdpa, eager or flash_attention_2."
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="Dense bf16 peak of the GPU, for GPUs missing from the table."
    )
    parser.add_argument(
        "--accelerator",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu runs the same code path to check it (use a small --preset); its figures mean nothing.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random sequences.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the measurements to this JSON file.")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    parser = build_parser()
    options = parser.parse_args(argv)
    for name in ("seq_len", "tiles", "devices", "steps", "warmup"):
        if getattr(options, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(options, name)}")
    if options.accelerator == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_train.py: no CUDA device is visible (torch.cuda.is_available() is False), so there is nothing to "
            "measure; exiting without running. Run it on a machine with an NVIDIA GPU and a CUDA build of torch."
        )
        return None
    if options.accelerator == "cuda" and options.devices > torch.cuda.device_count():
        parser.error(f"--devices {options.devices} but only {torch.cuda.device_count()} GPUs are visible")

    print(f"GPU training benchmark. {machine_summary()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-train-") as tmp:
        result = run(options, Path(tmp))
    if result["rank"] == 0:
        print()
        print_result(result)
        if options.json is not None:
            options.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
