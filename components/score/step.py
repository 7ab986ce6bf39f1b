"""The CLIP-score filter as a pool step: scores per shard, one pool-wide threshold, keep decisions per shard.

Map: the cosine of each sample's image and caption embeddings (images read from the download shards by shard
and key), and a permutation null: the cosine of each image with the caption of the next sample of its download
shard in uid order (``next_in_shard``; that caption's embedding is the batch's when the partner is in the batch,
else computed). Both are functions of the sample and the download alone, never of which other samples earlier
steps kept, so a sample's stored map output is what a from-scratch run would compute for it. Partial: counts of
the high 16 key bits of both. Combine: the exact DataComp top-fraction threshold (a radix select: the bucket
counts, then the scores of the one bucket that holds the rank), the absolute minimum, the calibrated threshold of
a two-component mixture fitted to the summed bucket counts (a histogram: no second pass) and/or the exact null
quantile (the same radix select over the null scores). Decide: keep ``clip_score >= threshold``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from clipmill.components.common.engine import GPU_IF_AVAILABLE
from clipmill.components.common.errors import ConfigError, InputError
from clipmill.components.common.hashing import content_hash
from clipmill.components.common.shards import ShardReader, shard_file_name
from clipmill.components.common.steps import PoolStep, decisions
from clipmill.components.common.storage import LOCAL_DIR_PREFIX, location, read_frame, read_json

from .params import BOOTSTRAP, ScoreParams
from .scoring import (
    LOW_SCORE_REASON,
    UNREADABLE_IMAGE_REASON,
    bucket_scores,
    clip_embeddings,
    fit_two_gaussians,
    key_buckets,
    load_scorer,
    mixture_threshold,
    next_in_shard,
    null_quantile_score,
    null_scores,
    resolve_device,
    sortable_keys,
    top_fraction_score,
)

THRESHOLD_KEYS = ("top_fraction", "min_score", "mixture_posterior", "null_recall")


def scorer_source(params: ScoreParams, bootstrap_model: str | None) -> str:
    return f"{LOCAL_DIR_PREFIX}{bootstrap_model}" if params.scorer == BOOTSTRAP else params.scorer


def summed_counts(partials: Callable[[], Iterator[pd.DataFrame]]) -> tuple[np.ndarray, np.ndarray]:
    """The pool's bucket counts of the scores and of the null scores: running sums over the shards' partials."""
    counts, null_counts = np.zeros(1 << 16, dtype=np.int64), np.zeros(1 << 16, dtype=np.int64)
    for partial in partials():
        buckets = partial["bucket"].to_numpy(np.int64)
        np.add.at(counts, buckets, partial["count"].to_numpy(np.int64))
        np.add.at(null_counts, buckets, partial["null_count"].to_numpy(np.int64))
    return counts, null_counts


def scores_in_bucket(mapped: Callable[[], Iterator[pd.DataFrame]], column: str, bucket: int) -> np.ndarray:
    """The pool's values of ``column`` whose key's high 16 bits are ``bucket`` (the radix select's second pass)."""
    parts = []
    for table in mapped():
        scores = table[column].to_numpy(np.float32)
        parts.append(scores[(sortable_keys(scores) >> 16) == bucket])
    return np.concatenate(parts)


class ScoreStep(PoolStep):
    name = "score"
    section = "score"
    columns = {"clip_score": pa.float32()}
    map_columns = {"clip_score": pa.float32(), "null_score": pa.float32()}
    reasons = (LOW_SCORE_REASON, UNREADABLE_IMAGE_REASON)
    needs = ("shard", "key", "caption")
    uses_torch = True
    preload = ("open_clip",)  # and torch, torchvision, timm and transformers with it

    def __init__(self, params: ScoreParams, context):
        super().__init__(params, context)
        self._clip = None  # loaded on the first map: deciding from stored scores needs no model
        self.shards = ShardReader(context.shards_dir)
        self._captions: tuple[str | None, pd.Series | None] = (None, None)  # the last shard's (``_shard_captions``)

    @property
    def clip(self):
        if self._clip is None:
            self._clip = load_scorer(scorer_source(self.params, self.context.inputs.get("bootstrap_model")),
                                     resolve_device(self.params.device), self.params.checkpoint,
                                     self.context.tracking_uri)
        return self._clip

    def prepare(self) -> None:
        _ = self.clip  # the property loads the scorer once per process

    @classmethod
    def fingerprint(cls, params, context, phase="apply"):
        dump = params.model_dump(mode="json")
        # The scores do not depend on the threshold, and the decisions depend on nothing else.
        part = {k: dump[k] for k in THRESHOLD_KEYS} if phase == "decide" else \
            {k: v for k, v in dump.items() if k not in THRESHOLD_KEYS and k != "bootstrap"}
        if phase != "decide":
            part["null_pairs"] = "next-in-download-shard"  # how the map pairs images with other captions
        if phase != "decide" and params.scorer == BOOTSTRAP:
            # the export's bytes, not where it lies: the same scorer in another checkout scores the same
            model = context.inputs.get("bootstrap_model")
            part["bootstrap_model"] = content_hash([model]) if model else None
        return super().fingerprint(part, context, phase)

    @classmethod
    def resources(cls, params: ScoreParams) -> dict:
        """One CPU, and one GPU for device cuda; device auto asks for a GPU when the Ray cluster has one (so
        the task's scorer sees CUDA there) and for none on a CPU cluster."""
        gpus = {"cuda": 1, "auto": GPU_IF_AVAILABLE}.get(params.device)
        return {"num_cpus": 1, **({"num_gpus": gpus} if gpus is not None else {})}

    @classmethod
    def check_params(cls, params: ScoreParams, context) -> None:
        if params.device == "cuda":  # auto and cpu always resolve; only cuda needs torch to say whether it can
            resolve_device(params.device)
        source = scorer_source(params, context.inputs.get("bootstrap_model"))
        if params.scorer == BOOTSTRAP and not Path(context.inputs.get("bootstrap_model") or "").is_dir():
            raise InputError(context.inputs.get("bootstrap_model"), "no bootstrap scorer export here "
                                                                    "(run the score_bootstrap stage first)")
        is_uri = source.startswith((LOCAL_DIR_PREFIX, "models:/", "runs:/")) or Path(source).is_dir()
        if not is_uri and params.checkpoint is None:
            raise ConfigError(f"score.scorer: '{source}' is a model config, so score.checkpoint must name its "
                              "weights (a randomly initialised scorer would filter at random)")

    def map(self, batch: pd.DataFrame) -> pd.DataFrame:
        images = [self.shards.read(shard_file_name(shard), key, "jpg")
                  for shard, key in zip(batch["shard"], batch["key"])]
        if len(batch):
            captions = batch["caption"].fillna("").astype(str).tolist()
            image_emb, text_emb = clip_embeddings(self.clip, images, captions, self.params.batch_size)
            scores = (image_emb * text_emb).sum(axis=1)
            null = null_scores(*self._null_pairs(batch, captions, image_emb, text_emb))
        else:
            scores = null = np.zeros(0, np.float32)
        return pd.DataFrame({"uid": batch["uid"].to_numpy(), "clip_score": scores.astype(np.float32),
                             "null_score": null.astype(np.float32)})

    def _shard_captions(self, shard: str) -> pd.Series:
        """Caption by uid of the download shard's successful samples (img2dataset's table beside the tar)."""
        if self._captions[0] != shard:
            path = self.shards.shard_dir / shard_file_name(shard).replace(".tar", ".parquet")
            try:
                table = read_frame(path, columns=["uid", "caption", "status"])
            except FileNotFoundError:
                raise InputError(path, "no img2dataset table beside the shard's tar (the score step pairs each image "
                                 "with the next caption of its download shard for its null)") from None
            table = table[table["status"] == "success"]
            self._captions = (shard, pd.Series(table["caption"].fillna("").astype(str).to_numpy(),
                                               index=table["uid"].astype(str).to_numpy()))
        return self._captions[1]

    def _null_pairs(self, batch: pd.DataFrame, captions: list[str], image_emb: np.ndarray,
                    text_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image embeddings, caption embeddings, partner row of each image) for ``null_scores``: each sample's
        partner is ``next_in_shard``; its caption's embedding is the batch's where the partner is in the batch
        with the same caption, else embedded here (a row's embedding does not depend on its batch)."""
        uids = batch["uid"].astype(str).to_numpy()
        partner_uid = np.full(len(batch), None, dtype=object)
        partner_caption = np.full(len(batch), "", dtype=object)
        for shard, rows in batch.groupby("shard", sort=False).indices.items():
            shard_captions = self._shard_captions(str(shard))
            partner_uid[rows] = next_in_shard(uids[rows], shard_captions.index.to_numpy())
            known = [p for p in partner_uid[rows] if p is not None]
            partner_caption[rows[[p is not None for p in partner_uid[rows]]]] = shard_captions.reindex(known).to_numpy()
        row_of = {(uid, caption): i for i, (uid, caption) in enumerate(zip(uids, captions))}
        missing = sorted({(p, c) for p, c in zip(partner_uid, partner_caption)
                          if p is not None and (p, c) not in row_of})
        if missing:
            import torch

            from clipmill.components.common.model import embed_texts

            with torch.inference_mode():
                extra = embed_texts(self.clip, [c for _, c in missing], batch_size=self.params.batch_size).numpy()
            row_of.update({key: len(text_emb) + i for i, key in enumerate(missing)})
            text_emb = np.concatenate([text_emb, extra.astype(text_emb.dtype)])
        partners = np.array([row_of[(p, c)] if p is not None else -1 for p, c in zip(partner_uid, partner_caption)],
                            dtype=np.int64)
        return image_emb, text_emb, partners

    def partial(self, mapped: pd.DataFrame) -> pd.DataFrame:
        """The shard's bucket counts of its scores (``count``) and of its null scores (``null_count``)."""
        counts = {}
        for column, name in (("clip_score", "count"), ("null_score", "null_count")):
            buckets, n = key_buckets(mapped[column].to_numpy(np.float32))
            counts[name] = pd.Series(n.astype(np.int64), index=buckets.astype(np.int64))
        table = pd.DataFrame(counts).fillna(0).astype(np.int64).sort_index()
        return pd.DataFrame({"bucket": table.index.to_numpy(np.int64), "count": table["count"].to_numpy(),
                             "null_count": table["null_count"].to_numpy()})

    @classmethod
    def combine(cls, params: ScoreParams, partials: Callable[[], Iterator[pd.DataFrame]],
                mapped: Callable[[], Iterator[pd.DataFrame]]) -> dict:
        top = calibrated = mixture = null = None
        if any(getattr(params, k) is not None for k in ("top_fraction", "mixture_posterior", "null_recall")):
            counts, null_counts = summed_counts(partials)
            buckets, null_buckets = np.flatnonzero(counts), np.flatnonzero(null_counts)
        if params.mixture_posterior is not None and len(buckets) >= 2:
            mixture = fit_two_gaussians(bucket_scores(buckets), counts[buckets])
            calibrated = mixture_threshold(mixture, params.mixture_posterior)
        if params.top_fraction is not None:
            top = top_fraction_score(buckets, counts[buckets], params.top_fraction,
                                     lambda bucket: scores_in_bucket(mapped, "clip_score", bucket))
        if params.null_recall is not None:
            null = null_quantile_score(null_buckets, null_counts[null_buckets], params.null_recall,
                                       lambda bucket: scores_in_bucket(mapped, "null_score", bucket))
        thresholds = [t for t in (top, params.min_score, calibrated, null) if t is not None]
        return {"threshold": max(thresholds) if thresholds else None, "calibrated_threshold": calibrated,
                "mixture": mixture, "null_threshold": null}

    def decide(self, mapped: pd.DataFrame, state: dict) -> pd.DataFrame:
        scores = mapped["clip_score"].to_numpy(np.float32)
        threshold = state["threshold"]
        keep = scores >= threshold if threshold is not None else np.ones(len(scores), dtype=bool)
        reasons = np.where(np.isnan(scores), UNREADABLE_IMAGE_REASON, np.where(keep, None, LOW_SCORE_REASON))
        return decisions(mapped["uid"], reasons, clip_score=mapped["clip_score"])

    @classmethod
    def shard_summary(cls, params: ScoreParams, decided: pd.DataFrame) -> dict:
        """The sum and number of the shard's scores (NaN, an unreadable image's, left out)."""
        return {"score_sum": float(decided["clip_score"].astype(np.float64).sum()),
                "scored": int(decided["clip_score"].notna().sum())}

    @classmethod
    def summarize(cls, params: ScoreParams, shards: list[dict], out_dir: str) -> dict:
        total, n = 0.0, 0
        for shard in shards:
            total += shard["score_sum"]
            n += shard["scored"]
        state = read_json(location(out_dir) / "state.json")["state"]
        return {"scorer": params.scorer, "threshold": state["threshold"], "top_fraction": params.top_fraction,
                "min_score": params.min_score, "mixture_posterior": params.mixture_posterior,
                "calibrated_threshold": state.get("calibrated_threshold"), "mixture": state.get("mixture"),
                "null_recall": params.null_recall, "null_threshold": state.get("null_threshold"),
                "mean_clip_score": total / n if n else None}

    @classmethod
    def expectations(cls, params: ScoreParams, table: pd.DataFrame, step_dir: str) -> list:
        """Every scored sample has a clip_score, a cosine within [-1, 1]."""
        import great_expectations as gx

        scored = table[table["reason"] != UNREADABLE_IMAGE_REASON]  # an unreadable image has no score
        return [("clip_scores", scored[["uid", "clip_score"]], [
            gx.expectations.ExpectColumnValuesToNotBeNull(column="clip_score"),
            gx.expectations.ExpectColumnValuesToBeBetween(column="clip_score", min_value=-1.0, max_value=1.0),
        ])]
