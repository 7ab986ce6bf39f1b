"""Decoding downloaded images: size checked on the header, 16-bit, palette and EXIF orientation against a PIL
reference decode, and ordinary images exactly as img2dataset decodes them."""
from __future__ import annotations

import io
import pickle
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from clipmill.components.download.decode import DecodeError, decode_image
from clipmill.components.download.reasons import error_reason

MAX_AREA = 40_000_000


def _gradient(h: int, w: int, channels: int, top: int, seed: int = 0) -> np.ndarray:
    """Smooth values up to ``top`` with a little noise (JPEG-friendly, every level of a channel differs)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    planes = [(x * (c + 1) + y * (channels - c)) / ((w * (c + 1) + h * (channels - c)) or 1) for c in range(channels)]
    img = np.stack(planes, axis=-1) * top * 0.9 + rng.integers(0, max(top // 50, 1), (h, w, channels))
    return np.clip(img, 0, top).astype(np.uint16 if top > 255 else np.uint8)


def _bgr_to_rgb(img: np.ndarray) -> np.ndarray:
    return img[..., ::-1] if img.ndim == 3 else img


def _white_composite(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.float64) / 255
    return np.rint(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)


def _assert_close(got: np.ndarray, want: np.ndarray, max_err: int, mean_err: float = 1.0) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= max_err and diff.mean() <= mean_err, (diff.max(), diff.mean())


def _png(array: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", array)
    assert ok
    return data.tobytes()


def test_16bit_grey_png_is_scaled_not_saturated_to_white():
    grey16 = _gradient(40, 60, 1, 65535)[..., 0]
    data = _png(grey16)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode.startswith("I;16")
        reference = np.rint(np.asarray(im).astype(np.float64) / 257).astype(np.uint8)
    got = decode_image(data, MAX_AREA)
    _assert_close(got, reference, max_err=1)
    assert 80 < got.mean() < 160  # white (255) before


def test_16bit_rgb_png_matches_the_pil_reference():
    bgr16 = _gradient(40, 60, 3, 65535, seed=1)
    data = _png(bgr16)
    with Image.open(io.BytesIO(data)) as im:
        reference = np.asarray(im.convert("RGB"))
    _assert_close(_bgr_to_rgb(decode_image(data, MAX_AREA)), reference, max_err=1)


def test_16bit_rgba_png_is_composited_on_white_like_the_pil_reference():
    bgra16 = _gradient(40, 60, 4, 65535, seed=2)
    data = _png(bgra16)
    with Image.open(io.BytesIO(data)) as im:
        reference = _white_composite(np.asarray(im.convert("RGBA")))
    got = _bgr_to_rgb(decode_image(data, MAX_AREA))
    _assert_close(got, reference, max_err=1)
    assert got.mean() < 250


@pytest.mark.parametrize("transparent", [False, True])
@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_images_match_the_pil_reference(fmt, transparent):
    rgb = Image.fromarray(_gradient(30, 50, 3, 255, seed=3), "RGB")
    pal = rgb.quantize(colors=32)
    buf = io.BytesIO()
    pal.save(buf, fmt, **({"transparency": 0} if transparent else {}))
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "P"
        reference = _white_composite(np.asarray(im.convert("RGBA")))
    _assert_close(_bgr_to_rgb(decode_image(data, MAX_AREA)), reference, max_err=1)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pil_exif_transpose(orientation):
    rgb = Image.fromarray(_gradient(24, 40, 3, 255, seed=orientation), "RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        reference = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    got = _bgr_to_rgb(decode_image(data, MAX_AREA))
    _assert_close(got, reference, max_err=12, mean_err=1.5)  # two JPEG decoders (OpenCV's and PIL's)


def _bilevel_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height, all black, streamed (a few hundred KB for 144 megapixels)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    row = b"\x00" + bytes((width + 7) // 8)
    deflate = zlib.compressobj(9)
    block = row * 500
    body = b"".join(deflate.compress(block) for _ in range(height // 500)) + deflate.compress(row * (height % 500))
    body += deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_decompression_bomb_is_image_too_large_before_decoding():
    bomb = _bilevel_png(12000, 12000)
    assert len(bomb) < 1_000_000
    with pytest.raises(DecodeError) as err:
        decode_image(bomb, MAX_AREA)
    assert error_reason("failed_to_resize", str(err.value)) == "image_too_large"
    assert "12000x12000" in str(err.value)
    small = _bilevel_png(64, 48)
    assert decode_image(small, MAX_AREA).shape == (48, 64)


def test_ordinary_images_decode_and_resize_exactly_as_img2dataset_does():
    from img2dataset.resizer import Resizer

    from clipmill.components.download.workers import SafeResizer

    rgb = _gradient(50, 70, 3, 255, seed=5)
    rgba = _gradient(50, 70, 4, 255, seed=6)
    small = _gradient(20, 28, 3, 255, seed=7)  # made larger (the upscale interpolation)
    jpeg = cv2.imencode(".jpg", rgb)[1].tobytes()
    # one resizer per mode for every image, as in a worker: the transforms it builds once serve them all
    ours = {mode: SafeResizer(image_size=32, resize_mode=mode, resize_only_if_bigger=False, max_image_area=MAX_AREA)
            for mode in ("center_crop", "border", "keep_ratio", "keep_ratio_largest", "no")}
    for data in (jpeg, _png(rgb), _png(small), _png(rgba), _png(rgb[..., 0]), jpeg):
        assert np.array_equal(decode_image(data, MAX_AREA), _img2dataset_decode(data))
        for mode, resizer in ours.items():
            settings = dict(image_size=32, resize_mode=mode, resize_only_if_bigger=False, max_image_area=MAX_AREA)
            assert resizer(io.BytesIO(data)) == Resizer(**settings)(io.BytesIO(data)), mode
    assert pickle.loads(pickle.dumps(ours["border"]))(io.BytesIO(jpeg)) == ours["border"](io.BytesIO(jpeg))
    err = SafeResizer(image_size=32, resize_mode="center_crop", resize_only_if_bigger=False,
                      max_image_area=MAX_AREA)(io.BytesIO(b"<html>not an image</html>"))[-1]
    assert error_reason("failed_to_resize", err) == "not_an_image"


def _img2dataset_decode(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img.ndim == 3 and img.shape[-1] == 4:
        alpha = img[:, :, 3, np.newaxis]
        img = np.rint((alpha / 255 * img[..., :3] + 255 - alpha).clip(0, 255)).astype(np.uint8)
    return img
