"""Image decoding shared by the split and the DataModules: stored bytes in, an RGB PIL image out."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps

# Suffixes stored as they are in the shards. Anything else is still stored unchanged, under the
# suffix of its source path, and decoded by PIL from its content.
KNOWN_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}

# Transparent pixels are composited onto white, which is how viewers show them. Converting RGBA
# straight to RGB would expose whatever colour the transparent pixels happen to store.
_BACKGROUND = (255, 255, 255)


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes into a fully loaded RGB image.

    The EXIF orientation is applied, transparency (RGBA, LA, P with a transparent index) is
    composited onto white, and every other mode (L, 1, CMYK, I;16, ...) goes through PIL's
    conversion to RGB.

    Raises:
        OSError or PIL.UnidentifiedImageError: the bytes are not a complete image PIL can decode
            (for example a truncated PNG).
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA"):
            image = image.convert("RGBA")
            background = Image.new("RGB", image.size, _BACKGROUND)
            background.paste(image, mask=image.getchannel("A"))
            return background
        return image.convert("RGB")


def member_suffix(path: str) -> str:
    """Return the lower-case suffix (without the dot) to store an image under, `img` if it has none."""
    suffix = Path(path).suffix.lower()
    return suffix[1:] if suffix else "img"
