"""CLIP scores: cosine similarity of normalized image and caption embeddings, and the keep threshold.

The threshold is DataComp's top fraction (the score at rank floor(n*f) of the descending scores, ties kept),
an absolute minimum, and/or a calibrated one: a two-component Gaussian mixture fitted to the pool's score
histogram (matching and mismatched pairs), cut where the matching component's posterior reaches a set value, or
a quantile of a permutation null (each image scored against another sample's caption: the scores mismatched
pairs of this very pool get, with no trusted set and no model of the matching pairs). With several, the highest
applies.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipmill.components.common.errors import ConfigError
from clipmill.components.common.images import ImageError, decode_image
from clipmill.components.common.log import get_logger
from clipmill.components.common.storage import LOCAL_DIR_PREFIX

if TYPE_CHECKING:
    from clipmill.components.common.model import ClipModel

# torch and open_clip are imported by the functions that run a model: the curation driver, which decides from
# stored scores, does not pay their import (seconds) unless it scores shards itself.

LOW_SCORE_REASON = "low_clip_score"
UNREADABLE_IMAGE_REASON = "unreadable_image"  # undecodable or oversized: no score (NaN), dropped with this reason

log = get_logger("score")


def load_scorer(source: str, device: str, checkpoint: str | None = None, mlflow_uri: str | None = None) -> ClipModel:
    """The scoring model of ``source``: an export or MLflow URI, or an open_clip config name with ``checkpoint``."""
    from clipmill.components.common.model import create_clip, load_clip

    if source.startswith((LOCAL_DIR_PREFIX, "models:/", "runs:/")) or Path(source).is_dir():
        return load_clip(source, device=device, tracking_uri=mlflow_uri)
    if checkpoint is None:
        raise ConfigError(f"score.scorer: '{source}' is a model config, so score.checkpoint must name its weights "
                          "(a randomly initialised scorer would filter at random)")
    clip = create_clip(source, init_from=checkpoint)
    clip.model.to(device).eval()
    return clip


def clip_embeddings(clip: ClipModel, images: list[bytes], captions: list[str],
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalized (image, caption) embeddings [n, D], float32; an image that does not decode or is oversized
    (``decode_image``) is skipped, not fatal: its image row is NaN (its caption is still embedded)."""
    import torch

    from clipmill.components.common.model import embed_images, embed_texts

    dim = clip.model_cfg["embed_dim"]
    image_emb = np.full((len(images), dim), np.nan, dtype=np.float32)
    text_emb = np.zeros((len(images), dim), dtype=np.float32)
    for start in range(0, len(images), batch_size):  # decoded a batch at a time: a shard's pixels never all in memory
        stop = min(start + batch_size, len(images))
        usable, pixels = [], []
        for i in range(start, stop):
            try:
                pixels.append(decode_image(images[i]))
                usable.append(i)
            except ImageError as e:
                log.warning("image %d of %d skipped: %s", i, len(images), e)
        with torch.inference_mode():
            if usable:
                image_emb[usable] = embed_images(clip, pixels, batch_size=batch_size).numpy()
            text_emb[start:stop] = embed_texts(clip, captions[start:stop], batch_size=batch_size).numpy()
    return image_emb, text_emb


def clip_scores(clip: ClipModel, images: list[bytes], captions: list[str], batch_size: int) -> np.ndarray:
    """Cosine similarity of each image with its caption, float32; NaN for an image that does not decode."""
    image_emb, text_emb = clip_embeddings(clip, images, captions, batch_size)
    return (image_emb * text_emb).sum(axis=1).astype(np.float32)


def next_in_shard(uids: np.ndarray, shard_uids: np.ndarray) -> np.ndarray:
    """For each of ``uids``, the uid whose caption it is paired with in the permutation null: the next uid of its
    download shard's samples (``shard_uids``) in uid order, cyclic. Uids are content hashes, so the pairing is
    pseudo-random, yet fixed by the download alone: not by which samples earlier steps kept, by their order, by
    a seed, or by the other shards of a run. None where a sample is its shard's only one."""
    ordered = np.unique(np.asarray(shard_uids, dtype=str))
    uids = np.asarray(uids, dtype=str)
    if len(ordered) < 2:
        return np.full(len(uids), None, dtype=object)
    partners = ordered[np.searchsorted(ordered, uids, side="right") % len(ordered)].astype(object)
    partners[partners == uids.astype(object)] = None
    return partners


def null_scores(image_emb: np.ndarray, text_emb: np.ndarray, partners: np.ndarray) -> np.ndarray:
    """The cosine of each image with its partner's caption (a deliberately mismatched pair), float32; NaN where
    the image is unreadable or there is no partner."""
    scores = np.full(len(partners), np.nan, dtype=np.float32)
    paired = partners >= 0
    scores[paired] = (image_emb[paired] * text_emb[partners[paired]]).sum(axis=1)
    return scores


def resolve_device(device: str) -> str:
    if device == "cpu":
        return device
    import torch

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
    """(bucket, count) of the high 16 bits of the scores' sortable keys: a shard's partial for the threshold.
    NaN (an unreadable image) is in no bucket: it has no rank."""
    scores = np.asarray(scores, dtype=np.float32)
    return np.unique(sortable_keys(scores[~np.isnan(scores)]) >> 16, return_counts=True)


def rank_score(buckets: np.ndarray, counts: np.ndarray, ascending_rank: int, scores_in_bucket) -> float:
    """The score at ``ascending_rank`` of the pool, exactly, from the bucket counts of every shard and one more
    pass over the scores of the one bucket holding that rank (``scores_in_bucket(bucket)``: an array)."""
    order = np.argsort(buckets)
    buckets, counts = buckets[order], counts[order]
    ends = np.cumsum(counts)
    index = int(np.searchsorted(ends, ascending_rank, side="right"))
    before = int(ends[index - 1]) if index else 0
    keys = np.sort(sortable_keys(scores_in_bucket(int(buckets[index]))))
    return score_of_key(int(keys[ascending_rank - before]))


def top_fraction_score(buckets: np.ndarray, counts: np.ndarray, top_fraction: float, scores_in_bucket) -> float | None:
    """The score at descending rank floor(n*f) of the pool, exactly (``rank_score``); None for an empty pool."""
    n = int(counts.sum())
    if n == 0:
        return None
    return rank_score(buckets, counts, n - 1 - min(int(np.floor(n * top_fraction)), n - 1), scores_in_bucket)


def null_quantile_score(buckets: np.ndarray, counts: np.ndarray, recall: float, scores_in_bucket) -> float | None:
    """The null score at ascending rank floor(n*r), exactly: a fraction ``recall`` of the deliberately mismatched
    pairs score below it, so a threshold there drops about that share of the pool's mismatched pairs. None
    without null scores."""
    n = int(counts.sum())
    if n == 0:
        return None
    return rank_score(buckets, counts, min(int(np.floor(n * recall)), n - 1), scores_in_bucket)


def bucket_scores(buckets: np.ndarray) -> np.ndarray:
    """The score in the middle of each 16-bit key bucket (a histogram's bin centres, for the mixture fit)."""
    keys = (np.asarray(buckets, dtype=np.uint32) << np.uint32(16)) | np.uint32(0x8000)
    return np.array([score_of_key(int(k)) for k in keys], dtype=np.float64)


def fit_two_gaussians(x: np.ndarray, weights: np.ndarray, iterations: int = 300) -> dict:
    """A two-component Gaussian mixture of the weighted points ``x`` by EM: ``weight``, ``mean``, ``std`` per
    component, the lower-mean component first. Starts from the 10th and 70th weighted percentiles."""
    order = np.argsort(x)
    x, w = np.asarray(x, np.float64)[order], np.asarray(weights, np.float64)[order]
    cdf = np.cumsum(w) / w.sum()
    mean = x[np.searchsorted(cdf, [0.1, 0.7])].astype(np.float64)
    std = np.full(2, max(float(np.sqrt(np.average((x - np.average(x, weights=w)) ** 2, weights=w))) / 2, 1e-3))
    weight = np.array([0.3, 0.7])
    for _ in range(iterations):
        density = weight / std * np.exp(-0.5 * ((x[:, None] - mean) / std) ** 2)
        resp = density / np.maximum(density.sum(axis=1, keepdims=True), 1e-300) * w[:, None]
        n = np.maximum(resp.sum(axis=0), 1e-12)
        weight, mean = n / n.sum(), (resp * x[:, None]).sum(axis=0) / n
        std = np.sqrt((resp * (x[:, None] - mean) ** 2).sum(axis=0) / n) + 1e-4
    low = int(np.argmin(mean))
    pick = [low, 1 - low]
    return {"weight": weight[pick].tolist(), "mean": mean[pick].tolist(), "std": std[pick].tolist()}


def mixture_threshold(mixture: dict, posterior: float) -> float:
    """The lowest score, between the two component means, at which the upper (matching) component's posterior
    reaches ``posterior``: a sample scoring below it more likely belongs to the lower (mismatched) component."""
    weight, mean, std = (np.asarray(mixture[k]) for k in ("weight", "mean", "std"))
    grid = np.linspace(mean[0], mean[1], 2001)
    density = weight / std * np.exp(-0.5 * ((grid[:, None] - mean) / std) ** 2)
    upper = density[:, 1] / np.maximum(density.sum(axis=1), 1e-300)
    reached = np.flatnonzero(upper >= posterior)
    return float(grid[reached[0]] if len(reached) else grid[-1])
