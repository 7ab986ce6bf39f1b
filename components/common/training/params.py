"""Params of a training run (the ``train:`` section, and any other section typed by ``TrainParams``)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from clipmill.components.common.params import Section


class TrainParams(Section):
    # model
    model: str = Field(
        "clipmill-tiny",
        description="open_clip config name, a config in components/common/model_configs/, or a JSON config file.",
    )
    init_from: str | None = Field(
        None,
        description="Warm start: a local-dir export, .safetensors or checkpoint file, or an MLflow runs:/ or models:/ "
                    "URI; null trains from scratch.",
    )
    seed: int | None = Field(
        None, ge=0,
        description="Training seed (initial weights, data order, augmentation); null: project.seed. The ablation "
                    "trains N seeds from it: seed, seed+1, ...",
    )
    loss: Literal["clip", "siglip"] = Field("clip", description="Contrastive loss: CLIP (InfoNCE) or SigLIP (sigmoid).")
    local_loss: bool = Field(
        False,
        description="CLIP under DDP: each rank scores its own samples against all (same gradients, less memory).",
    )
    gather_with_grad: bool = Field(
        True,
        description="CLIP under DDP: gather features across ranks with their gradients.",
    )
    # data
    batch_size: int = Field(
        64, ge=2,
        description="Samples per device per step: the contrastive batch is batch_size x world size (accumulation does "
                    "not enlarge it).",
    )
    samples_per_epoch: int | None = Field(
        None, ge=1,
        description="Samples per epoch over all ranks; null counts the samples in the shards.",
    )
    resampled: bool = Field(
        True,
        description="Draw shards with replacement (independently per rank and worker); false splits the shards across "
                    "ranks and workers.",
    )
    shuffle_buffer: int = Field(1000, ge=1, description="Samples held in each worker's shuffle buffer.")
    sample_rewrites: bool = Field(
        True,
        description="LaCLIP: pick the caption uniformly among the original and json.rewrites, per sample and epoch.",
    )
    augment_scale: tuple[float, float] = Field(
        (0.9, 1.0),
        description="RandomResizedCrop scale range of the open_clip train transform.",
    )
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes per device.")
    # optimisation
    epochs: int = Field(4, ge=1, description="Epochs of samples_per_epoch samples.")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps (-1: run all epochs).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(
        0.1, ge=0,
        description="AdamW weight decay (not applied to gains, biases and the logit scale/bias).",
    )
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.98, ge=0, lt=1, description="AdamW beta2.")
    eps: float = Field(1e-6, gt=0, description="AdamW epsilon.")
    schedule: Literal["cosine", "constant_cooldown"] = Field(
        "cosine",
        description="cosine: warmup then cosine decay; constant_cooldown: warmup, constant, then linear cooldown "
                    "(continual runs).",
    )
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    cooldown_steps: int = Field(0, ge=0, description="constant_cooldown: length of the final linear decay.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    accumulate_grad_batches: int = Field(
        1, ge=1,
        description="Micro-batches per optimizer step (does not enlarge the contrastive batch).",
    )
    grad_clip_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this value; null disables.")
    # hardware
    accelerator: str = Field("auto", description="Lightning accelerator: auto, cpu, gpu, ...")
    devices: int | str = Field("auto", description="Devices per node (a number, 'auto' or a list string like '0,1').")
    num_nodes: int = Field(1, ge=1, description="Nodes for multi-node DDP.")
    strategy: str = Field("auto", description="Lightning strategy: auto, ddp, ddp_spawn, fsdp, ...")
    cpu_threads: int | None = Field(
        None, ge=1,
        description="torch threads per process on CPU; null keeps torch's default (one per core).",
    )
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        "auto",
        description="auto: bf16-mixed on GPU, 32-true on CPU.",
    )
    # checkpoints, validation, logging
    checkpoint_every_n_steps: int = Field(
        100, ge=0,
        description="Save a resumable checkpoint every N optimizer steps (0: never).",
    )
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept (plus last.ckpt).")
    resume: bool = Field(
        True,
        description="Continue from checkpoints/last.ckpt when it was written with the same params and data.",
    )
    val_every_n_steps: int = Field(
        100, ge=0,
        description="In-loop zero-shot and retrieval validation every N optimizer steps (0: only at the end).",
    )
    eval_batch_size: int = Field(256, ge=1, description="Batch size of in-loop validation.")
    log_every_n_steps: int = Field(10, ge=1, description="Log loss, logit scale, lr and samples/s every N steps.")

    @model_validator(mode="after")
    def _check(self) -> TrainParams:
        lo, hi = self.augment_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment_scale must satisfy 0 < low <= high <= 1, got {self.augment_scale}")
        return self

