"""The GPU path in one run: training and CLIP-scoring throughput of the stages against bare open_clip loops, the
loader alone, MFU, and GPU memory.

Per model (default: clipmill-tiny and open_clip's ViT-B-32 at its 224 px, batch 256), on the same synthetic
webdataset shards (textured JPEGs of ``--source-px`` pixels, randomly initialised weights: nothing is downloaded):

- **loader**: the train stage's shard loader alone (``ResumableLoader``: tar reading, shuffle buffer, JPEG decode,
  open_clip train transform, tokenisation, ``--workers`` processes), samples/s.
- **train**: the train stage's Lightning setup (``ClipModule`` under the stage's ``Trainer`` with its precision:
  ``auto`` = bf16-mixed on GPU, fp32 on CPU) against a bare open_clip loop (same model config and initial weights,
  AdamW with the same groups and implementation, the same precision via ``torch.autocast``, ``ClipLoss``,
  gradient clipping), both fed by the same kind of loader, so data loading is included. Samples/s after
  ``--warmup`` steps, the ratio (target >= 0.97), and on GPU the MFU from the model's FLOPs per sample
  (``torch.utils.flop_counter``, forward and backward) over ``--peak-tflops``
  (default: the bf16 dense peak of known GPUs).
- **score**: the score step's ``map`` (images read from the shards, decoded, embedded, cosine) against a bare
  open_clip inference loop on the same images in memory, images/s and ratio (target >= 0.95).
- **memory** (GPU only): the peak allocated memory of a training step at the batch size, and the largest batch
  whose training step fits (doubling, then a binary search to ``--batch-resolution``).

Results go to ``--out`` (JSON, rewritten after every part, so a run cut short keeps what it measured) and a table
on stdout. A CPU smoke run (about a minute):

    python -m benchmarks.gpu_bench --models clipmill-tiny --batch-size 16 --steps 4 --warmup 1 --workers 1 \\
        --shard-images 96 --score-images 64 --source-px 96 --out /tmp/gpu_bench.json
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import open_clip
import pandas as pd
import torch
import webdataset
from PIL import Image, ImageDraw

from clipmill.components.common.model import create_clip, export_local_dir
from clipmill.components.common.steps import StepContext
from clipmill.components.common.training.data import ResumableLoader, ShardStream, scan_shards
from clipmill.components.common.training.fit import _trainer, resolve_precision
from clipmill.components.common.training.module import (
    MAX_LOGIT_SCALE,
    ClipModule,
    _no_weight_decay,
    fused_optimizer,
    initial_logits,
)
from clipmill.components.common.training.params import TrainParams
from clipmill.components.score.params import ScoreParams
from clipmill.components.score.step import ScoreStep

from .score_bench import bare_loop as bare_score_loop

# bf16 dense peak TFLOP/s by device name (vendor data sheets, SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


# --- data ----------------------------------------------------------------------------------------------------

def textured_jpeg(rng: random.Random, px: int) -> bytes:
    """A photo-like JPEG: a smooth random colour field (upscaled noise) with one filled shape."""
    small = Image.frombytes("RGB", (8, 8), bytes(rng.randrange(256) for _ in range(8 * 8 * 3)))
    image = small.resize((px, px), Image.BICUBIC)
    r = rng.randint(px // 8, px // 3)
    cx, cy = rng.randint(r, px - r), rng.randint(r, px - r)
    ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shards(out: Path, images: int, px: int, per_shard: int = 512) -> tuple[pd.DataFrame, dict[str, bytes]]:
    """Webdataset shards in ``out`` (the curated sample format, with img2dataset's table beside each tar); returns
    uid, shard, key, caption per sample and the JPEG bytes by key."""
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    rows, jpegs = [], {}
    for s in range(math.ceil(images / per_shard)):
        shard_rows = []
        with webdataset.TarWriter(str(out / f"{s:05d}.tar")) as sink:
            for i in range(min(per_shard, images - s * per_shard)):
                key, caption = f"{s:05d}{i:05d}", f"a photo of shape {rng.randrange(1000)} on a textured background"
                jpegs[key] = textured_jpeg(rng, px)
                sink.write({"__key__": key, "jpg": jpegs[key], "txt": caption, "json": {"uid": key, "rewrites": []}})
                shard_rows.append({"uid": key, "shard": f"{s:05d}", "key": key, "caption": caption})
        # img2dataset's table beside the tar: the score step pairs each image with its shard's next caption
        pd.DataFrame(shard_rows).assign(status="success").to_parquet(out / f"{s:05d}.parquet", index=False)
        rows += shard_rows
    return pd.DataFrame(rows), jpegs


def loader(shards: Path, params: TrainParams, clip, batches: int, workers: int, pin: bool) -> ResumableLoader:
    stream = ShardStream(scan_shards(str(shards)).paths, transform=clip.train_transform, tokenizer=clip.tokenizer,
                         batch_size=params.batch_size, batches_per_epoch=batches,
                         shuffle_buffer=params.shuffle_buffer)
    return ResumableLoader(stream, num_workers=workers, epoch_fn=lambda: 0, pin_memory=pin)


def loader_rate(batches, warmup: int) -> float:
    samples, start = 0, time.perf_counter()
    for i, batch in enumerate(batches):
        if i == warmup:
            samples, start = 0, time.perf_counter()
        samples += len(batch["uid"])
    return samples / (time.perf_counter() - start)


# --- training ------------------------------------------------------------------------------------------------

def fresh_clip(params: TrainParams):
    torch.manual_seed(0)
    scale, bias = initial_logits(params.loss)
    return create_clip(params.model, init_logit_scale=scale, init_logit_bias=bias)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def optimizer_for(model: torch.nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [{"params": [p for n, p in named if not _no_weight_decay(n, p)], "weight_decay": params.weight_decay},
         {"params": [p for n, p in named if _no_weight_decay(n, p)], "weight_decay": 0.0}],
        lr=params.lr, betas=(params.beta1, params.beta2), eps=params.eps,
        fused=fused_optimizer(resolve_precision(params.precision, params.accelerator)))  # as the stage's module


def bare_train(params: TrainParams, batches, device: torch.device, warmup: int) -> float:
    """Samples/s of a plain open_clip training loop (as open_clip's own trainer steps) after ``warmup`` steps."""
    model = fresh_clip(params).model.to(device).train()
    optimizer, loss_fn = optimizer_for(model, params), open_clip.loss.ClipLoss()
    bf16 = resolve_precision(params.precision, params.accelerator) == "bf16-mixed"
    samples, start = 0, time.perf_counter()
    for step, batch in enumerate(batches):
        if step == warmup:
            sync(device)
            samples, start = 0, time.perf_counter()
        images = batch["image"].to(device, non_blocking=True)
        texts = batch["text"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(*model(images, texts))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip_norm)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        samples += len(batch["uid"])
    sync(device)
    return samples / (time.perf_counter() - start)


class StepTimer(pl.Callback):
    """Samples/s of the training steps after the first ``warmup``."""

    def __init__(self, warmup: int):
        self.warmup, self.samples, self.start, self.end = warmup, 0, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.samples += len(batch["uid"])
        if batch_idx == trainer.num_training_batches - 1:
            sync(pl_module.device)
            self.end = time.perf_counter()

    @property
    def rate(self) -> float:
        return self.samples / (self.end - self.start)


def lightning_train(params: TrainParams, batches, steps: int, warmup: int, out_dir: Path) -> float:
    """Samples/s of the train stage's module under the stage's Trainer (its precision, clipping, per-step
    logging and throughput callback) after ``warmup`` steps."""
    from lightning.pytorch.callbacks import ThroughputMonitor

    timer = StepTimer(warmup)
    callbacks = [ThroughputMonitor(batch_size_fn=lambda b: len(b["uid"]), window_size=params.log_every_n_steps + 1),
                 timer]
    trainer = _trainer(params.model_copy(update={"max_steps": steps, "epochs": 1}), out_dir=out_dir, loggers=[],
                       callbacks=callbacks)
    trainer.fit(ClipModule(fresh_clip(params), params, total_steps=steps), train_dataloaders=batches)
    return timer.rate


def flops_per_sample(params: TrainParams, device: torch.device, batch: int = 4) -> float:
    """FLOPs of one training sample (forward and backward of both towers and the loss), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    clip = fresh_clip(params)
    model = clip.model.to(device).train()
    size = clip.preprocess_cfg["size"]
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(batch, 3, *size, device=device)
    texts = clip.tokenizer(["a photo of a shape"] * batch).to(device)
    with FlopCounterMode(display=False) as counter:
        open_clip.loss.ClipLoss()(*model(images, texts)).backward()
    return counter.get_total_flops() / batch


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


# --- GPU memory ----------------------------------------------------------------------------------------------

def synthetic_step(model, optimizer, loss_fn, clip, batch: int, device: torch.device) -> None:
    size = clip.preprocess_cfg["size"]
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(batch, 3, *size, device=device)
    texts = torch.randint(1, 1000, (batch, clip.model_cfg["text_cfg"].get("context_length", 77)), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = loss_fn(*model(images, texts))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    sync(device)


def memory(params: TrainParams, device: torch.device, resolution: int, cap: int, deadline: float) -> dict:
    """Peak GiB of a bf16 training step at the batch size, and the largest batch (a multiple of ``resolution``,
    at most ``cap``) whose step fits, searched until ``deadline`` (perf_counter)."""
    clip = fresh_clip(params)
    model = clip.model.to(device).train()
    optimizer, loss_fn = optimizer_for(model, params), open_clip.loss.ClipLoss()

    def fits(batch: int) -> bool:
        try:
            synthetic_step(model, optimizer, loss_fn, clip, batch, device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    fits(params.batch_size)  # the optimizer state exists from here on, as in training
    torch.cuda.reset_peak_memory_stats(device)
    fits(params.batch_size)
    out: dict[str, Any] = {"peak_gib_at_batch": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
                           "total_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)}
    largest, exact = largest_fitting(fits, params.batch_size, resolution, cap, deadline)
    out.update(largest_batch=largest, largest_batch_exact=exact, search_cap=cap)
    return out


def largest_fitting(fits: Callable[[int], bool], start: int, resolution: int, cap: int,
                    deadline: float) -> tuple[int, bool]:
    """The largest batch that ``fits``, from ``start`` (which fits): doubling until one does not (or ``cap``),
    then bisecting to ``resolution``. Returns (batch, exact): exact is False when the cap or the deadline
    stopped the search first."""
    low, high = start, None  # low fits; high (once known) does not
    while high is None and low * 2 <= cap and time.perf_counter() < deadline:
        if fits(low * 2):
            low *= 2
        else:
            high = low * 2
    while high is not None and high - low > resolution and time.perf_counter() < deadline:
        mid = max(low + resolution, (low + high) // 2 // resolution * resolution)
        if mid >= high:
            break
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low, high is not None and high - low <= resolution


# --- scoring -------------------------------------------------------------------------------------------------

def score(model_name: str, shards: Path, rows: pd.DataFrame, images: dict[str, bytes], batch_size: int,
          device: str, tmp: Path) -> dict:
    """Images/s of the score step's map against a bare open_clip inference loop on the same images."""
    torch.manual_seed(0)
    export = export_local_dir(create_clip(model_name), tmp / f"scorer-{model_name}")
    step = ScoreStep(ScoreParams(scorer=f"local-dir:{export}", device=device, batch_size=batch_size),
                     StepContext(shards_dir=str(shards)))
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}", device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    data = [images[k] for k in rows["key"]]

    def run_step() -> np.ndarray:
        return step.map(rows)["clip_score"].to_numpy()

    def run_bare() -> np.ndarray:
        return bare_score_loop(model, preprocess, tokenizer, data, rows["caption"].tolist(), batch_size, device)

    timings = {}
    for name, fn in (("step", run_step), ("bare", run_bare)):
        fn()  # warm-up: the model's first call, lazy initialisation, the page cache
        sync(torch.device(device))
        start = time.perf_counter()
        scores = fn()
        sync(torch.device(device))
        timings[name] = (len(rows) / (time.perf_counter() - start), scores)
    diff = float(np.abs(timings["step"][1] - timings["bare"][1]).max())
    return {"step_images_per_s": round(timings["step"][0], 1), "bare_images_per_s": round(timings["bare"][0], 1),
            "ratio": round(timings["step"][0] / timings["bare"][0], 3), "max_abs_score_difference": diff,
            "images": len(rows), "batch_size": batch_size}


# --- the run -------------------------------------------------------------------------------------------------

def bench_model(name: str, args, shards: Path, rows: pd.DataFrame, images: dict[str, bytes], tmp: Path,
                device: torch.device, deadline: float, save: Callable[[], None], result: dict) -> None:
    params = TrainParams(model=name, batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer,
                         warmup_steps=5, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                         num_workers=args.workers, log_every_n_steps=10)
    steps = args.warmup + args.steps
    pin = device.type == "cuda"
    clip = fresh_clip(params)
    size = clip.preprocess_cfg["size"]
    out = result.setdefault(name, {"image_size": size if isinstance(size, int) else size[0],
                                   "precision": resolve_precision(params.precision, params.accelerator),
                                   "batch_size": args.batch_size})

    def part(label: str, fn: Callable[[], Any]) -> None:
        if time.perf_counter() > deadline:
            out[label] = "skipped: time budget spent"
        else:
            started = time.perf_counter()
            out[label] = fn()
            out.setdefault("seconds", {})[label] = round(time.perf_counter() - started, 1)
        save()

    part("loader_samples_per_s", lambda: round(loader_rate(loader(shards, params, clip, steps, args.workers, False),
                                                           args.warmup), 1))
    rates: dict[str, list[float]] = {"bare": [], "lightning": []}

    def train_rounds() -> dict:
        for r in range(args.repeats):
            for which in (("bare", "lightning") if r % 2 == 0 else ("lightning", "bare")):
                batches = loader(shards, params, clip, steps, args.workers, pin)
                rates[which].append(bare_train(params, batches, device, args.warmup) if which == "bare" else
                                    lightning_train(params, batches, steps, args.warmup, tmp / "trainer"))
        bare, lightning = (float(np.median(rates[k])) for k in ("bare", "lightning"))
        return {"bare_samples_per_s": round(bare, 1), "lightning_samples_per_s": round(lightning, 1),
                "ratio": round(lightning / bare, 3),
                "rounds": {k: [round(v, 1) for v in vs] for k, vs in rates.items()}}

    part("train", train_rounds)
    if isinstance(out.get("train"), dict):
        def mfu() -> dict:  # MFU needs a peak: known GPUs, or --peak-tflops
            flops = flops_per_sample(params, device)
            peak = peak_tflops(device, args.peak_tflops)
            return {"gflops_per_sample": round(flops / 1e9, 3), "peak_tflops": peak,
                    **{k: round(out["train"][f"{k}_samples_per_s"] * flops / (peak * 1e12), 4) if peak else None
                       for k in ("lightning", "bare")}}

        part("mfu", mfu)
    part("score", lambda: score(name, shards, rows.head(args.score_images), images, args.batch_size, device.type,
                                tmp))
    if device.type == "cuda" and not args.no_memory_search:
        part("memory", lambda: memory(params, device, args.batch_resolution, args.max_batch, deadline))


def table(result: dict, models: list[str]) -> str:
    def get(model: str, *keys: str) -> str:
        value: Any = result.get(model, {})
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        return "-" if value is None else (value if isinstance(value, str) else f"{value:,}")

    rows = [("image size (px)", ("image_size",)), ("precision", ("precision",)), ("batch size", ("batch_size",)),
            ("loader alone, samples/s", ("loader_samples_per_s",)),
            ("train bare open_clip, samples/s", ("train", "bare_samples_per_s")),
            ("train Lightning stage, samples/s", ("train", "lightning_samples_per_s")),
            ("train ratio (target >= 0.97)", ("train", "ratio")),
            ("GFLOPs per training sample", ("mfu", "gflops_per_sample")),
            ("MFU Lightning", ("mfu", "lightning")), ("MFU bare", ("mfu", "bare")),
            ("score bare open_clip, images/s", ("score", "bare_images_per_s")),
            ("score step, images/s", ("score", "step_images_per_s")),
            ("score ratio (target >= 0.95)", ("score", "ratio")),
            ("GPU peak GiB at batch", ("memory", "peak_gib_at_batch")),
            ("largest batch that fits", ("memory", "largest_batch"))]
    width = max(len(label) for label, _ in rows)
    lines = [f"{'':{width}}  " + "  ".join(f"{m:>16}" for m in models)]
    lines += [f"{label:{width}}  " + "  ".join(f"{get(m, *keys):>16}" for m in models) for label, keys in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="clipmill-tiny,ViT-B-32", help="open_clip config names, comma-separated")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per loop")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (or loader batches) first")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (bare, Lightning), alternating the order")
    parser.add_argument("--workers", type=int, default=8, help="loader worker processes")
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--shard-images", type=int, default=4096, help="images in the synthetic shards (resampled)")
    parser.add_argument("--source-px", type=int, default=256, help="side of the synthetic JPEGs")
    parser.add_argument("--score-images", type=int, default=2048)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="bf16 dense peak for MFU (default: by GPU name)")
    parser.add_argument("--no-memory-search", action="store_true")
    parser.add_argument("--batch-resolution", type=int, default=256, help="granularity of the largest-batch search")
    parser.add_argument("--max-batch", type=int, default=65536, help="the largest batch the search tries")
    parser.add_argument("--time-budget-s", type=float, default=480.0,
                        help="parts not started within this many seconds are skipped (the JSON says so)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="reports/bench/gpu.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.time_budget_s
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "open_clip": open_clip.__version__, "args": vars(args)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="clipmill-gpu-bench-") as tmp:
        tmp = Path(tmp)
        shards = tmp / "shards"
        rows, images = write_shards(shards, max(args.shard_images, args.score_images), args.source_px)
        result["data"] = {"images": len(rows), "source_px": args.source_px, "shards": len(list(shards.glob("*.tar")))}
        for name in models:
            bench_model(name, args, shards, rows, images, tmp, device, deadline, save, result.setdefault("models", {}))
    save()
    print(table(result["models"], models))
    print(f"device {result['device']}; {result['wall_seconds']} s; results in {out}")
    return result


if __name__ == "__main__":
    main()
