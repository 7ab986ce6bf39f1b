"""Decoding images for training, scoring and curation steps: no torch, so steps that only look at pixels stay light."""
from __future__ import annotations

import io

from PIL import Image

# Images with more pixels are skipped as oversized by training and scoring (a decompression bomb: 8192 x 8192).
MAX_IMAGE_PIXELS = 8192 * 8192


class ImageError(ValueError):
    """Image bytes that training and scoring skip (and count) instead of stopping: ``reason`` is
    ``undecodable: ...`` or ``oversized: ...``."""


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The RGB image of encoded ``data``; ImageError when it does not decode or has more than ``max_pixels``
    pixels (checked from the header, before the pixels are decoded: a decompression bomb allocates nothing)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageError(f"oversized: {width}x{height} pixels, more than {max_pixels}")
            return im.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own limit, met at open before ours
        raise ImageError(f"oversized: {e}") from None
    except Exception as e:  # PIL raises many types for damaged bytes
        raise ImageError(f"undecodable: {type(e).__name__}: {e}") from None
