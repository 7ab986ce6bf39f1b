"""One logging format for every stage, quiet third-party output, and progress lines that reach a log file.

``quiet_third_party`` (called by ``clipmill``'s main and the flow) drops what a demo run does not need to read:
Lightning's LitLogger tip and its "checkpoint directory exists" warning (a resumable checkpoint directory is
meant to exist), third-party deprecation warnings, open_clip's "no pretrained weights" (clipmill models start
random or from ``init_from``, never from open_clip's downloads) and Ray's token-auth notice (token auth stays
on). Warnings raised by clipmill's own code still show.

``progress`` is a tqdm bar on a terminal; elsewhere (a flow's log, CI) it logs a line at most every
``CLIPMILL_PROGRESS_EVERY_S`` seconds (default 30) and one at the end, with the count done, the samples done,
the time elapsed and an ETA, so a long stage is visible between its start and its end.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
PROGRESS_EVERY_ENV = "CLIPMILL_PROGRESS_EVERY_S"
_OWN_MODULES = r"(?!(components|clipmill|pipelines|tests|__main__)(\.|$))"  # a warning's module not ours
_DROPPED_LOG_LINES = {  # logger -> message prefixes that are never worth a line
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip:",),
    "lightning.fabric.utilities.rank_zero": ("💡 Tip:",),
    "root": ("No pretrained weights loaded for model",),
}
_QUIET_LOGGERS = ("ray._private.authentication.authentication_token_setup",)  # only its notices: errors still show
_quieted = False

T = TypeVar("T")


def get_logger(name: str) -> logging.Logger:
    root = logging.getLogger("clipmill")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("CLIPMILL_LOG_LEVEL", "INFO"))
        root.propagate = False
    return root.getChild(name)


def progress_disabled() -> bool:
    """tqdm bars only on a terminal (and never under CI), so logs stay readable."""
    return bool(os.environ.get("CI")) or not sys.stderr.isatty()


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Silence the third-party notices described in the module doc (idempotent; our own warnings still show)."""
    global _quieted
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=_OWN_MODULES)
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    if _quieted:
        return
    _quieted = True
    for name, prefixes in _DROPPED_LOG_LINES.items():
        (logging.getLogger() if name == "root" else logging.getLogger(name)).addFilter(_DropPrefixes(prefixes))
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class Progress:
    """Progress of one long loop, updated like a tqdm bar (``update``, ``close``, a context manager).

    ``samples``: add to the samples done with ``update(n, samples=k)``, for loops over shards or batches.
    ``bar=False``: log lines on a terminal too (where other log lines interleave, as in a flow)."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "items",
                 logger: logging.Logger | logging.LoggerAdapter | None = None, every_s: float | None = None,
                 bar: bool = True):
        self.desc, self.total, self.unit = desc, total, unit
        self.done, self.samples, self.logged = 0, 0, 0
        self.log = logger or get_logger("progress")
        self.every_s = float(os.environ.get(PROGRESS_EVERY_ENV) or 30) if every_s is None else every_s
        self.start = self.last = time.monotonic()
        self.bar, self.closed = None, False
        if bar and not progress_disabled():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit)

    def update(self, n: int = 1, samples: int = 0) -> None:
        self.done += n
        self.samples += samples
        if self.bar is not None:
            self.bar.update(n)
            if self.samples:
                self.bar.set_postfix(samples=f"{self.samples:,}", refresh=False)
        elif time.monotonic() - self.last >= self.every_s:
            self._log_line()

    def line(self) -> str:
        """``desc: 6/11 shards, 5,120 samples, 42 s elapsed, ETA 35 s``."""
        elapsed = time.monotonic() - self.start
        parts = [f"{self.desc}: {self.done:,}" + (f"/{self.total:,}" if self.total is not None else "")
                 + f" {self.unit}"]
        if self.samples:
            parts.append(f"{self.samples:,} samples")
        parts.append(f"{elapsed:.0f} s elapsed")
        if self.total and 0 < self.done < self.total:
            parts.append(f"ETA {elapsed / self.done * (self.total - self.done):.0f} s")
        return ", ".join(parts)

    def _log_line(self) -> None:
        self.last, self.logged = time.monotonic(), self.done
        self.log.info("%s", self.line())

    def close(self) -> None:
        """The bar closed, or the final line logged (once)."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.done != self.logged:
            self._log_line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable[T], desc: str, unit: str = "items", total: int | None = None,
             logger: logging.Logger | None = None) -> Iterator[T]:
    """The items of ``iterable``, with a :class:`Progress` over them."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(desc, total, unit, logger) as bar:
        for item in iterable:
            yield item
            bar.update(1)


def step_progress(desc: str):
    """A Lightning callback with a :class:`Progress` over the optimizer steps (log lines; for when the tqdm bar is
    off), counting the samples of every rank."""
    import lightning.pytorch as pl

    class StepProgress(pl.Callback):
        bar: Progress | None = None

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.is_global_zero:
                steps = trainer.estimated_stepping_batches  # inf for a loader of unknown length
                self.bar = Progress(desc, int(steps) if math.isfinite(steps) else None, "steps", bar=False)
                self.bar.done = self.bar.logged = trainer.global_step  # a resumed run counts from its step

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                               batch_idx: int) -> None:
            if self.bar is not None:
                samples = len(batch["uid"]) * trainer.world_size if isinstance(batch, dict) and "uid" in batch else 0
                self.bar.update(trainer.global_step - self.bar.done, samples=samples)

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if self.bar is not None:
                self.bar.close()

    return StepProgress()
