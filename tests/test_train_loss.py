"""Contrastive losses, logit scale handling, lr schedules, and DDP equivalence (2 CPU processes over gloo)."""
from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from clipmill.components.common.model import create_clip
from clipmill.components.common.training.module import (
    MAX_LOGIT_SCALE,
    ClipModule,
    contrastive_loss,
    initial_logits,
    lr_factor,
)
from clipmill.components.common.training.params import TrainParams

DDP_CASES = [("clip", False), ("clip", True), ("siglip", False)]  # (loss, local_loss)


def reference_clip_loss(img, txt, scale):
    logits = scale * img @ txt.T
    n = len(img)
    i2t = -torch.log_softmax(logits, dim=1)[range(n), range(n)].mean()
    t2i = -torch.log_softmax(logits.T, dim=1)[range(n), range(n)].mean()
    return (i2t + t2i) / 2


def reference_siglip_loss(img, txt, scale, bias):
    z = 2 * torch.eye(len(img)) - 1  # +1 for matching pairs, -1 otherwise
    return -torch.log(torch.sigmoid(z * (scale * img @ txt.T + bias))).sum() / len(img)


def _features(seed, n=6, d=8):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    return img, txt


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_loss_value_and_gradients_match_the_formula(kind):
    img, txt = _features(0)
    scale = torch.tensor(math.log(1 / 0.07)).exp().requires_grad_()
    bias = torch.tensor(-10.0, requires_grad=True)
    loss_fn = contrastive_loss(kind)
    args = (img, txt, scale, bias) if kind == "siglip" else (img, txt, scale)
    got = loss_fn(*args)
    ref = reference_siglip_loss(*args) if kind == "siglip" else reference_clip_loss(*args)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    grads = torch.autograd.grad(got, args)
    ref_grads = torch.autograd.grad(ref, args)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-6)


def test_logit_scale_and_bias_start_per_loss():
    assert initial_logits("clip") == (pytest.approx(math.log(1 / 0.07)), None)
    assert initial_logits("siglip") == (pytest.approx(math.log(10)), -10.0)
    clip = create_clip("clipmill-tiny", init_logit_scale=math.log(10), init_logit_bias=-10.0)
    assert clip.model.logit_scale.item() == pytest.approx(math.log(10)) and clip.model.logit_bias.item() == -10.0
    assert create_clip("clipmill-tiny").model.logit_bias is None


def test_logit_scale_is_clamped_after_every_step():
    torch.manual_seed(0)
    clip = create_clip("clipmill-tiny")
    with torch.no_grad():
        clip.model.logit_scale.fill_(5.0)  # above log(100)
    module = ClipModule(clip, TrainParams(warmup_steps=0, lr=1e-4, grad_clip_norm=None), total_steps=1)
    batch = {"image": torch.randn(4, 3, 64, 64), "text": clip.tokenizer(["a", "b", "c", "d"]), "uid": list("abcd")}
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    assert clip.model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)


def test_lr_schedules():
    cos = dict(schedule="cosine", warmup_steps=10, total_steps=110)
    assert lr_factor(0, **cos) == pytest.approx(0.1) and lr_factor(9, **cos) == pytest.approx(1.0)
    assert lr_factor(60, **cos) == pytest.approx(0.5) and lr_factor(110, **cos) == pytest.approx(0.0)
    assert lr_factor(110, **cos, min_lr_ratio=0.1) == pytest.approx(0.1)
    const = dict(schedule="constant_cooldown", warmup_steps=10, total_steps=110, cooldown_steps=20)
    assert lr_factor(50, **const) == 1.0 and lr_factor(89, **const) == 1.0
    assert lr_factor(99, **const) == pytest.approx(0.5) and lr_factor(109, **const) == pytest.approx(0.0)


def _batch(n=8):
    clip = create_clip("clipmill-tiny")
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 64, 64, generator=g), clip.tokenizer([f"a caption number {i}" for i in range(n)])


def _loss_and_grads(kind, local_loss, images, texts, rank=0, world_size=1, wrap=lambda m: m):
    scale, bias = initial_logits(kind)
    torch.manual_seed(0)
    module = ClipModule(create_clip("clipmill-tiny", init_logit_scale=scale, init_logit_bias=bias),
                        TrainParams(loss=kind, local_loss=local_loss), total_steps=1)
    module.configure_loss(rank, world_size)
    wrapped = wrap(module)  # a DDP wrapper must outlive backward: its reducer does the all-reduce
    loss = wrapped(images, texts)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in module.model.named_parameters()}


def _ddp_worker(rank, world_size, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    images, texts = _batch()
    share = slice(rank * len(images) // world_size, (rank + 1) * len(images) // world_size)
    results = {case: _loss_and_grads(*case, images[share], texts[share], rank, world_size, DistributedDataParallel)
               for case in DDP_CASES}
    torch.save(results, f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_ddp_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    # fork: the workers inherit the imported modules instead of importing them again
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    images, texts = _batch()
    for case in DDP_CASES:
        loss, grads = _loss_and_grads(*case, images, texts)
        rank_losses = [r[case][0] for r in ranks]
        # each rank's loss covers its share of the global batch; their mean is the whole-batch loss
        assert sum(rank_losses) / 2 == pytest.approx(loss, rel=1e-5), case
        if case == ("clip", False):  # gathered features: every rank computes the whole-batch loss
            assert rank_losses == pytest.approx([loss, loss], rel=1e-5)
        for rank in ranks:  # DDP averaged the gradients: every rank holds the whole-batch gradient
            for name, g in grads.items():
                assert torch.allclose(rank[case][1][name], g, rtol=1e-4, atol=1e-6), (case, name)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_bf16_autocast_does_not_round_the_logit_scale_bias_or_loss(kind):
    """bf16-mixed (precision auto on GPU) runs the towers in bf16; the logits and the loss must stay fp32."""
    scale, bias = initial_logits(kind)
    torch.manual_seed(0)
    module = ClipModule(create_clip("clipmill-tiny", init_logit_scale=scale, init_logit_bias=bias),
                        TrainParams(loss=kind), total_steps=1)
    img, txt = _features(2, n=16, d=module.clip.model_cfg["embed_dim"])
    exact = module.contrastive(img, txt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = module.contrastive(img, txt)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, exact)  # autocast is off around the loss

    images, texts = _batch()
    reference = module(images, texts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(images, texts)  # the towers run in bf16 here
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(reference.item(), rel=2e-2)
    loss.backward()
    assert module.model.logit_scale.grad.dtype == torch.float32


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_stage_trainer_clips_gradients_under_every_precision(tmp_path, precision):
    """Lightning's mixed-precision plugin refuses to clip the gradients of an optimizer that unscales them itself
    (a fused AdamW), bf16 included: the stage's Trainer, with its clipping on, must take a step under each
    precision (bf16-mixed is precision auto on a GPU)."""
    from clipmill.components.common.training.fit import _trainer

    params = TrainParams(accelerator="cpu", devices=1, precision=precision, grad_clip_norm=1.0, max_steps=2,
                         epochs=1, warmup_steps=0)
    images, texts = _batch()
    batches = DataLoader([{"image": image, "text": text, "uid": str(i)} for i, (image, text) in
                          enumerate(zip(images, texts))], batch_size=4)
    torch.manual_seed(0)
    module = ClipModule(create_clip("clipmill-tiny"), params, total_steps=2)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = _trainer(params, out_dir=tmp_path, loggers=[], callbacks=[])
    trainer.fit(module, train_dataloaders=batches)
    assert trainer.global_step == 2
    assert any(not torch.equal(before[n], p) for n, p in module.model.named_parameters())
