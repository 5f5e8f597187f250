"""The InternVL 2.5 chat template, its tokenization with assistant-only labels, and image tiling.

A conversation is rendered in ChatML, the template of InternVL 2.5 (Qwen2.5 language model)::

    <|im_start|>system\\n{system}<|im_end|>\\n            (only when there is a system message)
    <|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

Each ``<image>`` in a user turn becomes ``<img>`` + ``<IMG_CONTEXT>`` x (image_seq_length x tiles)
+ ``</img>``, the layout that `transformers.InternVLProcessor` produces and that
`InternVLForConditionalGeneration` fills with vision features. Labels are -100 everywhere except
the assistant answers and their closing ``<|im_end|>``, which teaches the model to stop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from datamodules.sources import IMAGE_PLACEHOLDER

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLE_NAMES = {"system": "system", "human": "user", "gpt": "assistant"}
ASSISTANT_PREFIX = f"{IM_START}assistant\n"


class SampleTooLong(ValueError):
    """A sample whose image tokens, or every supervised token, lie beyond `max_length`."""


@dataclass
class EncodedText:
    """Token ids of one rendered conversation.

    `input_ids` and `labels` are (L,) int64 with L <= max_length; `labels` is -100 outside the
    assistant answers. `prompt_ids` is (Lp,) int64: the conversation up to its last assistant
    answer, ending in ``<|im_start|>assistant\\n``, for generation.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    prompt_ids: torch.Tensor
    truncated: bool


class ConversationEncoder:
    """Turn a conversation and its images into model inputs with an `InternVLProcessor`.

    Args:
        processor: the model's `InternVLProcessor`. Its tokenizer must be a fast tokenizer with
            the InternVL image tokens (`start_image_token`, `end_image_token`,
            `context_image_token`), and its image processor sets the tile size and normalisation.
        max_length: the maximum number of tokens of one sample, image tokens included.
        system_message: system turn added to records that have none; None adds nothing.
        dynamic_tiles: split each image into up to `max_tiles` tiles plus a thumbnail (InternVL's
            dynamic resolution). Off by default: one tile per image.
        max_tiles: the most tiles per image when `dynamic_tiles` is on.
    """

    def __init__(
        self,
        processor: Any,
        max_length: int,
        system_message: str | None = None,
        dynamic_tiles: bool = False,
        max_tiles: int = 12,
    ) -> None:
        tokenizer = processor.tokenizer
        problems = []
        if not getattr(tokenizer, "is_fast", False):
            problems.append(
                f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer, so it gives no offsets "
                "to place the labels by"
            )
        for attribute in ("start_image_token", "end_image_token", "context_image_token"):
            if getattr(tokenizer, attribute, None) is None:
                problems.append(f"tokenizer has no `{attribute}`")
        if tokenizer.pad_token_id is None:
            problems.append("tokenizer has no pad token")
        if max_length < 1:
            problems.append(f"max_length must be >= 1, got {max_length}")
        if problems:
            raise ValueError(
                "Cannot encode InternVL conversations with this processor: "
                + "; ".join(problems)
                + ". HINT: load the processor of an InternVL -hf checkpoint, or build one with "
                "lightning_modules.presets.build_small_processor()."
            )
        self.processor = processor
        self.tokenizer = tokenizer
        self.image_processor = processor.image_processor
        self.image_seq_length = int(processor.image_seq_length)
        self.max_length = max_length
        self.system_message = system_message
        self.dynamic_tiles = dynamic_tiles
        self.max_tiles = max_tiles
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.image_start = tokenizer.start_image_token
        self.image_end = tokenizer.end_image_token
        self.context_token = tokenizer.context_image_token
        self.image_start_id = tokenizer.convert_tokens_to_ids(self.image_start)
        self.image_end_id = tokenizer.convert_tokens_to_ids(self.image_end)
        self.context_token_id = tokenizer.convert_tokens_to_ids(self.context_token)

    # -- images -------------------------------------------------------------------------------

    def encode_images(self, images: list[Image.Image]) -> tuple[torch.Tensor | None, list[int]]:
        """Resize and normalise RGB images into tiles.

        Returns:
            pixel_values: (T, 3, H, W) float32, the tiles of all images in order, or None
                without images.
            tiles: the number of tiles of each image (1 each unless `dynamic_tiles`).
        """
        if not images:
            return None, []
        outputs = self.image_processor(
            images=images,
            crop_to_patches=self.dynamic_tiles,
            max_patches=self.max_tiles,
            return_tensors="pt",
        )
        pixel_values = outputs["pixel_values"].to(torch.float32)  # (T, 3, H, W)
        tiles = [int(n) for n in outputs["num_patches"]]
        return pixel_values, tiles

    # -- text ---------------------------------------------------------------------------------

    def _render(self, conversations: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]], int]:
        """Render ChatML with one context token per image.

        Returns the text, the character spans to supervise (each answer and its ``<|im_end|>``),
        and the character offset where the last assistant answer starts.
        """
        turns = list(conversations)
        if self.system_message is not None and (not turns or turns[0]["from"] != "system"):
            turns.insert(0, {"from": "system", "value": self.system_message})
        image_text = f"{self.image_start}{self.context_token}{self.image_end}"

        pieces: list[str] = []
        supervised: list[tuple[int, int]] = []
        length = 0
        last_answer_start = -1
        for turn in turns:
            role = ROLE_NAMES[turn["from"]]
            value = turn["value"]
            if role == "user":
                value = value.replace(IMAGE_PLACEHOLDER, image_text)
            header = f"{IM_START}{role}\n"
            pieces.append(header)
            length += len(header)
            body = f"{value}{IM_END}"
            if role == "assistant":
                supervised.append((length, length + len(body)))
                last_answer_start = length
            pieces.append(body + "\n")
            length += len(body) + 1
        return "".join(pieces), supervised, last_answer_start

    def encode_text(self, conversations: list[dict[str, str]], tiles: list[int]) -> EncodedText:
        """Tokenize a conversation, expand its image tokens and mask everything but the answers.

        Args:
            conversations: turns `{"from": "system"|"human"|"gpt", "value": str}` with one
                ``<image>`` per image in the human turns.
            tiles: tiles per image, in the order the ``<image>`` placeholders appear.

        Raises:
            ValueError: the placeholder count differs from `len(tiles)`.
            SampleTooLong: the sample exceeds `max_length` and cutting it would cut image tokens
                or leave no supervised token.
        """
        text, supervised, last_answer_start = self._render(conversations)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = encoding["input_ids"]
        offsets: list[tuple[int, int]] = encoding["offset_mapping"]

        context_positions = [i for i, token_id in enumerate(ids) if token_id == self.context_token_id]
        if len(context_positions) != len(tiles):
            raise ValueError(
                f"The conversation has {len(context_positions)} image placeholders after tokenization "
                f"but {len(tiles)} images. HINT: write one {IMAGE_PLACEHOLDER} per image and no literal "
                f"{self.context_token} in the text."
            )

        # A token is supervised when it starts inside an answer span. Spans are sorted and disjoint.
        labels_mask = [False] * len(ids)
        span_index = 0
        for position, (start, _end) in enumerate(offsets):
            while span_index < len(supervised) and start >= supervised[span_index][1]:
                span_index += 1
            if span_index < len(supervised) and supervised[span_index][0] <= start:
                labels_mask[position] = True
        prompt_end = next((i for i, (start, _) in enumerate(offsets) if start >= last_answer_start), len(ids))

        # Expand each single context token into image_seq_length x tiles copies.
        input_ids: list[int] = []
        labels: list[int] = []
        expanded_prompt_end = 0
        last_image_end = -1
        context_index = 0
        for position, token_id in enumerate(ids):
            if position == prompt_end:
                expanded_prompt_end = len(input_ids)
            if token_id == self.context_token_id:
                count = self.image_seq_length * tiles[context_index]
                context_index += 1
                input_ids.extend([token_id] * count)
                labels.extend([IGNORE_INDEX] * count)
                continue
            input_ids.append(token_id)
            labels.append(token_id if labels_mask[position] else IGNORE_INDEX)
            if token_id == self.image_end_id:
                last_image_end = len(input_ids)
        if prompt_end == len(ids):
            expanded_prompt_end = len(input_ids)

        truncated = False
        if len(input_ids) > self.max_length:
            if last_image_end > self.max_length:
                raise SampleTooLong(
                    f"{len(input_ids)} tokens, of which the image tokens end at {last_image_end}, "
                    f"exceed max_length={self.max_length}"
                )
            input_ids = input_ids[: self.max_length]
            labels = labels[: self.max_length]
            truncated = True
            if all(label == IGNORE_INDEX for label in labels):
                raise SampleTooLong(
                    f"{len(ids)} text tokens plus images exceed max_length={self.max_length} before "
                    "the first answer token"
                )
        prompt_ids = input_ids[:expanded_prompt_end]
        return EncodedText(
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            prompt_ids=torch.tensor(prompt_ids, dtype=torch.long),
            truncated=truncated,
        )


def pad_right(sequences: list[torch.Tensor], value: int) -> torch.Tensor:
    """Stack (L_i,) sequences into (B, max L_i), padding on the right with `value`."""
    return torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=value)


def pad_left(sequences: list[torch.Tensor], value: int) -> torch.Tensor:
    """Stack (L_i,) sequences into (B, max L_i), padding on the left, as generation expects."""
    return torch.nn.utils.rnn.pad_sequence(
        sequences, batch_first=True, padding_value=value, padding_side="left"
    )
