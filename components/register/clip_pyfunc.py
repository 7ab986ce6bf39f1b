"""MLflow pyfunc model (logged as code) that serves L2-normalised image and text embeddings of a clipmill model.

Loading reads only the artifact ``open_clip`` (an open_clip local-dir export: JSON config + safetensors
weights); nothing is unpickled. Input: a DataFrame with an ``image`` column (encoded image bytes, a base64
string of them, or an HxW or HxWx3 array of 0-255 pixel values) and/or a ``text`` column; a row may carry
either or both. Output: a DataFrame with ``image_embedding`` and ``text_embedding`` (lists of floats, None
where the row had no such input).
"""
from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel
from PIL import Image

LOCAL_DIR_ARTIFACT = "open_clip"
BATCH_SIZE = 64


def _present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):
        return False
    return not (isinstance(value, str) and value == "")


def decode_image(value) -> Image.Image:
    """One image from encoded bytes, a base64 string (optionally a ``data:`` URL) or a pixel array."""
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        payload = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as e:
            raise ValueError(f"image string is not base64: {e}") from None
    else:
        pixels = np.asarray(value)
        if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3, 4)):
            raise ValueError(f"image array must be HxW or HxWxC (C in 1, 3, 4), got shape {pixels.shape}")
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels.squeeze(2) if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels).convert("RGB")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises several types for undecodable bytes
        raise ValueError(f"image bytes are not a decodable image: {e}") from None


def decode_text(value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"text must be a string, got {type(value).__name__}: {value!r:.80}")
    return value


class ClipEmbeddingModel(PythonModel):
    """Embeddings for images and texts from the open_clip export in the model's artifacts."""

    def load_context(self, context):
        from components.common.model import load_clip

        self.clip = load_clip(context.artifacts[LOCAL_DIR_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from components.common.model import embed_images, embed_texts

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        unknown = set(frame.columns) - {"image", "text"}
        if unknown:
            raise ValueError(f"unknown input columns {sorted(unknown)}: expected 'image' and/or 'text'")
        batch_size = int((params or {}).get("batch_size", BATCH_SIZE))
        columns = {}
        for column, decode, embed in (("image", decode_image, embed_images), ("text", decode_text, embed_texts)):
            vectors = [None] * len(frame)
            if column in frame:
                rows = [r for r, v in enumerate(frame[column]) if _present(v)]
                embedded = embed(self.clip, [decode(frame[column].iloc[r]) for r in rows], batch_size)
                for r, vector in zip(rows, embedded.tolist()):
                    vectors[r] = vector
            columns[f"{column}_embedding"] = vectors
        return pd.DataFrame(columns)


set_model(ClipEmbeddingModel())
