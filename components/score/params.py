"""The ``score:`` section of params.yaml."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from clipmill.components.common.params import Section
from clipmill.components.common.training.params import TrainParams

BOOTSTRAP = "bootstrap"


class ScoreParams(Section):
    batch_size: int = Field(64, ge=1, description="Image-caption pairs per forward pass.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Torch device of the scorer; auto: cuda when available.",
    )
    scorer: str = Field(
        BOOTSTRAP,
        description="The scoring model: 'bootstrap' (the data-filtering network of the score_bootstrap stage), a "
                    "'local-dir:' export, an MLflow URI (models:/clipmill@champion, runs:/<id>/model), or an "
                    "open_clip config name / JSON config file used with score.checkpoint.",
    )
    bootstrap: TrainParams = Field(
        default_factory=TrainParams,
        description="Training params of the bootstrap data-filtering network: the score_bootstrap stage runs "
                    "`clipmill stage train --config-key score.bootstrap` on the trusted shards.",
    )
    checkpoint: str | None = Field(
        None,
        description="Local weights (.safetensors or checkpoint) for an open_clip config name in score.scorer.",
    )
    top_fraction: float | None = Field(
        0.3, gt=0, le=1,
        description="DataComp top fraction f: the threshold is the score at rank floor(n*f) of the descending scores "
                    "(ties kept); null: off.",
    )
    min_score: float | None = Field(
        None, ge=-1, le=1,
        description="Absolute cosine threshold (DataComp ViT-B/32: 0.25, LAION: 0.28); null: off.",
    )
    mixture_posterior: float | None = Field(
        None, gt=0, lt=1,
        description="Calibrated threshold: a two-component Gaussian mixture is fitted to the pool's scores (from the "
                    "shards' histograms) and the threshold is the lowest score at which the upper (matching) "
                    "component's posterior reaches this value (0.5: the components' crossing); null: off.",
    )
    null_recall: float | None = Field(
        None, gt=0, lt=1,
        description="Calibrated threshold from a permutation null: each image is also scored against another "
                    "sample's caption (the next of its download shard in uid order: mismatched pairs of this crawl) "
                    "and the threshold is the score below which this fraction of those pairs fall, so about this "
                    "share of the pool's mismatched captions is dropped; precision depends on how well the scorer "
                    "ranks; null: off. On the demo crawl (8,435 scored, 1,095 mismatched; bootstrap scorer from "
                    "5,000 trusted pairs): 0.75 drops 910, precision 0.96, recall 0.80; 0.77: 937, 0.95, 0.81; "
                    "0.8: 0.92, 0.84; 0.85: 0.83, 0.88.",
    )

    @model_validator(mode="after")
    def _checkpoint_only_for_config_names(self):
        if self.checkpoint is not None and (self.scorer == BOOTSTRAP or ":" in self.scorer):
            raise ValueError("checkpoint is only used with an open_clip config name or JSON config in score.scorer")
        return self

# The sections of params.yaml this package owns (clipmill/params.py collects them): name -> (schema, what it is).
SECTIONS = {
    "score": (ScoreParams, 'Step score: CLIP-score filter of the rule survivors (one pool-wide threshold).'),
}
