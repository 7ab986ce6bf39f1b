"""One training run: shards + held-out sets in; a local-dir export, checkpoints, metrics and an MLflow run out.

Outputs in ``out_dir``: ``model/`` (open_clip local-dir export), ``checkpoints/`` (resumable Lightning
checkpoints and the fingerprint of the params and data that wrote them), ``metrics.json`` (final validation
metrics) and ``run.json`` (MLflow run id, steps, samples seen, wall time).
"""
from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.loggers import MLFlowLogger

from clipmill.components.common.evalsets import load_eval_suite
from clipmill.components.common.hashing import content_hash, hash_obj
from clipmill.components.common.io import read_json, write_json
from clipmill.components.common.log import get_logger, progress_disabled, step_progress
from clipmill.components.common.model import ClipModel, create_clip, export_local_dir
from clipmill.components.common.params import TrackingParams
from clipmill.components.common.tracking import stage_run, tracking_uri

from .data import ShardDataModule, ShardSet, scan_shards
from .module import ClipModule, initial_logits
from .params import TrainParams
from .validation import InLoopValidation

log = get_logger("train")

FINGERPRINT_FILE = "fingerprint.json"
LAST_CHECKPOINT = "last.ckpt"
_RANK_ENV = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


@dataclass
class TrainResult:
    """What a run produced; ``run.json`` holds it without ``metrics`` (those are ``metrics.json``).

    ``steps``/``samples_seen`` count the whole training, including steps before a resume; ``wall_time_s`` and
    ``samples_per_s`` this invocation only.
    """

    run_id: str | None
    steps: int
    samples_seen: int
    wall_time_s: float
    samples_per_s: float
    resumed_from: str | None
    init_from: str | None = None  # the warm start, if any
    skipped_images: int = 0       # this invocation, all ranks: undecodable or oversized images left out of batches
    metrics: dict[str, Any] = field(default_factory=dict)


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16 mixed precision on a GPU, full precision elsewhere."""
    if precision != "auto":
        return precision
    gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if gpu else "32-true"


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` (None: unchanged) inside the block."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def is_launcher_rank_zero() -> bool:
    """True in the process that owns the run: not a DDP worker started by Lightning, torchrun or SLURM."""
    return all(int(os.environ.get(k, "0")) == 0 for k in _RANK_ENV)


def _fingerprint(params: TrainParams, seed: int, shards: ShardSet) -> str:
    """What a checkpoint must match to be resumed: the params, the seed and the shard files."""
    files = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in shards.paths]
    return hash_obj({"params": params.model_dump(mode="json"), "seed": seed, "shards": files})


def _resume_point(ckpt_dir: Path, fingerprint: str, resume: bool, remove_stale: bool) -> str | None:
    """``last.ckpt`` when it was written by a run with the same fingerprint, else None (and stale ones removed)."""
    last, stamp = ckpt_dir / LAST_CHECKPOINT, ckpt_dir / FINGERPRINT_FILE
    if resume and last.is_file() and stamp.is_file() and read_json(stamp).get("fingerprint") == fingerprint:
        return str(last)
    if remove_stale and ckpt_dir.exists():
        log.warning("%s: removing checkpoints of %s", ckpt_dir,
                    "an earlier run (resume: false)" if not resume else "a run with other params or data")
        shutil.rmtree(ckpt_dir)
    return None


class SkippedImages(pl.Callback):
    """At the end of training: the images the loaders of every rank skipped, summed over the ranks."""

    def __init__(self, data: ShardDataModule):
        self.data, self.total = data, 0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        count = torch.tensor(float(self.data.skipped_images), device=pl_module.device)
        self.total = int(trainer.strategy.reduce(count, reduce_op="sum").item())


def _trainer(params: TrainParams, *, out_dir: Path, loggers: list, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        accelerator=params.accelerator, devices=params.devices, num_nodes=params.num_nodes,
        strategy=params.strategy, precision=resolve_precision(params.precision, params.accelerator),
        max_epochs=params.epochs, max_steps=params.max_steps,
        accumulate_grad_batches=params.accumulate_grad_batches,
        gradient_clip_val=params.grad_clip_norm, gradient_clip_algorithm="norm",
        logger=loggers or False, callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=out_dir, log_every_n_steps=params.log_every_n_steps,
        enable_progress_bar=not progress_disabled(), enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
    )


OUTPUT_ENTRIES = ("model", "checkpoints", "metrics.json", "run.json")  # what a training writes into its out_dir


def train(params: TrainParams, *, shards: str, out_dir: str | os.PathLike, eval_dir: str | os.PathLike | None,
          seed: int, tracking: TrackingParams, stage: str = "train",
          validation_listeners: Sequence[Callable[[int, dict[str, float]], None]] = (),
          extra_callbacks: Sequence[pl.Callback] = (), init_weights: str | None = None) -> TrainResult:
    """Train ``params.model`` on ``shards``, validating on ``eval_dir`` (None: no validation); see module doc.
    ``init_weights``: where the weights of ``params.init_from`` are read (a verified local copy); None: init_from."""
    out_dir = Path(out_dir)
    shard_set = scan_shards(shards)
    suite = load_eval_suite(eval_dir) if eval_dir else None
    ckpt_dir = out_dir / "checkpoints"
    owner = is_launcher_rank_zero()
    fingerprint = _fingerprint(params, seed, shard_set)
    resume_from = _resume_point(ckpt_dir, fingerprint, params.resume, remove_stale=owner)

    run_ctx = stage_run(stage, tracking, params, shard_set.paths) if owner else nullcontext()
    with torch_threads(params.cpu_threads), run_ctx as run:
        if run is not None:
            _tag_run(eval_dir, resume_from)
        pl.seed_everything(seed, workers=True, verbose=False)  # before the model: its initial weights are seeded
        clip = _create_model(params, init_weights, tracking)
        data = _data_module(params, shard_set, clip, seed)
        skipped = SkippedImages(data)
        validation = (InLoopValidation(suite, params.val_every_n_steps, params.eval_batch_size,
                                       tuple(validation_listeners)) if suite else None)
        callbacks = _callbacks(params, ckpt_dir, [*([validation] if validation else []), skipped, *extra_callbacks])
        if params.checkpoint_every_n_steps and owner:
            write_json({"fingerprint": fingerprint}, ckpt_dir / FINGERPRINT_FILE)
        trainer = _trainer(params, out_dir=out_dir, loggers=_loggers(run, tracking), callbacks=callbacks)
        module = ClipModule(clip, params, total_steps=total_steps(params, data.batches_per_epoch(trainer.world_size)))
        steps_before, wall = _fit(trainer, module, data, resume_from)
        if not trainer.is_global_zero:
            return TrainResult(None, trainer.global_step, 0, wall, 0.0, resume_from)
        result = _result(params, trainer, run, steps_before=steps_before, wall=wall, resume_from=resume_from,
                         skipped=skipped.total, validation=validation)
        _write_outputs(clip, out_dir, result, logged=run is not None)
    return result


def _tag_run(eval_dir: str | os.PathLike | None, resume_from: str | None) -> None:
    import mlflow

    mlflow.set_tags({"clipmill.eval_data_hash": content_hash([eval_dir]) if eval_dir else "none",
                     "clipmill.resumed_from": resume_from or "none"})


def _create_model(params: TrainParams, init_weights: str | None, tracking: TrackingParams) -> ClipModel:
    """The model to train: fresh (seeded) or warm-started, with the logit scale/bias its loss starts from."""
    scale, bias = initial_logits(params.loss)
    return create_clip(params.model, init_from=init_weights or params.init_from, init_logit_scale=scale,
                       aug_cfg={"scale": params.augment_scale}, init_logit_bias=bias,
                       tracking_uri=tracking_uri(tracking))


def _data_module(params: TrainParams, shard_set: ShardSet, clip: ClipModel, seed: int) -> ShardDataModule:
    return ShardDataModule(shard_set, transform=clip.train_transform, tokenizer=clip.tokenizer,
                           batch_size=params.batch_size, samples_per_epoch=params.samples_per_epoch,
                           num_workers=params.num_workers, seed=seed, resampled=params.resampled,
                           shuffle_buffer=params.shuffle_buffer, sample_rewrites=params.sample_rewrites)


def _callbacks(params: TrainParams, ckpt_dir: Path, middle: list[pl.Callback]) -> list[pl.Callback]:
    """Throughput first, then ``middle`` (validation, skipped images, the caller's), then checkpointing."""
    callbacks: list[pl.Callback] = [
        ThroughputMonitor(batch_size_fn=lambda batch: len(batch["uid"]), window_size=params.log_every_n_steps + 1),
        *middle,
        *([step_progress("train")] if progress_disabled() else []),  # a log line now and then instead of a bar
    ]
    if params.checkpoint_every_n_steps:
        callbacks.append(ModelCheckpoint(
            dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False,
            every_n_train_steps=params.checkpoint_every_n_steps, save_top_k=params.keep_checkpoints,
            monitor="step", mode="max", save_last=True))
    return callbacks


def _loggers(run: Any, tracking: TrackingParams) -> list:
    """Lightning's MLflow logger writing into the stage's run; none when the run is not tracked."""
    if run is None:
        return []
    return [MLFlowLogger(experiment_name=tracking.experiment, tracking_uri=tracking_uri(tracking),
                         run_id=run.info.run_id)]


def _fit(trainer: pl.Trainer, module: ClipModule, data: ShardDataModule, resume_from: str | None) -> tuple[int, float]:
    """Run the fit, from ``resume_from`` when set; (optimizer steps before this invocation, its wall time)."""
    steps_before = _checkpoint_step(resume_from)
    if resume_from:
        log.info("resuming from %s (step %d)", resume_from, steps_before)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=resume_from, weights_only=True)
    return steps_before, time.perf_counter() - start


def _result(params: TrainParams, trainer: pl.Trainer, run: Any, *, steps_before: int, wall: float,
            resume_from: str | None, skipped: int, validation: InLoopValidation | None) -> TrainResult:
    per_step = params.batch_size * params.accumulate_grad_batches * trainer.world_size
    trained_now = (trainer.global_step - steps_before) * per_step
    result = TrainResult(
        run_id=run.info.run_id if run is not None else None, steps=trainer.global_step,
        samples_seen=trainer.global_step * per_step, wall_time_s=round(wall, 3),
        samples_per_s=round(trained_now / wall, 1) if wall > 0 else 0.0, resumed_from=resume_from,
        init_from=params.init_from, skipped_images=skipped,
        metrics=dict(validation.last) if validation and validation.last else {})
    log.info("trained %d steps (%d samples this run) in %.1f s: %.0f samples/s; %d images skipped "
             "(undecodable or oversized)", trainer.global_step - steps_before, trained_now, wall,
             result.samples_per_s, result.skipped_images)
    return result


def _write_outputs(clip: ClipModel, out_dir: Path, result: TrainResult, *, logged: bool) -> None:
    """The export, ``metrics.json`` and ``run.json``; also to the MLflow run when ``logged``."""
    export_local_dir(clip, out_dir / "model")
    write_json(result.metrics, out_dir / "metrics.json")
    write_json({k: v for k, v in asdict(result).items() if k != "metrics"}, out_dir / "run.json")
    if logged:
        _log_outputs(out_dir, result)


def total_steps(params: TrainParams, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: an incomplete accumulation at the end of an epoch still steps."""
    steps = params.epochs * math.ceil(batches_per_epoch / params.accumulate_grad_batches)
    return min(steps, params.max_steps) if params.max_steps > 0 else steps


def _checkpoint_step(ckpt_path: str | None) -> int:
    if not ckpt_path:
        return 0
    return int(torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def _log_outputs(out_dir: Path, result: TrainResult) -> None:
    import mlflow

    mlflow.log_metrics({"samples_seen": result.samples_seen, "wall_time_s": result.wall_time_s,
                        "samples_per_s": result.samples_per_s, "skipped_images": result.skipped_images},
                       step=result.steps)
    mlflow.log_artifacts(str(out_dir / "model"), "model")
    for name in ("metrics.json", "run.json"):
        mlflow.log_artifact(str(out_dir / name))
    ckpt_dir = out_dir / "checkpoints"
    if ckpt_dir.is_dir():
        mlflow.log_artifacts(str(ckpt_dir), "checkpoints")
