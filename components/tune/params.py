"""Params of the sweep stage (the ``tune:`` section)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from clipmill.components.common.params import Section


class SearchSpace(Section):
    lr: tuple[float, float] = Field((3e-4, 3e-3), description="Peak learning rate: log-uniform over [low, high].")
    weight_decay: tuple[float, float] = Field((0.01, 0.3), description="Weight decay: log-uniform over [low, high].")
    warmup_steps: list[int] = Field([5, 20], min_length=1, description="Warmup steps: one of these.")
    batch_size: list[int] = Field([32, 64], min_length=1, description="Per-device batch size: one of these.")
    loss: list[Literal["clip", "siglip"]] = Field(["clip", "siglip"], min_length=1, description="Loss: one of these.")

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        for name in ("lr", "weight_decay"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(low, high)}")
        return self


class TuneParams(Section):
    config_key: str = Field(
        "train",
        description="Dotted key of the TrainParams section every trial starts from (and best_params.json is for).",
    )
    trials: int = Field(4, ge=1, description="Configurations sampled from the search space.")
    steps_per_trial: int = Field(60, ge=1, description="Optimizer steps of a trial that is not stopped early.")
    report_every_n_steps: int = Field(
        20, ge=1,
        description="Validate and report to Ray Tune every N steps (the ASHA time unit).",
    )
    metric: str = Field("val/zeroshot/acc1", description="Reported validation metric that ranks trials.")
    mode: Literal["max", "min"] = Field("max", description="Whether the metric is better high or low.")
    grace_period: int = Field(1, ge=1, description="ASHA: reports every trial gets before it can be stopped.")
    reduction_factor: float = Field(
        2.0, gt=1,
        description="ASHA: the top 1/reduction_factor of trials go on at each rung.",
    )
    cpus_per_trial: float = Field(
        1.0, gt=0,
        description="CPUs reserved per trial (trials run concurrently as resources allow); more than the Ray cluster "
                    "has is an error before any trial starts.",
    )
    gpus_per_trial: float | Literal["auto"] = Field(
        "auto", description="GPUs reserved per trial; auto: 1 when the Ray cluster has GPUs and the trained section's "
                            "accelerator is not cpu, else 0. More than the cluster has is an error before any trial "
                            "starts.")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials running at once (null: as many as the resources allow). ASHA stops trials by "
                                "the order in which concurrent trials report, which varies from run to run; with 1 "
                                "the sweep decides the same way in every reproduction.")
    trial_num_workers: int = Field(
        0, ge=0,
        description="DataLoader workers inside a trial (0: load in the trial process).",
    )
    object_store_mb: int = Field(
        100, ge=80,
        description="Object store of the local Ray (the sweep passes no large objects).",
    )
    search_space: SearchSpace = Field(default_factory=SearchSpace, description="What the trials vary.")

    @model_validator(mode="after")
    def _check(self) -> TuneParams:
        if self.steps_per_trial % self.report_every_n_steps:
            raise ValueError("steps_per_trial must be a multiple of report_every_n_steps")
        if self.gpus_per_trial != "auto" and self.gpus_per_trial < 0:
            raise ValueError(f"gpus_per_trial must be auto or >= 0, got {self.gpus_per_trial}")
        return self


# The sections of params.yaml this package owns (clipmill/params.py collects them): name -> (schema, what it is).
SECTIONS = {
    "tune": (TuneParams,
        'Ray Tune sweep of short training runs -> <data_dir>/tune/best_params.json (+ trials.json).'),
}
