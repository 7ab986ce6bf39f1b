"""A tiny download output for the curation tests: a manifest and webdataset shards of PIL-drawn shapes.

Captions name the drawn shape and color, except the ones marked mismatched; some downloads failed, some
captions are boilerplate or too short, some images are too small or too elongated, some are exact duplicates.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import webdataset as wds
from PIL import Image, ImageDraw

from clipmill.components.common.hashing import make_uid

SHAPES = ["circle", "square", "triangle"]
COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 30)}


def draw(shape: str, color: str, size: tuple[int, int] = (64, 64), background=(255, 255, 255), mark: int = 0) -> bytes:
    """JPEG bytes of one filled shape on a plain background, with ``mark``'s bits as dark dots on the top row."""
    img = Image.new("RGB", size, background)
    w, h = size
    box = (w * 0.2, h * 0.2, w * 0.8, h * 0.8)
    pen = ImageDraw.Draw(img)
    if shape == "circle":
        pen.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        pen.rectangle(box, fill=COLORS[color])
    else:
        pen.polygon([(w * 0.5, h * 0.2), (w * 0.8, h * 0.8), (w * 0.2, h * 0.8)], fill=COLORS[color])
    for bit in range(8):
        if mark >> bit & 1:
            pen.rectangle((2 + 2 * bit, 0, 3 + 2 * bit, 1), fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_download(root: Path, n: int = 120, per_shard: int = 50, seed: int = 0) -> dict:
    """Write ``root/manifest.parquet`` and ``root/shards/{00000..}.tar`` (with img2dataset's ``.parquet`` beside each);
    returns the paths and the injected defects.

    Sample i: failed download when i % 15 == 14; boilerplate caption when i % 17 == 3; one-word caption when
    i % 19 == 5; mismatched caption when i % 7 == 6; 16 px image when i % 23 == 9; 4:1 image when i % 29 == 11;
    exact copy of sample i - 1's image when i % 31 == 30.
    """
    rng = np.random.default_rng(seed)
    shards = root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    rows, writers = [], {}
    previous_jpg = None
    for i in range(n):
        shape, color = SHAPES[i % 3], list(COLORS)[(i // 3) % 4]
        caption = f"a {color} {shape} on a white background"
        if i % 7 == 6:
            caption = f"a {list(COLORS)[(i // 3 + 1) % 4]} {SHAPES[(i + 1) % 3]} on a white background"
        if i % 17 == 3:
            caption = f"IMG_{1000 + i}.jpg"
        if i % 19 == 5:
            caption = shape
        size = (64, 64)
        if i % 23 == 9:
            size = (16, 16)
        if i % 29 == 11:
            size = (128, 32)
        url = f"http://127.0.0.1:8000/img/{i}.jpg"
        shard_id, index = divmod(i, per_shard)
        key = f"{shard_id:05d}{index:04d}"
        row = {"uid": make_uid(url, caption), "key": key, "shard": f"{shard_id:05d}.tar", "url": url,
               "caption": caption, "status": "success", "error_message": None, "error_reason": None,
               "width": size[0], "height": size[1], "original_width": size[0], "original_height": size[1],
               "sha256": None}
        if i % 15 == 14:
            row.update(status="failed_to_download", error_message="HTTP Error 404: Not Found",
                       error_reason="http_404", width=None, height=None, original_width=None,
                       original_height=None, key=None, shard=None)
            rows.append(row)
            continue
        jpg = previous_jpg if (i % 31 == 30 and previous_jpg is not None) else draw(
            shape, color, size, tuple(int(v) for v in 245 + rng.integers(0, 10, 3)), mark=i)
        previous_jpg = jpg
        row["sha256"] = hashlib.sha256(jpg).hexdigest()
        if shard_id not in writers:
            writers[shard_id] = wds.TarWriter(str(shards / f"{shard_id:05d}.tar"))
        writers[shard_id].write({"__key__": key, "jpg": jpg, "txt": caption,
                                 "json": json.dumps({"uid": row["uid"], "url": url}).encode()})
        rows.append(row)
    for writer in writers.values():
        writer.close()
    manifest = pd.DataFrame(rows)
    for column in ("width", "height", "original_width", "original_height"):
        manifest[column] = manifest[column].astype("Int64")
    manifest.to_parquet(root / "manifest.parquet", index=False)
    for shard, table in manifest[manifest["shard"].notna()].groupby("shard"):  # img2dataset's table beside each tar
        table[["uid", "key", "caption", "status"]].to_parquet(shards / shard.replace(".tar", ".parquet"), index=False)
    return {"manifest": root / "manifest.parquet", "shards": shards, "table": manifest}
