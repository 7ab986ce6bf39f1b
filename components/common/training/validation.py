"""In-loop validation: zero-shot and retrieval metrics every N optimizer steps and at the end of training."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

from clipmill.components.common.evalsets import EvalSuite, evaluate_clip
from clipmill.components.common.log import get_logger

log = get_logger("train.validation")

METRIC_PREFIX = "val/"


class InLoopValidation(pl.Callback):
    """Scores the model being trained on the held-out sets with the evaluation stage's own code.

    Runs on global rank 0 only (the others wait at their next collective). Results go to the loggers as
    ``val/<metric>``, to ``history`` and to each ``listener(step, metrics)``.
    """

    def __init__(self, suite: EvalSuite, every_n_steps: int, batch_size: int = 256,
                 listeners: tuple[Callable[[int, dict[str, float]], None], ...] = ()):
        self.suite, self.every_n_steps, self.batch_size, self.listeners = suite, every_n_steps, batch_size, listeners
        self.history: list[dict[str, Any]] = []

    @property
    def last(self) -> dict[str, Any] | None:
        return self.history[-1] if self.history else None

    def _validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if (self.last and self.last["step"] == step) or not trainer.is_global_zero:
            return
        start = time.perf_counter()
        metrics = {METRIC_PREFIX + k: v for k, v in evaluate_clip(pl_module.clip, self.suite, self.batch_size).items()}
        self.history.append({"step": step, **metrics})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        log.info("step %d: %s (%.1f s)", step, ", ".join(f"{k[len(METRIC_PREFIX):]}={v:.3f}" for k, v in metrics.items()
                                                          if k.endswith(("acc1", "recall_at_1"))),
                 time.perf_counter() - start)
        for listener in self.listeners:
            listener(step, metrics)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self._validate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validate(trainer, pl_module)
