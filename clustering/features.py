"""CLIP image embeddings: load the image tower of a CLIP checkpoint and embed PIL images.

Routing uses the projected, L2-normalised image embedding (``image_embeds`` of transformers'
`CLIPVisionModelWithProjection`), which equals `CLIPModel.get_image_features` normalised. For
``openai/clip-vit-base-patch16`` it has 512 dimensions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, CLIPConfig, CLIPVisionModelWithProjection
from transformers.image_processing_base import ImageProcessingMixin
from transformers.utils import logging as hf_logging

log = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch16"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return ``device``, or CUDA when one is visible and CPU otherwise."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_model_source(name_or_path: str | Path) -> None:
    """Raise `FileNotFoundError` when ``name_or_path`` is written as a local path that does not exist.

    A Hugging Face id has at most one "/" and no leading "/", "." or "~"; anything else is a path.
    Without this check transformers reports a missing directory as an invalid repo id.
    """
    text = str(name_or_path)
    looks_local = text.startswith(("/", ".", "~")) or text.count("/") > 1 or isinstance(name_or_path, Path)
    if looks_local and not Path(text).expanduser().exists():
        raise FileNotFoundError(
            f"CLIP model directory {text} not found. HINT: pass an existing directory (a saved CLIPModel or "
            f"CLIPVisionModelWithProjection) or a Hugging Face id such as {DEFAULT_CLIP_MODEL!r}."
        )


def load_clip_image_encoder(
    name_or_path: str | Path = DEFAULT_CLIP_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[CLIPVisionModelWithProjection, ImageProcessingMixin]:
    """Load a CLIP image tower with its projection, in eval mode, and its image processor.

    Args:
        name_or_path: a Hugging Face model id or a local directory. The directory may hold a full
            `CLIPModel` (image and text towers) or only a `CLIPVisionModelWithProjection`.
        device: where to put the model; CUDA when visible, else CPU, when None.
        dtype: parameter dtype; float16 on CUDA and float32 on CPU when None.

    Returns:
        (model, image_processor). ``model(pixel_values=x).image_embeds`` is (B, projection_dim).

    Raises:
        OSError: the id or directory could not be loaded (for example no network and no local copy).
        ValueError: the checkpoint is not a CLIP model, or it lacks image-tower weights.
    """
    check_model_source(name_or_path)
    device = resolve_device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        config = AutoConfig.from_pretrained(name_or_path)
        image_processor = AutoImageProcessor.from_pretrained(name_or_path)
    except OSError as error:
        raise OSError(
            f"Could not load CLIP model {name_or_path!r}: {error}\nHINT: pass a local directory with "
            "--clip-model, or make the Hugging Face hub reachable (unset HF_HUB_OFFLINE)."
        ) from error

    if isinstance(config, CLIPConfig):
        # A full CLIPModel checkpoint keeps projection_dim at the top level, while its vision
        # sub-config carries the default of 512. Loaded unchanged (transformers 5.25), the
        # projection is re-initialised with the wrong shape whenever projection_dim != 512.
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
    elif getattr(config, "model_type", None) == "clip_vision_model":
        vision_config = config
    else:
        raise ValueError(
            f"{name_or_path!r} is a {type(config).__name__} checkpoint, not CLIP. HINT: pass a CLIP model "
            f"such as {DEFAULT_CLIP_MODEL} or a directory saved from CLIPModel."
        )

    # A CLIPModel directory also contains the text tower, which this class does not use. transformers
    # reports those weights as unexpected at warning level, so the report is silenced here and the
    # keys that matter (missing or mismatched image weights) are checked below instead.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, loading_info = CLIPVisionModelWithProjection.from_pretrained(
            name_or_path, config=vision_config, dtype=dtype, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(loading_info.get("missing_keys", []))
    mismatched = list(loading_info.get("mismatched_keys", []))
    if missing or mismatched:
        raise ValueError(
            f"{name_or_path!r} lacks image-tower weights: missing {missing[:5]}, mismatched {mismatched[:5]}. "
            "HINT: pass a checkpoint saved from CLIPModel or CLIPVisionModelWithProjection."
        )

    model = model.to(device).eval()
    log.info(
        "Loaded CLIP image encoder %s on %s (%s): image size %d, embedding dimension %d",
        name_or_path,
        device,
        dtype,
        vision_config.image_size,
        vision_config.projection_dim,
    )
    return model, image_processor


def preprocess_images(image_processor: ImageProcessingMixin, images: Sequence[Image.Image]) -> torch.Tensor:
    """Resize, crop and normalise RGB images into (B, 3, H, W) float32 pixel values."""
    return image_processor(images=list(images), return_tensors="pt")["pixel_values"]


@torch.inference_mode()
def encode_pixel_values(model: CLIPVisionModelWithProjection, pixel_values: torch.Tensor) -> torch.Tensor:
    """Embed (B, 3, H, W) pixel values; returns (B, D) float32 L2-normalised embeddings on the model's device."""
    pixel_values = pixel_values.to(device=model.device, dtype=model.dtype, non_blocking=True)
    embeds = model(pixel_values=pixel_values).image_embeds  # (B, D)
    return F.normalize(embeds.float(), dim=-1)


def embed_images(
    model: CLIPVisionModelWithProjection,
    image_processor: ImageProcessingMixin,
    images: Sequence[Image.Image],
    batch_size: int = 64,
) -> np.ndarray:
    """Embed RGB PIL images in batches; returns (N, D) float32 L2-normalised rows, in input order.

    This is the in-process path (evaluation, small splits). For a whole dataset use
    ``clustering/extract_features.py``, which decodes in DataLoader workers and resumes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    dim = model.config.projection_dim
    out = np.empty((len(images), dim), dtype=np.float32)
    for start in range(0, len(images), batch_size):
        pixel_values = preprocess_images(image_processor, images[start : start + batch_size])
        out[start : start + len(pixel_values)] = encode_pixel_values(model, pixel_values).cpu().numpy()
    return out
