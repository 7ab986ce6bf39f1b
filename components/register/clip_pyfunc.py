"""MLflow pyfunc model (logged as code) that serves L2-normalised image and text embeddings of a clipmill model.

Loading reads only the artifact ``open_clip`` (an open_clip local-dir export: JSON config + safetensors
weights); nothing is unpickled. Input: a DataFrame with an ``image`` column (encoded image bytes, a base64
string of them, or an HxW or HxWx3 array of 0-255 pixel values) and/or a ``text`` column; each row carries
either or both. Output: a DataFrame with ``image_embedding`` and ``text_embedding`` (lists of floats, None
where the row had no such input).

Every request is checked before anything is decoded or embedded: known columns only, at least one input per
row, valid base64, decodable images, and the per-request limits of ``LIMITS`` (rows, caption characters, encoded
image bytes, image pixels), which the model's config (``model_config`` at logging time) may override. A bad
request raises an MlflowException with INVALID_PARAMETER_VALUE, which the scoring server answers with HTTP 400
and that one message (never a stack trace).
"""
from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel
from PIL import Image

LOCAL_DIR_ARTIFACT = "open_clip"
BATCH_SIZE = 64
COLUMNS = ("image", "text")
# Per-request limits; the model config (register.serving in params.yaml) sets them at registration.
LIMITS = {"max_rows": 256, "max_caption_chars": 1000, "max_image_bytes": 10_000_000, "max_image_pixels": 16_777_216}


class BadRequest(ValueError):
    """One input of one row is unusable (the message names the row and the reason)."""


def bad_request(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def _present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):
        return False
    return not (isinstance(value, str) and value == "")


def _open_checked(data: bytes, limits: dict) -> Image.Image:
    if len(data) > limits["max_image_bytes"]:
        raise BadRequest(f"image has {len(data)} bytes, more than the limit of {limits['max_image_bytes']} bytes")
    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size  # read from the header: nothing is decoded yet
    except Exception as e:  # PIL raises several types for undecodable bytes
        raise BadRequest(f"image bytes are not a decodable image: {type(e).__name__}") from None
    if width * height > limits["max_image_pixels"]:
        raise BadRequest(f"image is {width}x{height} pixels, more than the limit of {limits['max_image_pixels']}")
    try:
        return im.convert("RGB")
    except Exception as e:
        raise BadRequest(f"image bytes are not a decodable image: {type(e).__name__}") from None


def decode_image(value, limits: dict | None = None) -> Image.Image:
    """One image from encoded bytes, a base64 string (optionally a ``data:`` URL) or a pixel array."""
    limits = limits or LIMITS
    if isinstance(value, (bytes, bytearray)):
        return _open_checked(bytes(value), limits)
    if isinstance(value, str):
        payload = value.split(",", 1)[1] if value.startswith("data:") else value
        if len(payload) > limits["max_image_bytes"] * 4 // 3 + 4:
            raise BadRequest(f"image string has {len(payload)} characters, more than the base64 of the limit of "
                             f"{limits['max_image_bytes']} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadRequest(f"image string is not base64: {e}") from None
        return _open_checked(data, limits)
    try:
        pixels = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadRequest(f"image must be bytes, a base64 string or a pixel array, got {type(value).__name__}") from None
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3, 4)):
        raise BadRequest(f"image array must be HxW or HxWxC (C in 1, 3, 4), got shape {pixels.shape}")
    if pixels.shape[0] * pixels.shape[1] > limits["max_image_pixels"]:
        raise BadRequest(f"image array is {pixels.shape[1]}x{pixels.shape[0]} pixels, more than the limit of "
                         f"{limits['max_image_pixels']}")
    pixels = np.clip(np.nan_to_num(pixels), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels.squeeze(2) if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels).convert("RGB")


def decode_text(value, limits: dict | None = None) -> str:
    limits = limits or LIMITS
    if not isinstance(value, str):
        raise BadRequest(f"text must be a string, got {type(value).__name__}")
    if len(value) > limits["max_caption_chars"]:
        raise BadRequest(f"text has {len(value)} characters, more than the limit of {limits['max_caption_chars']}")
    return value


def check_request(frame: pd.DataFrame, limits: dict) -> None:
    """Columns, row count and the presence of an input in every row; a 400-class MlflowException otherwise."""
    unknown = [str(c) for c in frame.columns if c not in COLUMNS]
    if unknown:
        raise bad_request(f"unknown input columns {unknown}: expected 'image' and/or 'text'")
    if len(frame) > limits["max_rows"]:
        raise bad_request(f"request has {len(frame)} rows, more than the limit of {limits['max_rows']}")
    for row in range(len(frame)):
        if not any(column in frame and _present(frame[column].iloc[row]) for column in COLUMNS):
            raise bad_request(f"row {row} has neither 'image' nor 'text'")


def model_limits(config: dict | None) -> dict:
    """``LIMITS`` with the positive integers of the model config that override them."""
    limits = dict(LIMITS)
    for key, value in (config or {}).items():
        if key in limits:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model config {key}: expected a positive integer, got {value!r}")
            limits[key] = value
    return limits


class ClipEmbeddingModel(PythonModel):
    """Embeddings for images and texts from the open_clip export in the model's artifacts."""

    def load_context(self, context):
        from clipmill.components.common.model import load_clip

        self.clip = load_clip(context.artifacts[LOCAL_DIR_ARTIFACT])
        self.limits = model_limits(getattr(context, "model_config", None))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from clipmill.components.common.model import embed_images, embed_texts

        try:
            frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        except (TypeError, ValueError) as e:
            raise bad_request(f"input is not a table of 'image' and/or 'text' rows: {e}") from None
        limits = getattr(self, "limits", LIMITS)
        check_request(frame, limits)
        try:
            batch_size = int((params or {}).get("batch_size", BATCH_SIZE))
        except (TypeError, ValueError):
            raise bad_request("params.batch_size must be an integer") from None
        if batch_size < 1:
            raise bad_request(f"params.batch_size must be at least 1, got {batch_size}")
        decoded = {}
        for column, decode in (("image", decode_image), ("text", decode_text)):
            if column in frame:
                rows = [r for r, v in enumerate(frame[column]) if _present(v)]
                try:
                    decoded[column] = (rows, [_decode_row(decode, frame[column].iloc[r], limits, r) for r in rows])
                except BadRequest as e:
                    raise bad_request(str(e)) from None
        columns = {}
        for column, embed in (("image", embed_images), ("text", embed_texts)):
            vectors = [None] * len(frame)
            rows, values = decoded.get(column, ([], []))
            if rows:
                for r, vector in zip(rows, embed(self.clip, values, batch_size).tolist()):
                    vectors[r] = vector
            columns[f"{column}_embedding"] = vectors
        return pd.DataFrame(columns)


def _decode_row(decode, value, limits: dict, row: int):
    try:
        return decode(value, limits)
    except BadRequest as e:
        raise BadRequest(f"row {row}: {e}") from None


set_model(ClipEmbeddingModel())
