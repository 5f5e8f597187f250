"""Conversion of original-layout InternVL 2.5 checkpoints into the native transformers layout."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoProcessor, InternVLForConditionalGeneration

from lightning_modules.convert_checkpoint import convert_checkpoint, convert_state_dict
from lightning_modules.presets import SMALL_PRESET, build_model_config, build_small_processor

TEXTS = ["What color is the shape?", "red", "blue", "Is there a circle?", "yes", "no"] * 10


def to_original_layout(native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename native tensors to the original InternVL chat layout, fusing q/k/v the way InternViT does."""
    original = {}
    layers = {int(key.split(".")[4]) for key in native if key.startswith("model.vision_tower.encoder.layer.")}
    for key, tensor in native.items():
        if key.startswith("model.vision_tower.encoder.layer."):
            continue
        if key == "model.vision_tower.embeddings.cls_token":
            original["vision_model.embeddings.class_embedding"] = tensor
        elif key == "model.vision_tower.embeddings.position_embeddings":
            original["vision_model.embeddings.position_embedding"] = tensor
        elif key.startswith("model.vision_tower.embeddings.patch_embeddings.projection."):
            original["vision_model.embeddings.patch_embedding." + key.rsplit(".", 1)[1]] = tensor
        elif key.startswith("model.multi_modal_projector."):
            module, kind = key.split(".")[2:4]
            index = {"layer_norm": 0, "linear_1": 1, "linear_2": 3}[module]
            original[f"mlp1.{index}.{kind}"] = tensor
        elif key.startswith("model.language_model."):
            original["language_model.model." + key[len("model.language_model.") :]] = tensor
        elif key == "lm_head.weight":
            continue  # tied to the embeddings, as in the released 1B checkpoint, which omits it
        else:
            raise AssertionError(f"test mapping misses {key}")
    for i in layers:
        src = f"model.vision_tower.encoder.layer.{i}."
        dst = f"vision_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            original[dst + f"attn.qkv.{kind}"] = torch.cat(
                [native[src + f"attention.{name}.{kind}"] for name in ("q_proj", "k_proj", "v_proj")]
            )
            original[dst + f"attn.proj.{kind}"] = native[src + f"attention.projection_layer.{kind}"]
            original[dst + f"norm1.{kind}"] = native[src + f"layernorm_before.{kind}"]
            original[dst + f"norm2.{kind}"] = native[src + f"layernorm_after.{kind}"]
            original[dst + f"mlp.fc1.{kind}"] = native[src + f"mlp.fc1.{kind}"]
            original[dst + f"mlp.fc2.{kind}"] = native[src + f"mlp.fc2.{kind}"]
        original[dst + "ls1"] = native[src + "lambda_1"]
        original[dst + "ls2"] = native[src + "lambda_2"]
    return original


def original_config(config) -> dict:
    vision, text = config.vision_config, config.text_config
    llm = text.to_dict()
    llm["architectures"] = ["Qwen2ForCausalLM"]
    return {
        "model_type": "internvl_chat",
        "architectures": ["InternVLChatModel"],
        "downsample_ratio": config.downsample_ratio,
        "force_image_size": vision.image_size[0],
        "select_layer": -1,
        "ps_version": "v2",
        "template": "internvl2_5",
        "vision_config": {
            "model_type": "intern_vit_6b",
            "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads,
            "intermediate_size": vision.intermediate_size,
            "image_size": vision.image_size[0],
            "patch_size": vision.patch_size[0],
            "qkv_bias": True,
            "qk_normalization": False,
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "initializer_factor": 0.1,
            "hidden_act": "gelu",
        },
        "llm_config": llm,
    }


@pytest.fixture(scope="module")
def original_checkpoint(tmp_path_factory):
    """A tiny native model and the same weights saved in the original layout, with the tokenizer."""
    processor_dir = tmp_path_factory.mktemp("processor")
    processor = build_small_processor(TEXTS, processor_dir)
    config = build_model_config(SMALL_PRESET, processor.tokenizer)
    torch.manual_seed(0)
    native = InternVLForConditionalGeneration(config).eval()
    # Layer scales start at 0.1 everywhere; distinct values make a swapped ls1/ls2 visible.
    with torch.no_grad():
        for parameter in native.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)

    source_dir = tmp_path_factory.mktemp("original")
    state_dict = {key: value.contiguous() for key, value in native.state_dict().items()}
    save_file(to_original_layout(state_dict), source_dir / "model.safetensors")
    (source_dir / "config.json").write_text(json.dumps(original_config(config)))
    processor.tokenizer.save_pretrained(source_dir)
    return native, processor, source_dir


def test_every_tensor_maps_strictly(original_checkpoint):
    native, _, source_dir = original_checkpoint
    original = to_original_layout(native.state_dict())
    converted = convert_state_dict(original, tie_word_embeddings=True)
    assert set(converted) == set(native.state_dict())
    fresh = InternVLForConditionalGeneration(native.config)
    result = fresh.load_state_dict(converted, strict=True)
    assert not result.missing_keys
    assert not result.unexpected_keys


def test_qkv_split_order(original_checkpoint):
    native, _, source_dir = original_checkpoint
    original = to_original_layout(native.state_dict())
    converted = convert_state_dict(original, tie_word_embeddings=True)
    weight = original["vision_model.encoder.layers.1.attn.qkv.weight"]  # (3D, D)
    bias = original["vision_model.encoder.layers.1.attn.qkv.bias"]  # (3D,)
    hidden = weight.shape[1]
    heads = native.config.vision_config.num_attention_heads

    # InternViT's own attention: qkv(x).reshape(B, N, 3, heads, head_dim), then q, k, v = unbind.
    torch.manual_seed(1)
    x = torch.randn(2, 5, hidden)
    qkv = (x @ weight.T + bias).reshape(2, 5, 3, heads, hidden // heads).permute(2, 0, 3, 1, 4)
    q_ref, k_ref, v_ref = qkv.unbind(0)  # each (B, heads, N, head_dim)
    prefix = "model.vision_tower.encoder.layer.1.attention."
    for name, reference in (("q_proj", q_ref), ("k_proj", k_ref), ("v_proj", v_ref)):
        projected = x @ converted[prefix + name + ".weight"].T + converted[prefix + name + ".bias"]
        projected = projected.reshape(2, 5, heads, hidden // heads).transpose(1, 2)
        torch.testing.assert_close(projected, reference)


def test_converted_checkpoint_matches_logits(original_checkpoint, tmp_path):
    native, processor, source_dir = original_checkpoint
    output_dir = convert_checkpoint(source_dir, tmp_path / "native")
    model = InternVLForConditionalGeneration.from_pretrained(output_dir).eval()
    reloaded = AutoProcessor.from_pretrained(output_dir)
    assert reloaded.image_seq_length == 16
    assert model.config.image_token_id == processor.image_token_id

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    batch = reloaded(images=[image], text=["<|im_start|>user\n<IMG_CONTEXT>\nWhat color?"], return_tensors="pt")
    with torch.no_grad():
        expected = native(**batch).logits
        actual = model(**batch).logits
    torch.testing.assert_close(actual, expected)


def test_unknown_tensor_is_rejected(original_checkpoint):
    native, _, _ = original_checkpoint
    original = to_original_layout(native.state_dict())
    original["vision_model.pooler.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="vision_model.pooler.weight"):
        convert_state_dict(original, tie_word_embeddings=True)


def test_internlm2_checkpoint_is_rejected(original_checkpoint, tmp_path):
    _, processor, source_dir = original_checkpoint
    config = json.loads((source_dir / "config.json").read_text())
    config["llm_config"]["model_type"] = "internlm2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    processor.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'internlm2'; only 'qwen2'"):
        convert_checkpoint(tmp_path, tmp_path / "out")


def test_missing_checkpoint_dir_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_checkpoint(tmp_path / "nowhere", tmp_path / "out")
