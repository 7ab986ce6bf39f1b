"""CLIP-score filter of the rule survivors: cosine similarity of normalized image and caption embeddings.

Images are read from the download shards by (shard, key), batch by batch, in shard order; nothing is copied.
The threshold is DataComp's top fraction (the score at rank floor(n*f) of the descending scores, ties kept)
and/or an absolute minimum; with both, the higher one applies.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from components.common.engine import map_batches
from components.common.errors import ConfigError, InputError
from components.common.funnel import funnel_metrics, funnel_summary, kept_uids
from components.common.io import read_parquet, write_json, write_parquet
from components.common.log import get_logger
from components.common.model import LOCAL_DIR_PREFIX, ClipModel, create_clip, embed_images, embed_texts, load_clip
from components.common.params import RayParams, TrackingParams
from components.common.shards import ShardReader, shard_file_name
from components.common.tracking import stage_run, tracking_uri

from .params import BOOTSTRAP, ScoreParams

LOW_SCORE_REASON = "low_clip_score"

log = get_logger("score")


class ClipScorer:
    """Batch function: (uid, shard, key, caption) rows in, (uid, clip_score) out."""

    def __init__(self, source: str, shards_dir: str, device: str = "cpu", checkpoint: str | None = None,
                 mlflow_uri: str | None = None, batch_size: int = 64):
        self.clip = load_scorer(source, device, checkpoint, mlflow_uri)
        self.shards = ShardReader(shards_dir)
        self.batch_size = batch_size

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        images = [self.shards.read(shard_file_name(shard), key, "jpg") for shard, key in zip(batch["shard"], batch["key"])]
        scores = clip_scores(self.clip, images, batch["caption"].fillna("").astype(str).tolist(), self.batch_size)
        return pd.DataFrame({"uid": batch["uid"].to_numpy(), "clip_score": scores})


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


def score_threshold(scores: np.ndarray, top_fraction: float | None, min_score: float | None) -> float | None:
    """The keep threshold (keep ``score >= threshold``): DataComp top fraction and/or absolute; None when both off.

    Top fraction f over n scores (as DataComp's baselines): the score at 0-based rank floor(n*f) of the scores
    sorted descending, the lowest score when floor(n*f) = n; every score tied with the threshold is kept.
    """
    thresholds = []
    if top_fraction is not None and len(scores):
        ranked = np.sort(scores)[::-1]
        thresholds.append(float(ranked[min(int(np.floor(len(scores) * top_fraction)), len(scores) - 1)]))
    if min_score is not None:
        thresholds.append(float(min_score))
    return max(thresholds) if thresholds else None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("score.device: cuda requested but torch sees no CUDA device")
    return device


def score_histogram(scores: np.ndarray, threshold: float | None):
    """Histogram of the CLIP scores with the threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(scores, bins=50, color="steelblue")
    if threshold is not None:
        ax.axvline(threshold, color="crimson", linestyle="--", label=f"threshold {threshold:.3f}")
        ax.legend()
    ax.set(xlabel="CLIP score (cosine of image and caption embeddings)", ylabel="samples",
           title=f"CLIP scores of {len(scores)} rule survivors")
    fig.tight_layout()
    return fig


def score_survivors(manifest_path: str | os.PathLike, rules_path: str | os.PathLike,
                    shards_dir: str | os.PathLike, out_dir: str | os.PathLike, params: ScoreParams,
                    ray_params: RayParams, tracking: TrackingParams,
                    bootstrap_model: str | os.PathLike = "data/scorer/model") -> dict:
    """Score the uids kept in ``rules_path``; writes ``out_dir/scores.parquet`` (uid, clip_score, keep, reason,
    threshold) and ``out_dir/scores_summary.json``. ``bootstrap_model`` is the export used when
    ``params.scorer`` is 'bootstrap'. Returns the summary.
    """
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    survivors = kept_uids(rules_path)
    manifest = read_parquet(manifest_path, ["uid", "shard", "key", "caption"]).set_index("uid")
    missing = survivors.difference(manifest.index)
    if len(missing):
        raise InputError(manifest_path, f"{len(missing)} uids kept in {rules_path} are not in the manifest "
                                        f"(first {missing[0]})", field="uid")
    table = manifest.loc[survivors].reset_index()
    for column in ("shard", "key"):
        if table[column].isna().any():
            raise InputError(manifest_path, f"missing for {int(table[column].isna().sum())} rule survivors", field=column)
    source = f"{LOCAL_DIR_PREFIX}{bootstrap_model}" if params.scorer == BOOTSTRAP else params.scorer
    scorer_kwargs = {"source": source, "shards_dir": str(shards_dir), "device": resolve_device(params.device),
                     "checkpoint": params.checkpoint, "mlflow_uri": tracking_uri(tracking),
                     "batch_size": params.batch_size}
    scorer = ClipScorer(**scorer_kwargs)  # loaded here first, so a bad scorer fails before any work starts
    in_shard_order = table.sort_values(["shard", "key"], kind="stable")
    data = [manifest_path, rules_path, shards_dir] + ([bootstrap_model] if params.scorer == BOOTSTRAP else [])
    with stage_run("score", tracking, params, data) as run:
        started = time.perf_counter()
        if params.engine == "local":
            scored = map_batches(in_shard_order, scorer, engine="local", batch_size=params.batch_size, desc="score")
        else:
            scored = map_batches(in_shard_order, ClipScorer, engine="ray", ray_params=ray_params,
                                 batch_size=params.batch_size, fn_constructor_kwargs=scorer_kwargs, desc="score")
        images_per_s = len(table) / max(time.perf_counter() - started, 1e-9)
        scores = scored.set_index("uid")["clip_score"].reindex(table["uid"]).to_numpy(np.float32)
        threshold = score_threshold(scores, params.top_fraction, params.min_score)
        keep = scores >= threshold if threshold is not None else np.ones(len(scores), dtype=bool)
        result = pd.DataFrame({"uid": table["uid"], "clip_score": scores, "keep": keep,
                               "reason": np.where(keep, None, LOW_SCORE_REASON).astype(object),
                               "threshold": np.float32(np.nan if threshold is None else threshold)})
        summary = {**funnel_summary(result["reason"]), "scorer": params.scorer, "threshold": threshold,
                   "top_fraction": params.top_fraction, "min_score": params.min_score,
                   "mean_clip_score": float(scores.mean()) if len(scores) else None,
                   "images_per_s": images_per_s}
        write_parquet(result, out_dir / "scores.parquet")
        write_json(summary, out_dir / "scores_summary.json")
        if run is not None:
            mlflow.log_metrics({**funnel_metrics(summary), "images_per_s": images_per_s,
                                **({"threshold": threshold} if threshold is not None else {}),
                                **({"mean_clip_score": summary["mean_clip_score"]} if len(scores) else {})})
            mlflow.log_artifact(str(out_dir / "scores_summary.json"))
            figure = score_histogram(scores, threshold)
            mlflow.log_figure(figure, "score_histogram.png")
            figure.clf()
    log.info("score: %d images at %.1f images/s; threshold %s; kept %d of %d", len(table), images_per_s,
             "none" if threshold is None else f"{threshold:.4f}", summary["kept"], summary["input"])
    return summary
