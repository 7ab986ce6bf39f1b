"""Training throughput: the train stage's Lightning step next to a bare open_clip training loop, and the loader.

Both loops train the same model (same config and initial weights) on the same in-memory batches with the same
optimizer (fused AdamW, weight-decay groups), schedule, gradient clipping and logit-scale clamp, in the same
process, interleaved over ``--repeats`` rounds (alternating which goes first) so both see the same background
load; the first ``--warmup`` steps of each round are not timed. The Lightning side runs ``ClipModule`` under a
``Trainer`` with the stage's per-step logging and ``ThroughputMonitor``. Separately: the shard loader alone
(``ResumableLoader``: tar reading, shuffle buffer, decode, open_clip augmentation, tokenisation) and the
Lightning step fed by that loader. Target: lightning/bare >= 0.95, loader well above the step.

    python -m benchmarks.train_bench [--model clipmill-tiny] [--batch-size 64] [--steps 30] [--repeats 3]
        [--workers 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import open_clip
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from torch.utils.data import DataLoader

from clipmill.components.common.model import create_clip
from clipmill.components.common.training.data import ResumableLoader, ShardStream, scan_shards
from clipmill.components.common.training.module import (
    MAX_LOGIT_SCALE,
    ClipModule,
    _no_weight_decay,
    initial_logits,
    lr_factor,
)
from clipmill.components.common.training.params import TrainParams
from tests.test_train_shapes import write_shape_shards


def fresh_clip(params: TrainParams):
    torch.manual_seed(0)
    scale, bias = initial_logits(params.loss)
    return create_clip(params.model, init_logit_scale=scale, init_logit_bias=bias)


def bare_loop(params: TrainParams, batches: list[dict], warmup: int) -> tuple[float, float]:
    """(wall, CPU-time) samples/s of a plain open_clip loop after ``warmup`` steps."""
    model = fresh_clip(params).model
    model.train()
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if not _no_weight_decay(n, p)], "weight_decay": params.weight_decay},
         {"params": [p for n, p in named if _no_weight_decay(n, p)], "weight_decay": 0.0}],
        lr=params.lr, betas=(params.beta1, params.beta2), eps=params.eps, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, schedule=params.schedule, warmup_steps=params.warmup_steps, total_steps=len(batches)))
    loss_fn = open_clip.loss.ClipLoss()
    for step, batch in enumerate(batches):
        if step == warmup:
            start, cpu_start = time.perf_counter(), time.process_time()
        loss = loss_fn(*model(batch["image"], batch["text"]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip_norm)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        loss.item()
    samples = (len(batches) - warmup) * len(batches[0]["uid"])
    return samples / (time.perf_counter() - start), samples / (time.process_time() - cpu_start)


class StepTimer(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.samples = warmup, 0
        self.start = self.end = self.cpu_start = self.cpu_end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.samples += len(batch["uid"])
            self.end, self.cpu_end = time.perf_counter(), time.process_time()


def lightning_loop(params: TrainParams, loader, steps: int, warmup: int) -> tuple[float, float]:
    """(wall, CPU-time) samples/s of the stage's module under a Trainer fed by ``loader``, after ``warmup`` steps.

    CPU time counts this process only (not loader workers)."""
    timer = StepTimer(warmup)
    module = ClipModule(fresh_clip(params), params, total_steps=steps)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, gradient_clip_val=params.grad_clip_norm, log_every_n_steps=10,
                         callbacks=[ThroughputMonitor(batch_size_fn=lambda b: len(b["uid"])), timer])
    trainer.fit(module, train_dataloaders=loader)
    return timer.samples / (timer.end - timer.start), timer.samples / (timer.cpu_end - timer.cpu_start)


def shard_loader(shards: str, params: TrainParams, batches: int, workers: int) -> ResumableLoader:
    clip = fresh_clip(params)
    stream = ShardStream(scan_shards(shards).paths, transform=clip.train_transform, tokenizer=clip.tokenizer,
                         batch_size=params.batch_size, batches_per_epoch=batches, shuffle_buffer=params.shuffle_buffer)
    return ResumableLoader(stream, num_workers=workers, epoch_fn=lambda: 0)


def loader_throughput(loader: ResumableLoader, warmup: int) -> float:
    for i, batch in enumerate(loader):
        if i == warmup:
            start, samples = time.perf_counter(), 0
        if i >= warmup:
            samples += len(batch["uid"])
    return samples / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="clipmill-tiny", help="train.model: an open_clip config name or JSON file")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="reports/bench/train.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = TrainParams(model=args.model, batch_size=args.batch_size, shuffle_buffer=256, warmup_steps=5)
    steps = args.warmup + args.steps

    with tempfile.TemporaryDirectory(prefix="clipmill-bench-") as tmp:
        write_shape_shards(Path(tmp), shards=8, per_shard=math.ceil(steps * args.batch_size / 8), seed=0)
        batches = list(shard_loader(tmp, params, steps, 0))  # the same batches for both loops
        bare, lightning = [], []
        for r in range(args.repeats):
            order = [("bare", bare), ("lightning", lightning)][:: 1 if r % 2 == 0 else -1]
            for name, out in order:
                if name == "bare":
                    out.append(bare_loop(params, batches, args.warmup))
                else:
                    out.append(lightning_loop(params, DataLoader(batches, batch_size=None), steps, args.warmup))
        loader = loader_throughput(shard_loader(tmp, params, steps, args.workers), args.warmup)
        fed = lightning_loop(params, shard_loader(tmp, params, steps, args.workers), steps, args.warmup)

    wall = {name: statistics.median(x[0] for x in runs) for name, runs in (("bare", bare), ("lightning", lightning))}
    cpu = {name: statistics.median(x[1] for x in runs) for name, runs in (("bare", bare), ("lightning", lightning))}
    result = {
        "model": params.model, "batch_size": args.batch_size, "timed_steps": args.steps, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "loader_workers": args.workers,
        "bare_samples_per_s": round(wall["bare"], 1),
        "lightning_samples_per_s": round(wall["lightning"], 1),
        "lightning_over_bare": round(wall["lightning"] / wall["bare"], 3),
        # per CPU second of the training process: robust to other load on a shared machine
        "bare_samples_per_cpu_s": round(cpu["bare"], 1),
        "lightning_samples_per_cpu_s": round(cpu["lightning"], 1),
        "lightning_over_bare_cpu": round(cpu["lightning"] / cpu["bare"], 3),
        "loader_samples_per_s": round(loader, 1),
        "lightning_with_loader_samples_per_s": round(fed[0], 1),
        "rounds_wall": {"bare": [round(x[0], 1) for x in bare], "lightning": [round(x[0], 1) for x in lightning]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
