"""Shared pytest fixtures. Each part appends its own fixtures below, offline and small."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
