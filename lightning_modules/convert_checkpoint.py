"""Convert an original-layout InternVL 2.5 checkpoint into transformers' native InternVL layout.

The original checkpoints (`model_type: internvl_chat`, loaded upstream with `trust_remote_code`) store
`vision_model.*` (InternViT with a fused `attn.qkv`), `mlp1.*` (the projector as an `nn.Sequential`) and
`language_model.*` (a `Qwen2ForCausalLM`). The native `InternVLForConditionalGeneration` keeps the same
computation under other names and with separate q/k/v projections. This module maps every tensor, loads
the result strictly (no key missing, none left over) and saves a directory that
`InternVLForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained` read without remote
code.

Run as a script from the repository root:

    python lightning_modules/convert_checkpoint.py /path/to/InternVL2_5-1B-Pretrain runs/internvl2_5-1b-native

Only Qwen2 language models are supported (InternVL 2.5-1B, 4B, 38B, 78B); the InternLM2-based sizes
raise an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    Qwen2Config,
)
from transformers.utils import is_torchvision_available

from lightning_modules.presets import (
    CHAT_TEMPLATE,
    IMG_CONTEXT,
    INTERNVL_TOKEN_ATTRIBUTES,
    InternVLImageTextProcessor,
)

log = logging.getLogger(__name__)

# (original-key regex, native-key template). Checked in order; every original key must match one rule.
# The fused `attn.qkv` is handled separately (see `_split_qkv`).
_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^vision_model\.embeddings\.class_embedding$"), "model.vision_tower.embeddings.cls_token"),
    (
        re.compile(r"^vision_model\.embeddings\.position_embedding$"),
        "model.vision_tower.embeddings.position_embeddings",
    ),
    (
        re.compile(r"^vision_model\.embeddings\.patch_embedding\.(weight|bias)$"),
        r"model.vision_tower.embeddings.patch_embeddings.projection.\1",
    ),
    (
        re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)$"),
        r"model.vision_tower.encoder.layer.\1.attention.projection_layer.\2",
    ),
    (
        re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.(weight|bias)$"),
        r"model.vision_tower.encoder.layer.\1.attention.\2.\3",
    ),
    (
        re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)$"),
        r"model.vision_tower.encoder.layer.\1.layernorm_before.\2",
    ),
    (
        re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)$"),
        r"model.vision_tower.encoder.layer.\1.layernorm_after.\2",
    ),
    (re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.ls1$"), r"model.vision_tower.encoder.layer.\1.lambda_1"),
    (re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.ls2$"), r"model.vision_tower.encoder.layer.\1.lambda_2"),
    (
        re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"),
        r"model.vision_tower.encoder.layer.\1.mlp.\2.\3",
    ),
    # mlp1 = Sequential(LayerNorm, Linear, GELU, Linear): indices 0, 1 and 3 carry weights.
    (re.compile(r"^mlp1\.0\.(weight|bias)$"), r"model.multi_modal_projector.layer_norm.\1"),
    (re.compile(r"^mlp1\.1\.(weight|bias)$"), r"model.multi_modal_projector.linear_1.\1"),
    (re.compile(r"^mlp1\.3\.(weight|bias)$"), r"model.multi_modal_projector.linear_2.\1"),
    (re.compile(r"^language_model\.model\.(.+)$"), r"model.language_model.\1"),
    (re.compile(r"^language_model\.lm_head\.weight$"), "lm_head.weight"),
]
_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")


def _split_qkv(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused qkv weight (3D, D) or bias (3D,) into q, k, v.

    InternViT computes `qkv(x).reshape(B, N, 3, heads, head_dim)`, so the output rows are all query
    heads, then all key heads, then all value heads: three equal consecutive blocks.
    """
    if tensor.shape[0] % 3 != 0:
        raise ValueError(f"Fused qkv tensor has {tensor.shape[0]} rows, which is not divisible by 3.")
    q, k, v = tensor.chunk(3, dim=0)
    return q, k, v


def convert_state_dict(original: dict[str, torch.Tensor], tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """Map an original-layout InternVL state dict to native `InternVLForConditionalGeneration` keys.

    Args:
        original: tensors keyed by the original names (`vision_model.`, `mlp1.`, `language_model.`).
        tie_word_embeddings: the language model ties `lm_head` to the input embeddings; a missing
            `language_model.lm_head.weight` is then filled from the embeddings.

    Raises:
        ValueError: listing every key that no rule maps.
    """
    converted: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in original.items():
        qkv = _QKV.match(key)
        if qkv:
            layer, kind = qkv.groups()
            prefix = f"model.vision_tower.encoder.layer.{layer}.attention"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), _split_qkv(tensor), strict=True):
                converted[f"{prefix}.{name}.{kind}"] = part.clone()
            continue
        for pattern, template in _RENAMES:
            if pattern.match(key):
                converted[pattern.sub(template, key)] = tensor
                break
        else:
            unmapped.append(key)
    if unmapped:
        shown = ", ".join(unmapped[:10]) + (f" (and {len(unmapped) - 10} more)" if len(unmapped) > 10 else "")
        raise ValueError(
            f"{len(unmapped)} tensors of the original checkpoint have no native counterpart: {shown}. "
            "HINT: this converter handles InternVL 2.5 with a Qwen2 language model; other layouts need new rules."
        )
    if "lm_head.weight" not in converted and tie_word_embeddings:
        converted["lm_head.weight"] = converted["model.language_model.embed_tokens.weight"]
    return converted


def convert_config(original: dict, image_token_id: int) -> InternVLConfig:
    """Build the native `InternVLConfig` from an original `internvl_chat` config dict.

    Raises:
        ValueError: not an `internvl_chat` config, a non-Qwen2 language model, or the v1 pixel shuffle.
    """
    problems = []
    if original.get("model_type") != "internvl_chat":
        problems.append(f"model_type is {original.get('model_type')!r}, expected 'internvl_chat'")
    llm = dict(original.get("llm_config", {}))
    if llm.get("model_type") != "qwen2":
        problems.append(
            f"language model type is {llm.get('model_type')!r}; only 'qwen2' (InternVL 2.5-1B/4B/38B/78B) "
            "is supported"
        )
    if original.get("ps_version", "v2") != "v2":
        problems.append(
            f"ps_version is {original.get('ps_version')!r}; the native model implements the 'v2' pixel shuffle"
        )
    if problems:
        raise ValueError("Cannot convert this checkpoint: " + "; ".join(problems) + ".")

    vision = original["vision_config"]
    image_size = original.get("force_image_size") or vision["image_size"]
    patch_size = vision["patch_size"]
    downsample_ratio = original.get("downsample_ratio", 0.5)
    vision_config = InternVLVisionConfig(
        hidden_size=vision["hidden_size"],
        num_hidden_layers=vision["num_hidden_layers"],
        num_attention_heads=vision["num_attention_heads"],
        intermediate_size=vision["intermediate_size"],
        hidden_act=vision.get("hidden_act", "gelu"),
        image_size=image_size,
        patch_size=patch_size,
        attention_bias=vision.get("qkv_bias", True),
        use_qk_norm=vision.get("qk_normalization", False),
        norm_type=vision.get("norm_type", "layer_norm"),
        layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
        layer_scale_init_value=vision.get("initializer_factor", 0.1),
        # InternViT has no norm after its last layer; mean pooling makes the native final norm an identity.
        use_mean_pooling=True,
    )
    for key in ("architectures", "auto_map", "_name_or_path", "transformers_version", "attn_implementation"):
        llm.pop(key, None)
    tie = bool(llm.get("tie_word_embeddings", False))
    text_config = Qwen2Config(**{k: v for k, v in llm.items() if k != "model_type"})
    image_seq_length = int((image_size // patch_size) ** 2 * downsample_ratio**2)
    return InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=image_seq_length,
        downsample_ratio=downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=original.get("select_layer", -1),
        vision_feature_select_strategy="default",
        tie_word_embeddings=tie,
    )


def load_original_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint directory: sharded or single safetensors, or pytorch_model.bin."""
    from safetensors.torch import load_file

    index = checkpoint_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state_dict: dict[str, torch.Tensor] = {}
        for name in files:
            state_dict.update(load_file(checkpoint_dir / name))
        return state_dict
    if (checkpoint_dir / "model.safetensors").exists():
        return load_file(checkpoint_dir / "model.safetensors")
    if (checkpoint_dir / "pytorch_model.bin").exists():
        return torch.load(checkpoint_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"No weights in {checkpoint_dir}: expected model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin. HINT: download the full checkpoint, not only its config."
    )


def _build_processor(checkpoint_dir: Path, image_size: int, image_seq_length: int):
    """Wrap the checkpoint's tokenizer and a 448 px GotOcr2 image processor as an InternVL processor."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir, extra_special_tokens=dict(INTERNVL_TOKEN_ATTRIBUTES))
    missing = [token for token in INTERNVL_TOKEN_ATTRIBUTES.values() if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_to_patches=False, min_patches=1, max_patches=12
    )
    if is_torchvision_available():
        # NOTE: this branch has not run in the project's CPU environment, which has no torchvision.
        from transformers import InternVLProcessor, InternVLVideoProcessor

        return InternVLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=InternVLVideoProcessor(),
            image_seq_length=image_seq_length,
            chat_template=CHAT_TEMPLATE,
        )
    return InternVLImageTextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=image_seq_length,
        chat_template=CHAT_TEMPLATE,
    )


def convert_checkpoint(checkpoint_dir: str | Path, output_dir: str | Path) -> Path:
    """Convert the original-layout checkpoint in `checkpoint_dir` and save it natively to `output_dir`.

    Writes the model (`config.json`, safetensors) and the processor (tokenizer with the InternVL image
    tokens, image processor, chat template). Returns `output_dir`.

    Raises:
        FileNotFoundError: `checkpoint_dir` or its `config.json` or weights are missing.
        ValueError: the config is not a supported InternVL 2.5 layout, or tensors do not map exactly.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(
            f"{config_path} does not exist. HINT: pass the directory of an original InternVL 2.5 checkpoint "
            "(the one with config.json, model_type 'internvl_chat')."
        )
    original_config = json.loads(config_path.read_text())
    if original_config.get("model_type") == "internvl":
        raise ValueError(
            f"{checkpoint_dir} is already in the native layout (model_type 'internvl'). HINT: load it directly "
            "with model_name_or_path; no conversion is needed."
        )

    tokenizer_probe = AutoTokenizer.from_pretrained(checkpoint_dir)
    image_token_id = tokenizer_probe.convert_tokens_to_ids(IMG_CONTEXT)
    if image_token_id is None or image_token_id == tokenizer_probe.unk_token_id:
        raise ValueError(
            f"The tokenizer in {checkpoint_dir} has no {IMG_CONTEXT} token. HINT: use the checkpoint's own "
            "tokenizer files, which define the InternVL image tokens."
        )
    config = convert_config(original_config, image_token_id)
    original = load_original_state_dict(checkpoint_dir)
    converted = convert_state_dict(original, config.tie_word_embeddings)

    # The native model takes the checkpoint's dtype (bfloat16 for the released weights).
    dtype = next(iter(converted.values())).dtype
    model = InternVLForConditionalGeneration(config).to(dtype)
    expected = set(model.state_dict())
    missing = sorted(expected - set(converted))
    unexpected = sorted(set(converted) - expected)
    if missing or unexpected:
        raise ValueError(
            f"Converted tensors do not match the native model: missing {missing[:10]}, unexpected "
            f"{unexpected[:10]}. HINT: the original config does not describe these weights; check config.json."
        )
    model.load_state_dict(converted, strict=True)

    processor = _build_processor(checkpoint_dir, config.vision_config.image_size[0], config.image_seq_length)
    if len(processor.tokenizer) > config.text_config.vocab_size:
        # NOTE: only when the tokenizer lacked `<video>` or another image token; the new rows are the
        # mean embedding, as transformers initialises them.
        model.resize_token_embeddings(len(processor.tokenizer))

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    log.info("Converted %d tensors from %s to %s", len(original), checkpoint_dir, output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", type=Path, help="original-layout InternVL 2.5 checkpoint directory")
    parser.add_argument("output_dir", type=Path, help="directory to write the native checkpoint and processor to")
    args = parser.parse_args(argv)
    output_dir = convert_checkpoint(args.checkpoint_dir, args.output_dir)
    print(f"Wrote the native checkpoint to {output_dir}")


if __name__ == "__main__":
    main()
