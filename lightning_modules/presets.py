"""Model presets and the offline processor of the small CPU preset.

A preset is a named `transformers.InternVLConfig`. `internvl2_5-1b` has the shapes of InternVL 2.5-1B
(InternViT-300M-448px, a two-layer MLP projector and Qwen2.5-0.5B-Instruct) and is used with random
weights for benchmarks or as the architecture check for a real checkpoint. `internvl-tiny` is a few-layer
model of the same classes at 64x64 pixels (the easy-VQA image size) for tests and the CPU demo.

The number of image tokens per tile follows from the vision config: `(image_size / patch_size) ** 2 *
downsample_ratio ** 2`, so 448 px with patch 14 and pixel shuffle 0.5 gives 256, and 64 px with patch 8
gives 16. The processor's `image_seq_length` must equal that number, which `check_image_seq_length`
enforces.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoProcessor,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLProcessor,
    InternVLVisionConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.processing_utils import ProcessorMixin

log = logging.getLogger(__name__)

# Qwen2 chat tokens. `<|endoftext|>` is the pad token, `<|im_end|>` ends every turn and is the EOS that
# generation stops at.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

# InternVL image tokens. The processor expands each `<IMG_CONTEXT>` in a prompt into
# `<img>` + `<IMG_CONTEXT>` * image_seq_length * tiles + `</img>`. The model then replaces the
# embeddings at the `<IMG_CONTEXT>` positions with the projected vision features.
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
VIDEO = "<video>"

SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, VIDEO]

# The attribute names that `InternVLProcessor.__init__` reads from its tokenizer (transformers 5).
INTERNVL_TOKEN_ATTRIBUTES = {
    "start_image_token": IMG_START,
    "end_image_token": IMG_END,
    "context_image_token": IMG_CONTEXT,
    "video_token": VIDEO,
}

# Qwen2-style chat template. An image in a message is written as one `<IMG_CONTEXT>` placeholder, which
# the processor expands; plain-string contents are copied as they are.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class InternVLImageTextProcessor(InternVLProcessor):
    """`InternVLProcessor` without the video processor.

    In transformers 5.25 `InternVLProcessor.__init__` requires a video processor, and every video
    processor needs torchvision. This subclass drops that argument, so the small preset's processor can be
    built, saved and reloaded where torchvision is not installed. Text and image processing are the
    parent's, and real checkpoints keep their own `InternVLProcessor`.

    `AutoProcessor.from_pretrained` finds this class by the `processor_class` name saved in
    `processor_config.json` once this module has been imported (it registers the class on import).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_seq_length: int = 256,
        chat_template: str | None = None,
        **kwargs,
    ) -> None:
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_seq_length = image_seq_length
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token = tokenizer.context_image_token
        self.video_token = tokenizer.video_token
        self.image_token_id = tokenizer.context_image_token_id
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
        )


class _ImageTextProcessorConfig(PretrainedConfig):
    """Registration key only: `AutoProcessor.register` maps a config class to a processor class."""

    model_type = "internvl_image_text"


AutoProcessor.register(_ImageTextProcessorConfig, InternVLImageTextProcessor, exist_ok=True)


@dataclass(frozen=True)
class Preset:
    """Shapes of one architecture preset.

    The vocabulary size and the token ids are not part of a preset: they come from the tokenizer that
    the model is paired with (see `build_model_config`).
    """

    image_size: int
    patch_size: int
    downsample_ratio: float
    vision_hidden_size: int
    vision_layers: int
    vision_heads: int
    vision_intermediate_size: int
    text_hidden_size: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate_size: int
    max_position_embeddings: int
    rope_theta: float
    tie_word_embeddings: bool
    # Vocabulary and image-token id of the real checkpoint, used when no tokenizer is given.
    default_vocab_size: int
    default_image_token_id: int

    @property
    def image_seq_length(self) -> int:
        """Image tokens per tile after pixel shuffle: (image_size / patch_size)^2 * downsample_ratio^2."""
        patches_per_side = self.image_size // self.patch_size
        return int(patches_per_side**2 * self.downsample_ratio**2)


PRESETS: dict[str, Preset] = {
    # InternViT-300M-448px (24 layers, width 1024) + Qwen2.5-0.5B-Instruct (24 layers, width 896,
    # 14 query heads, 2 KV heads), as in OpenGVLab/InternVL2_5-1B. Vocabulary 151674 and
    # `<IMG_CONTEXT>` = 151667 are that checkpoint's tokenizer.
    "internvl2_5-1b": Preset(
        image_size=448,
        patch_size=14,
        downsample_ratio=0.5,
        vision_hidden_size=1024,
        vision_layers=24,
        vision_heads=16,
        vision_intermediate_size=4096,
        text_hidden_size=896,
        text_layers=24,
        text_heads=14,
        text_kv_heads=2,
        text_intermediate_size=4864,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        default_vocab_size=151674,
        default_image_token_id=151667,
    ),
    # Small CPU model: 64x64 images, patch 8, 16 image tokens per tile, two layers in each tower.
    "internvl-tiny": Preset(
        image_size=64,
        patch_size=8,
        downsample_ratio=0.5,
        vision_hidden_size=64,
        vision_layers=2,
        vision_heads=4,
        vision_intermediate_size=128,
        text_hidden_size=96,
        text_layers=2,
        text_heads=4,
        text_kv_heads=2,
        text_intermediate_size=192,
        max_position_embeddings=2048,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        default_vocab_size=1024,
        default_image_token_id=5,
    ),
}

SMALL_PRESET = "internvl-tiny"


def get_preset(name: str) -> Preset:
    """Return the preset called `name`; raise `ValueError` listing the valid names otherwise."""
    if name not in PRESETS:
        raise ValueError(
            f"Unknown model preset {name!r}. Valid presets: {', '.join(sorted(PRESETS))}. "
            "HINT: pass one of these names, or a checkpoint id/path instead of a preset."
        )
    return PRESETS[name]


def build_model_config(name: str, tokenizer: PreTrainedTokenizerFast | None = None) -> InternVLConfig:
    """Build the `InternVLConfig` of preset `name`.

    Args:
        name: a key of `PRESETS`.
        tokenizer: the tokenizer the model will be paired with. Its length sets the vocabulary size and
            its `context_image_token_id`, `pad_token_id` and EOS (`<|im_end|>`) set the token ids. Without
            it the preset's defaults are used (the real checkpoint's vocabulary for `internvl2_5-1b`).

    Raises:
        ValueError: `name` is not a preset, or the tokenizer lacks the InternVL image tokens.
    """
    preset = get_preset(name)
    if tokenizer is None:
        vocab_size = preset.default_vocab_size
        image_token_id = preset.default_image_token_id
        pad_token_id = eos_token_id = bos_token_id = None
    else:
        image_token_id = getattr(tokenizer, "context_image_token_id", None)
        if image_token_id is None:
            raise ValueError(
                f"Tokenizer {tokenizer.name_or_path!r} has no `context_image_token` ({IMG_CONTEXT}). "
                "HINT: use an InternVL processor's tokenizer, or build one with build_small_processor()."
            )
        vocab_size = len(tokenizer)
        pad_token_id = tokenizer.pad_token_id
        eos_token_id = tokenizer.convert_tokens_to_ids(IM_END)
        bos_token_id = None

    vision_config = InternVLVisionConfig(
        hidden_size=preset.vision_hidden_size,
        num_hidden_layers=preset.vision_layers,
        num_attention_heads=preset.vision_heads,
        intermediate_size=preset.vision_intermediate_size,
        image_size=preset.image_size,
        patch_size=preset.patch_size,
        norm_type="layer_norm",
        # InternViT-300M has a bias on its fused qkv projection (`qkv_bias: true`) and no QK norm.
        attention_bias=True,
        use_qk_norm=False,
        layer_norm_eps=1e-6,
        layer_scale_init_value=0.1,
        use_mean_pooling=True,
    )
    text_config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=preset.text_hidden_size,
        intermediate_size=preset.text_intermediate_size,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_kv_heads,
        max_position_embeddings=preset.max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": preset.rope_theta},
        tie_word_embeddings=preset.tie_word_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    return InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=preset.image_seq_length,
        downsample_ratio=preset.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=preset.tie_word_embeddings,
    )


def image_seq_length_of(config: InternVLConfig) -> int:
    """Image tokens per tile of a model config: (image_size / patch_size)^2 * downsample_ratio^2."""
    image_size = config.vision_config.image_size
    patch_size = config.vision_config.patch_size
    height = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    patch = patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size
    return int((height // patch) ** 2 * config.downsample_ratio**2)


def check_image_seq_length(config: InternVLConfig, processor: InternVLProcessor) -> None:
    """Raise `ValueError` when the processor's image-token count differs from the model's.

    A mismatch would make the model fail on the first batch with a shape error far from the cause.
    """
    expected = image_seq_length_of(config)
    actual = processor.image_seq_length
    if actual != expected:
        raise ValueError(
            f"Processor image_seq_length={actual} does not match the model's {expected} image tokens per "
            f"tile (image_size {config.vision_config.image_size}, patch {config.vision_config.patch_size}, "
            f"downsample_ratio {config.downsample_ratio}). HINT: load the processor that belongs to this "
            "checkpoint, or rebuild it with build_small_processor(image_size=...) for the model's image size."
        )


def _train_byte_level_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer whose first ids are `SPECIAL_TOKENS`, in that order."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def build_small_processor(
    texts: Iterable[str],
    output_dir: str | Path,
    image_size: int = PRESETS[SMALL_PRESET].image_size,
    vocab_size: int = PRESETS[SMALL_PRESET].default_vocab_size,
    preset: str = SMALL_PRESET,
) -> InternVLImageTextProcessor:
    """Train a small tokenizer offline and save an `InternVLProcessor` around it to `output_dir`.

    The tokenizer is byte-level BPE trained on `texts` with the Qwen2 chat tokens and the InternVL image
    tokens as special tokens, so any text (also text unseen in training) encodes without unknown tokens.
    The image processor resizes every image to one `image_size` x `image_size` tile with the CLIP mean
    and std that InternVL uses (`max_patches=1`, so InternVL's tiling yields exactly one tile).
    `AutoProcessor.from_pretrained(output_dir)` reloads the result offline in any process that has
    imported this module (see `InternVLImageTextProcessor`).

    Args:
        texts: training text for the tokenizer, for example every question and answer of the dataset.
        output_dir: directory to write; created if missing.
        image_size: tile side in pixels; must equal the vision config's image size of `preset`.
        vocab_size: target vocabulary size including the 256 byte tokens and the special tokens. The
            result can be smaller when the texts have fewer distinct merges.
        preset: the model preset whose `image_seq_length` the processor must match.

    Returns:
        The processor that was saved.

    Raises:
        ValueError: `image_size` differs from the preset's, or `vocab_size` is too small.
    """
    shapes = get_preset(preset)
    if image_size != shapes.image_size:
        raise ValueError(
            f"image_size={image_size} does not match preset {preset!r} ({shapes.image_size} px). "
            f"HINT: pass image_size={shapes.image_size} or choose a preset with {image_size} px images."
        )
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} is below the {min_vocab} byte and special tokens. "
            f"HINT: pass vocab_size >= {min_vocab}."
        )

    # The chat roles are added to the corpus so that the template's scaffolding gets whole-word tokens.
    corpus = itertools.chain(["system user assistant\n"] * 16, texts)
    raw_tokenizer = _train_byte_level_bpe(corpus, vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw_tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        extra_special_tokens=dict(INTERNVL_TOKEN_ATTRIBUTES),
        model_max_length=shapes.max_position_embeddings,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    # InternVL's image mean/std are CLIP's (OPENAI_CLIP_MEAN/STD), which GotOcr2 also uses by default. The
    # PIL backend needs no torchvision; it saves as "GotOcr2ImageProcessor", so AutoImageProcessor picks
    # the torchvision backend wherever that is installed.
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_to_patches=False,
        min_patches=1,
        max_patches=1,
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
    )
    processor = InternVLImageTextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=shapes.image_seq_length,
        chat_template=CHAT_TEMPLATE,
    )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(output_dir)
    log.info(
        "Saved a %d-token processor (%d px, %d image tokens per tile) to %s",
        len(tokenizer),
        image_size,
        shapes.image_seq_length,
        output_dir,
    )
    return processor

