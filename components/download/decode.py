"""Decoding a downloaded image into the 8-bit BGR (or grey) array img2dataset resizes, safely and correctly.

- Size first: the header's dimensions are read (PIL, without decoding pixels) and an image larger than
  ``max_image_area`` pixels fails as ``image area too large`` before any pixel is decoded (a decompression bomb:
  a 12000x12000 PNG of a few hundred KB would take 0.4-0.8 GB to decode). For formats PIL cannot read, OpenCV's
  own limit (``OPENCV_IO_MAX_IMAGE_PIXELS``, set by the stage) and a check after decoding apply.
- Pixels right: 16-bit images (grey, RGB, RGBA) are scaled to 8 bits (OpenCV returns them as uint16, which
  the JPEG encoder saturated to white); palette and grey+alpha images are expanded; an alpha channel is
  composited on white in integer arithmetic (the same values as img2dataset's float formula, a third of the
  memory); the EXIF orientation is applied (OpenCV's ``IMREAD_UNCHANGED`` ignores it).
- Unchanged otherwise: an 8-bit image without EXIF rotation decodes exactly as img2dataset decodes it (OpenCV).
"""
from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112
TOO_LARGE = "image area too large"  # img2dataset's wording: counted as image_too_large
NOT_AN_IMAGE = "Image decoding error"  # counted as not_an_image


class DecodeError(ValueError):
    pass


def _header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, EXIF orientation) from the header alone; None when PIL cannot read the format."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                try:
                    orientation = int(im.getexif().get(EXIF_ORIENTATION, 1))
                except Exception:  # a damaged EXIF block: no rotation
                    orientation = 1
                return width, height, orientation
        except Image.DecompressionBombError as e:
            raise DecodeError(f"{TOO_LARGE} ({e})") from None
        except Exception:
            return None


def _pil_decode(data: bytes) -> np.ndarray | None:
    """Formats OpenCV cannot read (GIF, ...): the first frame as BGR, BGRA, grey or a 16-bit/float grey array."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L", "RGB", "RGBA"):
                array = np.asarray(im)
            else:  # palette, grey+alpha, CMYK, bilevel, ...
                array = np.asarray(im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB"))
    except Exception:
        return None
    if array.ndim == 3:
        array = array[..., [2, 1, 0, 3][: array.shape[2]]]  # RGB(A) -> BGR(A)
    return np.ascontiguousarray(array)


def to_8bit(img: np.ndarray) -> np.ndarray:
    """8-bit values: 16-bit keep their high byte (as PIL reads 16-bit RGB), float [0, 1] scales to 255."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img >> 8).astype(np.uint8)
    if img.dtype in (np.int32, np.uint32):  # PIL's "I" mode holds 16-bit grey PNGs
        return (np.clip(img, 0, 65535) >> 8).astype(np.uint8)
    if img.dtype.kind == "f":
        return np.rint(np.clip(np.nan_to_num(img), 0.0, 1.0) * 255).astype(np.uint8)
    raise DecodeError(f"{NOT_AN_IMAGE}: unsupported pixel type {img.dtype}")


def flatten_alpha(img: np.ndarray) -> np.ndarray:
    """BGRA -> BGR on a white background: round(a/255 * c + 255 - a), computed exactly in uint16."""
    if img.ndim == 3 and img.shape[2] == 1:
        return img[..., 0]
    if img.ndim == 3 and img.shape[2] == 2:  # grey + alpha
        img = np.dstack([img[..., 0]] * 3 + [img[..., 1]])
    if img.ndim != 3 or img.shape[2] != 4:
        return img
    alpha = img[..., 3:4].astype(np.uint16)
    color = img[..., :3].astype(np.uint16)
    color *= alpha
    color += 255 * (255 - alpha) + 127  # at most 255 * 255 + 127: no overflow
    color //= 255
    return color.astype(np.uint8)


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels as ``PIL.ImageOps.exif_transpose`` shows them, for EXIF orientation 1-8."""
    if orientation in (5, 6, 7, 8):
        img = np.swapaxes(img, 0, 1)  # transpose: then 5 is done, 6/8 need one flip, 7 two
        if orientation == 6:
            img = img[:, ::-1]
        elif orientation == 8:
            img = img[::-1]
        elif orientation == 7:
            img = img[::-1, ::-1]
    elif orientation == 2:
        img = img[:, ::-1]
    elif orientation == 3:
        img = img[::-1, ::-1]
    elif orientation == 4:
        img = img[::-1]
    return np.ascontiguousarray(img)


def decode_image(data: bytes, max_image_area: float) -> np.ndarray:
    """The image as uint8 grey (HxW) or BGR (HxWx3), upright; ``DecodeError`` when it is not an image or is
    larger than ``max_image_area`` pixels (checked on the header before decoding)."""
    header = _header(data)
    if header is not None and header[0] * header[1] > max_image_area:
        raise DecodeError(f"{TOO_LARGE} ({header[0]}x{header[1]} pixels > max_image_area {max_image_area:g})")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None and header is not None:
        img = _pil_decode(data)
    if img is None:
        raise DecodeError(NOT_AN_IMAGE)
    if img.shape[0] * img.shape[1] > max_image_area:
        raise DecodeError(f"{TOO_LARGE} ({img.shape[1]}x{img.shape[0]} pixels > max_image_area {max_image_area:g})")
    img = flatten_alpha(to_8bit(img))
    return apply_orientation(img, header[2] if header is not None else 1)
