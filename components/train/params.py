"""Params of the train stage's own sections: ``continual:`` (the shared ``TrainParams`` lives in the core library,
``clipmill.components.common.training.params``)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from clipmill.components.common.params import Section
from clipmill.components.common.training.params import TrainParams


class ContinualParams(Section):
    """A warm-started (continual) training run: when warm_start.yaml names a model, these values replace those
    of ``train:`` (the model and its loss come from the warm start; tuned values are not applied)."""

    schedule: Literal["cosine", "constant_cooldown"] = Field(
        "constant_cooldown", description="constant_cooldown: warmup, constant lr, then a linear cooldown.")
    lr: float = Field(3e-4, gt=0, description="Learning rate of the constant phase (below a from-scratch peak).")
    warmup_steps: int = Field(5, ge=0, description="Linear warmup steps (short: the weights are trained already).")
    cooldown_steps: int = Field(40, ge=0, description="Length of the final linear decay to min_lr_ratio x lr.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    epochs: int = Field(2, ge=1, description="Epochs over the curated data of this run.")

# The sections of params.yaml this package owns (clipmill/params.py collects them): name -> (schema, what it is).
SECTIONS = {
    "train": (TrainParams,
        'Lightning over open_clip on the curated shards -> <data_dir>/train (model/, checkpoints/, '
        'metrics.json, run.json).'),
    "continual": (ContinualParams, 'Warm-started runs (`clipmill run --continual`).'),
}
