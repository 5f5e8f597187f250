"""Model presets and the small offline processor."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, InternVLForConditionalGeneration

from lightning_modules.presets import (
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    SMALL_PRESET,
    build_model_config,
    build_small_processor,
    check_image_seq_length,
    get_preset,
    image_seq_length_of,
)

TEXTS = [
    "What color is the shape?",
    "The shape is red.",
    "Is there a blue circle in the image?",
    "yes",
    "no",
    "What shape is in the image?",
    "triangle",
]


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("processor")
    build_small_processor(TEXTS * 20, output_dir)
    return output_dir


def test_processor_reloads_offline(processor_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    processor = AutoProcessor.from_pretrained(processor_dir)
    tokenizer = processor.tokenizer
    assert processor.image_seq_length == 16
    assert processor.image_token == IMG_CONTEXT
    assert processor.image_token_id == tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    assert processor.start_image_token_id == tokenizer.convert_tokens_to_ids(IMG_START)
    assert processor.end_image_token_id == tokenizer.convert_tokens_to_ids(IMG_END)
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"


def test_processor_expands_one_tile(processor_dir):
    processor = AutoProcessor.from_pretrained(processor_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>user\n<IMG_CONTEXT>\n")
    assert prompt.endswith("<|im_start|>assistant\n")

    image = Image.fromarray(np.zeros((50, 90, 3), dtype=np.uint8))  # not square: still one tile
    batch = processor(images=[image], text=[prompt], return_tensors="pt")
    assert tuple(batch["pixel_values"].shape) == (1, 3, 64, 64)
    n_context = int((batch["input_ids"] == processor.image_token_id).sum())
    assert n_context == 16


def test_unseen_text_round_trips(processor_dir):
    tokenizer = AutoProcessor.from_pretrained(processor_dir).tokenizer
    text = "Zebra crossing, 42 ü!"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tiny_model_matches_processor(processor_dir):
    processor = AutoProcessor.from_pretrained(processor_dir)
    config = build_model_config(SMALL_PRESET, processor.tokenizer)
    assert config.text_config.vocab_size == len(processor.tokenizer)
    assert config.image_token_id == processor.image_token_id
    assert image_seq_length_of(config) == processor.image_seq_length
    check_image_seq_length(config, processor)

    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config)
    prompt = "<|im_start|>user\n<IMG_CONTEXT>\nWhat color?<|im_end|>\n"
    image = Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8))
    batch = processor(images=[image], text=[prompt], return_tensors="pt")
    output = model(**batch, labels=batch["input_ids"])
    assert output.logits.shape == (1, batch["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(output.loss)


def test_internvl2_5_1b_shapes():
    config = build_model_config("internvl2_5-1b")
    assert image_seq_length_of(config) == 256
    assert config.image_token_id == 151667
    assert config.text_config.hidden_size == 896
    assert config.text_config.num_hidden_layers == 24
    assert config.vision_config.hidden_size == 1024
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    n_params = sum(p.numel() for p in model.parameters())
    # InternViT-300M (about 304M) + Qwen2.5-0.5B (about 494M, tied embeddings) + projector.
    assert 790e6 < n_params < 820e6


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="internvl2_5-1b") as error:
        get_preset("internvl-huge")
    assert "internvl-huge" in str(error.value)


def test_image_seq_length_mismatch_is_rejected(processor_dir):
    processor = AutoProcessor.from_pretrained(processor_dir)
    config = build_model_config("internvl2_5-1b")
    with pytest.raises(ValueError, match="image_seq_length=16 does not match the model's 256"):
        check_image_seq_length(config, processor)


def test_wrong_image_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="image_size=448 does not match"):
        build_small_processor(TEXTS, tmp_path, image_size=448)
