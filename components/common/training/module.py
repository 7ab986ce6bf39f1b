"""The LightningModule: an open_clip model, its contrastive loss (CLIP or SigLIP) and its optimizer schedule."""
from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import open_clip
import torch

from clipmill.components.common.model import ClipModel

from .params import TrainParams

CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
SIGLIP_INIT_LOGIT_SCALE = math.log(10)
SIGLIP_INIT_LOGIT_BIAS = -10.0
MAX_LOGIT_SCALE = math.log(100)


def initial_logits(loss: str) -> tuple[float, float | None]:
    """(logit scale, logit bias) a model starts from under ``loss``: CLIP log(1/0.07); SigLIP log(10) and -10."""
    if loss == "siglip":
        return SIGLIP_INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS
    return CLIP_INIT_LOGIT_SCALE, None


def contrastive_loss(kind: str, *, rank: int = 0, world_size: int = 1, local_loss: bool = False,
                     gather_with_grad: bool = True) -> torch.nn.Module:
    """open_clip's loss for ``kind``; under DDP it sees the whole global batch (gathered or exchanged)."""
    if kind == "siglip":
        return open_clip.loss.SigLipLoss(rank=rank, world_size=world_size)
    return open_clip.loss.ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
                                   rank=rank, world_size=world_size)


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int, cooldown_steps: int = 0,
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    cooldown_start = total_steps - cooldown_steps
    if step < cooldown_start:
        return 1.0
    progress = min(1.0, (step - cooldown_start + 1) / max(1, cooldown_steps))
    return 1.0 - (1 - min_lr_ratio) * progress


def _no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    # as open_clip's trainer: gains, biases and the logit scale/bias are not decayed
    return param.ndim < 2 or any(part in name for part in ("bn", "ln", "bias", "logit_scale"))


def fused_optimizer(precision: str) -> bool:
    """Whether AdamW runs fused under this Lightning precision: in full precision only. Under mixed precision
    (bf16-mixed, what precision auto picks on a GPU, and 16-mixed) Lightning refuses to clip the gradients of an
    optimizer that unscales them itself, which a fused one does; there AdamW runs as torch's default
    (multi-tensor) implementation and Lightning unscales, then clips."""
    return "mixed" not in precision


class ClipModule(pl.LightningModule):
    """Trains ``clip.model`` contrastively; ``self.model`` is the open_clip model itself (exported as is).

    ``total_steps`` (optimizer steps of the whole run) sets the length of the lr schedule.
    """

    flops_per_batch: int | None = None  # read by Lightning's ThroughputMonitor; not measured

    def __init__(self, clip: ClipModel, params: TrainParams, total_steps: int):
        super().__init__()
        self.model = clip.model
        self.clip = clip
        self.params = params
        # known up front: asking the trainer (estimated_stepping_batches) would build the train loader before a
        # resumed run restores its position into it
        self.total_steps = total_steps
        self.loss_fn = contrastive_loss(params.loss, local_loss=params.local_loss,
                                        gather_with_grad=params.gather_with_grad)

    def setup(self, stage: str) -> None:
        self.configure_loss(self.trainer.global_rank, self.trainer.world_size)

    def configure_loss(self, rank: int, world_size: int) -> None:
        self.loss_fn = contrastive_loss(self.params.loss, rank=rank, world_size=world_size,
                                        local_loss=self.params.local_loss,
                                        gather_with_grad=self.params.gather_with_grad)

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """The contrastive loss of one batch (this rank's share of it under DDP)."""
        return self.contrastive(self.model.encode_image(images, normalize=True),
                                self.model.encode_text(texts, normalize=True))

    def contrastive(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """The loss from the towers' features, in fp32 whatever the precision of the towers (bf16-mixed on GPU):
        the logit scale and the SigLIP bias are fp32 parameters (as in open_clip), and their exp, the logits and
        the loss run with autocast off. A bf16 logit matrix would keep 2-3 significant digits of scale x cosine
        (up to 100)."""
        with torch.autocast(image_features.device.type, enabled=False):
            scale = self.model.logit_scale.float().exp()
            bias = self.model.logit_bias
            extra = () if bias is None else (bias.float(),)
            return self.loss_fn(image_features.float(), text_features.float(), scale, *extra)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(batch["image"], batch["text"])
        # only on the steps the loggers write (log_every_n_steps): each self.log costs about a millisecond
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            metrics = {"train/loss": loss.detach(), "train/logit_scale": self.model.logit_scale.exp().detach(),
                       "train/lr": self.optimizers().param_groups[0]["lr"]}
            if self.model.logit_bias is not None:
                metrics["train/logit_bias"] = self.model.logit_bias.detach()
            self.log_dict(metrics, batch_size=len(batch["uid"]))
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def configure_optimizers(self) -> dict[str, Any]:
        p = self.params
        named = [(n, q) for n, q in self.model.named_parameters() if q.requires_grad]
        groups = [
            {"params": [q for n, q in named if not _no_weight_decay(n, q)], "weight_decay": p.weight_decay},
            {"params": [q for n, q in named if _no_weight_decay(n, q)], "weight_decay": 0.0},
        ]
        try:
            precision = str(self.trainer.precision)
        except RuntimeError:  # not attached to a Trainer (a module built alone): full precision
            precision = "32-true"
        optimizer = torch.optim.AdamW(groups, lr=p.lr, betas=(p.beta1, p.beta2), eps=p.eps,
                                      fused=fused_optimizer(precision))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
            step, schedule=p.schedule, warmup_steps=p.warmup_steps, total_steps=self.total_steps,
            cooldown_steps=p.cooldown_steps, min_lr_ratio=p.min_lr_ratio))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
