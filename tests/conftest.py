"""Shared pytest fixtures. Each part appends its own fixtures below, offline and small."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Rendezvous variables that Lightning's spawn launchers write into os.environ and leave there.
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


@pytest.fixture(autouse=True)
def fresh_distributed_env():
    """Clear the rendezvous variables around each test.

    A MASTER_PORT left by an earlier distributed test would make the next one bind the same port
    and fail with EADDRINUSE; without it, Lightning picks a free port.
    """
    for key in DISTRIBUTED_ENV:
        os.environ.pop(key, None)
    yield
    for key in DISTRIBUTED_ENV:
        os.environ.pop(key, None)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised full `CLIPModel` (32 px images, 16-d projection) with its image processor.

    It is saved the way `CLIPModel.save_pretrained` writes a real checkpoint, so it loads through the
    same `from_pretrained` path as ``openai/clip-vit-base-patch16``.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        directory
    )
    return directory


# ---- InternVL expert fixtures (lightning_modules) ---------------------------------------------

INTERNVL_COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}


@pytest.fixture(scope="session")
def tiny_internvl_processor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small preset's processor (64 px, 16 image tokens), tokenizer trained on colour questions."""
    from lightning_modules.presets import build_small_processor

    directory = tmp_path_factory.mktemp("tiny_internvl_processor")
    texts = [f"What color is the image? {color}" for color in INTERNVL_COLORS] * 20
    build_small_processor(texts, directory)
    return directory


@pytest.fixture(scope="session")
def tiny_internvl_batch(tiny_internvl_processor_dir: Path) -> dict:
    """One evaluation batch of 8 single-colour 64x64 images asking for the colour, built by the datamodules' encoder.

    It carries every key of the evaluation batch format (training keys, left-padded prompt, question
    fields), so it serves training and evaluation steps alike.
    """
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    import lightning_modules.presets  # noqa: F401  (registers the processor class with AutoProcessor)
    from datamodules.chat import ConversationEncoder
    from datamodules.collate import EvalCollator

    processor = AutoProcessor.from_pretrained(tiny_internvl_processor_dir)
    encoder = ConversationEncoder(processor, max_length=128)
    samples = []
    for index, (color, rgb) in enumerate(list(INTERNVL_COLORS.items()) * 2):
        image = Image.fromarray(np.full((64, 64, 3), rgb, dtype=np.uint8))
        pixel_values, tiles = encoder.encode_images([image])
        conversation = [
            {"from": "human", "value": "<image>\nWhat color is the image?"},
            {"from": "gpt", "value": color},
        ]
        text = encoder.encode_text(conversation, tiles)
        samples.append(
            {
                "input_ids": text.input_ids,
                "labels": text.labels,
                "prompt_ids": text.prompt_ids,
                "pixel_values": pixel_values,
                "question_id": f"q{index}",
                "question": "What color is the image?",
                "gt_answers": [color],
                "benchmark": "easyvqa",
                "question_type": "color",
                "expert": 0,
                "route_scores": [1.0],
            }
        )
    return EvalCollator(processor.tokenizer.pad_token_id)(samples)
