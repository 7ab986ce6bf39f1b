"""CLIP scores: cosine similarity of normalized image and caption embeddings, and the keep threshold.

The threshold is DataComp's top fraction (the score at rank floor(n*f) of the descending scores, ties kept)
and/or an absolute minimum; with both, the higher one applies.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from components.common.errors import ConfigError
from components.common.model import LOCAL_DIR_PREFIX, ClipModel, create_clip, embed_images, embed_texts, load_clip

LOW_SCORE_REASON = "low_clip_score"


def load_scorer(source: str, device: str, checkpoint: str | None = None, mlflow_uri: str | None = None) -> ClipModel:
    """The scoring model of ``source``: an export or MLflow URI, or an open_clip config name with ``checkpoint``."""
    if source.startswith((LOCAL_DIR_PREFIX, "models:/", "runs:/")) or Path(source).is_dir():
        return load_clip(source, device=device, tracking_uri=mlflow_uri)
    if checkpoint is None:
        raise ConfigError(f"score.scorer: '{source}' is a model config, so score.checkpoint must name its weights "
                          "(a randomly initialised scorer would filter at random)")
    clip = create_clip(source, init_from=checkpoint)
    clip.model.to(device).eval()
    return clip


def clip_scores(clip: ClipModel, images: list[bytes], captions: list[str], batch_size: int) -> np.ndarray:
    """Cosine similarity of each image with its caption (both embeddings L2-normalized), float32."""
    with torch.inference_mode():
        image_emb = embed_images(clip, images, batch_size=batch_size)
        text_emb = embed_texts(clip, captions, batch_size=batch_size)
    return (image_emb * text_emb).sum(dim=-1).numpy().astype(np.float32)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("score.device: cuda requested but torch sees no CUDA device")
    return device


def sortable_keys(scores: np.ndarray) -> np.ndarray:
    """uint32 keys in the order of the float32 scores (sign bit flipped, negatives inverted)."""
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)
    return np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def score_of_key(key: int) -> float:
    key = np.uint32(key)
    bits = key & np.uint32(0x7FFFFFFF) if key >> 31 else ~key
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def key_buckets(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bucket, count) of the high 16 bits of the scores' sortable keys: a shard's partial for the threshold."""
    return np.unique(sortable_keys(scores) >> 16, return_counts=True)


def top_fraction_score(buckets: np.ndarray, counts: np.ndarray, top_fraction: float, scores_in_bucket) -> float | None:
    """The score at descending rank floor(n*f) of the pool, exactly, from the bucket counts of every shard and one
    more pass over the scores of the one bucket holding that rank (``scores_in_bucket(bucket)``: an array)."""
    n = int(counts.sum())
    if n == 0:
        return None
    ascending_rank = n - 1 - min(int(np.floor(n * top_fraction)), n - 1)
    order = np.argsort(buckets)
    buckets, counts = buckets[order], counts[order]
    ends = np.cumsum(counts)
    index = int(np.searchsorted(ends, ascending_rank, side="right"))
    before = int(ends[index - 1]) if index else 0
    keys = np.sort(sortable_keys(scores_in_bucket(int(buckets[index]))))
    return score_of_key(int(keys[ascending_rank - before]))
