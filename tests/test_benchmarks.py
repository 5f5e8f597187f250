"""Smoke runs of the benchmark scripts at their smallest sizes, and the GPU script's CPU-side parts.

No timing is asserted: the runs check that each script still works end to end, that both sides of
each comparison did the same work (equal losses, answers or features), and that the FLOPs count of
the GPU recipe matches the InternVL 2.5-1B shapes worked out by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import feature_extraction, gpu_train, routed_inference, train_overhead  # noqa: E402
from lightning_modules.presets import build_model_config  # noqa: E402

# --threads 0 keeps torch's thread setting, so the smoke runs do not change it for later tests.


def test_train_overhead_smoke():
    rows = train_overhead.main(
        ["--sizes", "tiny", "--steps", "2", "--warmup", "1", "--rounds", "1", "--batch-size", "2",
         "--distinct-batches", "2", "--threads", "0"]
    )  # fmt: skip
    assert len(rows) == 1
    row = dict(zip(train_overhead.HEADERS, rows[0], strict=True))
    assert row["model"] == "tiny"
    assert row["plain step ms"] > 0
    assert row["Lightning step ms"] > 0
    assert row["ratio"] == pytest.approx(row["Lightning step ms"] / row["plain step ms"])
    # Same weights, batches and optimiser: the two loops must compute the same losses.
    assert float(row["max loss diff"]) < 1e-5
    assert row["plain peak RSS MiB"] > 0


@pytest.mark.slow
def test_routed_inference_smoke():
    rows = routed_inference.main(
        ["--sizes", "tiny", "--questions", "4", "--batch-size", "2", "--max-new-tokens", "2", "--rounds", "1",
         "--fine-centroids", "8", "--threads", "0"]
    )  # fmt: skip
    modes = [row[1].split(" (")[0] for row in rows]
    assert modes == ["single", "top-1", "K single", "soft"] * 2
    assert [row[0] for row in rows] == ["tiny, input"] * 4 + ["tiny, by-expert"] * 4
    for row in rows:
        result = dict(zip(routed_inference.HEADERS, row, strict=True))
        assert result["questions/s (wall)"] > 0
        # The experts share one set of weights, so every mode must give the single expert's answers.
        assert result["answers = single"] == "4/4"
    assert rows[1][2] == 2  # top-1 loads K = 2 experts


def test_feature_extraction_smoke():
    rows = feature_extraction.main(
        ["--clip-size", "tiny", "--images", "4", "--width", "40", "--height", "30", "--batch-size", "2",
         "--workers", "0", "--chunk-size", "2", "--rounds", "1", "--threads", "0"]
    )  # fmt: skip
    assert [row[0] for row in rows] == ["bare forward", "extract_features.py, 0 workers"]
    bare, script = rows
    assert bare[1] > 0
    assert script[1] > 0
    assert script[2] == pytest.approx(script[1] / bare[1])
    # The script and the bare forward embed the same images with the same model.
    assert float(script[4]) < 1e-5


def test_gpu_peak_table():
    assert gpu_train.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_train.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_train.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert gpu_train.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_train.peak_bf16_tflops("Tesla T4") is None


def test_gpu_flops_internvl2_5_1b():
    config = build_model_config("internvl2_5-1b")
    counts = gpu_train.linear_weight_counts(config)
    # Qwen2.5-0.5B: per layer q, o 896x896; k, v 896x128; gate, up, down 896x4864; 24 layers; LM head 151674x896.
    llm = 24 * (2 * 896 * 896 + 2 * 896 * 128 + 3 * 896 * 4864) + 151674 * 896
    # InternViT-300M: per layer qkv 1024x3072, proj 1024x1024, fc1 and fc2 1024x4096; 24 layers.
    vision = 24 * (1024 * 3072 + 1024 * 1024 + 2 * 1024 * 4096)
    # Projector: 4096 -> 896 -> 896 after the pixel shuffle.
    projector = 4096 * 896 + 896 * 896
    assert counts == {"vision": vision, "projector": projector, "llm": llm}

    flops = gpu_train.training_flops(config, seq_len=8192, tiles=1)
    assert flops.vision == 3 * (2 * vision * 1025 + 4 * 24 * 1025**2 * 1024)
    assert flops.projector == 3 * 2 * projector * 256
    assert flops.llm == 3 * (2 * llm * 8192 + 2 * 24 * 8192**2 * 896)
    assert flops.total / 1e12 == pytest.approx(35.1, abs=0.1)


def test_gpu_random_sequences_layout(tmp_path):
    processor = gpu_train.build_placeholder_processor(tmp_path, "internvl2_5-1b")
    assert len(processor.tokenizer) == 151674
    config = build_model_config("internvl2_5-1b", processor.tokenizer)
    assert config.text_config.vocab_size == 151674
    data = gpu_train.RandomSequences(config, processor.tokenizer, seq_len=1024, tiles=1, length=2)
    batch = data[0]
    assert batch["input_ids"].shape == (1, 1024)
    assert batch["pixel_values"].shape == (1, 3, 448, 448)
    assert int((batch["input_ids"] == config.image_token_id).sum()) == 256
    assert int((batch["labels"] != -100).sum()) == 1024 - 258
    assert int(batch["input_ids"].max()) < 151674
    assert not torch.equal(data[0]["input_ids"], data[1]["input_ids"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed where CUDA is missing")
def test_gpu_train_exits_without_cuda(capsys):
    assert gpu_train.main([]) is None
    assert "no CUDA device is visible" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_train_cpu_code_path():
    result = gpu_train.main(
        ["--accelerator", "cpu", "--preset", "internvl-tiny", "--seq-len", "64", "--steps", "1", "--warmup", "1",
         "--precision", "32-true"]
    )  # fmt: skip
    assert result["tokens_per_s"] > 0
    assert result["median_step_s"] > 0
    assert result["flops_per_step_per_device"]["total"] > 0
