"""Training data: webdataset shards as batches of (image, text) for one rank, resumable mid-epoch.

Each (rank, worker) reads its own seeded stream: shards drawn with replacement (``resampled``) or its share of
the shard list, a seeded shuffle buffer, then batches. Worker w of W produces batches w, w+W, w+2W, ... of the
epoch, and every batch's content is a function of (seed, epoch, rank, batch index) for a given number of
workers: augmentation is seeded per batch and the caption choice (LaCLIP) per sample. To resume mid-epoch, workers
replay the raw stream up to the saved position without decoding it, so the run continues with exactly the samples it
would have seen.
"""
from __future__ import annotations

import json
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import webdataset
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipmill.components.common.errors import ConfigError, InputError
from clipmill.components.common.hashing import content_hash
from clipmill.components.common.log import get_logger
from clipmill.components.common.model import ImageError, decode_image
from clipmill.components.common.storage import location, open_input, register_webdataset_schemes

log = get_logger("train.data")
register_webdataset_schemes()  # shards may be s3://… URLs

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CONTENT_HASH_FILE = "content_hash.txt"  # written by reshard beside its shards/ folder


@dataclass
class ShardSet:
    """The shards of a training run and how many samples each holds."""

    spec: str
    paths: list[str]
    counts: list[int]

    @property
    def total(self) -> int:
        return sum(self.counts)


def _count_samples(path: str) -> int:
    try:
        with open_input(path) as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            keys = {webdataset.tariterators.base_plus_ext(m.name)[0] for m in tar.getmembers() if m.isreg()}
    except (tarfile.TarError, OSError) as e:
        raise InputError(path, f"unreadable shard: {e}") from None
    keys.discard(None)
    return len(keys)


def scan_shards(spec: str) -> ShardSet:
    """The non-empty shards of a directory (its ``*.tar``, else its ``shards/*.tar``: the layout of the download
    and reshard stages) or of a brace pattern (``dir/{00000..00009}.tar``)."""
    root = location(spec)  # a local folder or an object-storage URL (s3://bucket/curated)
    if "{" not in spec and root.is_dir():
        paths = sorted(str(p) for p in root.glob("*.tar")) or sorted(str(p) for p in root.glob("shards/*.tar"))
    else:
        paths = webdataset.shardlists.expand_urls(spec)
        if missing := [p for p in paths if not location(p).is_file()]:
            raise InputError(missing[0], "shard does not exist")
    if not paths:
        raise InputError(spec, "no .tar shards found")
    counts = [_count_samples(p) for p in paths]
    if empty := sum(c == 0 for c in counts):
        log.warning("%s: %d of %d shards hold no samples; skipping them", spec, empty, len(paths))
    kept = [(p, c) for p, c in zip(paths, counts) if c > 0]
    if not kept:
        raise InputError(spec, "every shard is empty")
    verify_content_hash(location(paths[0]).parent)
    return ShardSet(spec, [p for p, _ in kept], [c for _, c in kept])


def verify_content_hash(shard_dir: Path) -> str | None:
    """The content hash of the curated shards in ``shard_dir``, checked against the ``content_hash.txt`` that
    reshard wrote beside the folder: InputError when the shards' bytes or names changed since (a flipped byte
    trains silently otherwise). None when there is no such file (shards not written by reshard). File hashes
    come from the hash cache, so shards already hashed by this run's lineage are not read again."""
    hash_file = shard_dir.parent / CONTENT_HASH_FILE
    if shard_dir.name != "shards" or not hash_file.is_file():
        return None
    expected = hash_file.read_text().strip()
    actual = content_hash([shard_dir], read_objects=True)  # on object storage: the bytes, as reshard hashed them
    if actual != expected:
        raise InputError(hash_file, f"the shards in {shard_dir} no longer have this content hash (they hash to "
                                    f"{actual[:12]}..., expected {expected[:12]}...): a shard changed after "
                                    "reshard wrote it; rerun reshard (dvc repro) or restore the shards")
    return actual


def _rng(*parts: object) -> random.Random:
    return random.Random(":".join(map(str, ("clipmill", *parts))))


def _read_shard(url: str) -> Iterator[dict]:
    try:
        yield from webdataset.tarfile_samples([{"url": url}])
    except (tarfile.TarError, OSError, ValueError) as e:
        raise InputError(url, f"unreadable shard: {e.args[0] if e.args else e}") from None


class ShardStream(IterableDataset):
    """The batches of one rank for one epoch (``set_position`` picks the epoch and the first batch)."""

    def __init__(self, shards: Sequence[str], *, transform: Callable, tokenizer: Callable, batch_size: int,
                 batches_per_epoch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 resampled: bool = True, shuffle_buffer: int = 1000, sample_rewrites: bool = True):
        self.shards, self.transform, self.tokenizer = list(shards), transform, tokenizer
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.resampled, self.shuffle_buffer, self.sample_rewrites = resampled, shuffle_buffer, sample_rewrites
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _shard_sequence(self, slot: int, num_slots: int) -> Iterator[str]:
        rng = _rng(self.seed, self.epoch, "shards", slot)
        if self.resampled:
            while True:
                yield rng.choice(self.shards)
        mine = self.shards[slot::num_slots]
        while True:
            order = list(mine)
            rng.shuffle(order)
            yield from order

    def _samples(self, slot: int, num_slots: int) -> Iterator[dict]:
        raw = (s for url in self._shard_sequence(slot, num_slots) for s in _read_shard(url))
        rng = _rng(self.seed, self.epoch, "shuffle", slot)
        return webdataset.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(raw)

    def _decode(self, sample: dict) -> tuple[str, str, Image.Image]:
        url, where = sample.get("__url__", "?"), f"sample {sample.get('__key__')}"
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            raise InputError(url, f"{where}: no image ({'/'.join(IMAGE_KEYS)})", field="jpg")
        if "txt" not in sample:
            raise InputError(url, f"{where}: no caption", field="txt")
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(url, f"{where}: caption is not UTF-8: {e}", field="txt") from None
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(url, f"{where}: metadata is not JSON: {e}", field="json") from None
        uid = meta.get("uid") if isinstance(meta, dict) else None
        if not isinstance(uid, str):
            raise InputError(url, f"{where}: metadata has no string uid", field="json.uid")
        rewrites = meta.get("rewrites") or []
        if not isinstance(rewrites, list) or not all(isinstance(r, str) for r in rewrites):
            raise InputError(url, f"{where}: rewrites must be a list of strings", field="json.rewrites")
        choices = [caption] + [r for r in rewrites if r.strip()]
        if self.sample_rewrites and len(choices) > 1:
            caption = _rng(self.seed, self.epoch, "caption", uid).choice(choices)
        return uid, caption, decode_image(sample[image_key])  # ImageError: the batch skips the sample

    def _collate(self, raw: list[dict], batch_index: int) -> dict[str, Any]:
        """The batch of ``raw`` samples. A sample whose image does not decode or is oversized is skipped and
        reported in ``skipped``; its slot repeats a decodable sample of the batch, so every batch keeps its size
        (under DDP the loss gathers equal shapes from every rank)."""
        decoded, skipped = [], []
        for sample in raw:
            try:
                decoded.append(self._decode(sample))
            except ImageError as e:
                skipped.append({"file": sample.get("__url__", "?"), "key": sample.get("__key__"), "reason": str(e)})
        if not decoded:
            raise InputError(skipped[0]["file"], f"batch {batch_index}: none of its {len(raw)} images is usable "
                                                 f"(first: sample {skipped[0]['key']}: {skipped[0]['reason']})",
                             field="jpg")
        decoded += [decoded[i % len(decoded)] for i in range(len(raw) - len(decoded))]
        seed = int.from_bytes(_rng(self.seed, self.epoch, self.rank, batch_index).randbytes(8), "little")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # open_clip's augmentations draw from torch's global generator
            images = torch.stack([self.transform(image) for _, _, image in decoded])
        # uids as one numpy array: Lightning walks every element of a list on every step (batch transfer)
        return {"image": images, "text": self.tokenizer([c for _, c, _ in decoded]),
                "uid": np.array([u for u, _, _ in decoded]), "batch_index": batch_index, "skipped": skipped}

    def _batches(self, worker: int, num_workers: int) -> Iterator[dict]:
        samples = self._samples(self.rank * num_workers + worker, self.world_size * num_workers)
        for batch_index in range(worker, self.batches_per_epoch, num_workers):
            raw = list(islice(samples, self.batch_size))
            if batch_index >= self.start_batch:  # earlier batches are replayed undecoded, to reach the position
                yield self._collate(raw, batch_index)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        try:
            yield from self._batches(worker, num_workers)
        except InputError as e:  # crosses the worker boundary as data; the loader raises it again
            yield {"error": {"file": e.file, "reason": e.reason, "field": e.field}}


class ResumableLoader:
    """One rank's training batches for the current epoch, in stream order, with a resumable position.

    Lightning stores ``state_dict()`` in every checkpoint and hands it back to ``load_state_dict`` on resume,
    before the first ``iter()``. The loader has a length, so Lightning does not prefetch: the position counts
    exactly the batches the training loop has taken.
    """

    def __init__(self, stream: ShardStream, *, num_workers: int, epoch_fn: Callable[[], int],
                 pin_memory: bool = False):
        self.stream, self.num_workers, self.epoch_fn, self.pin_memory = stream, num_workers, epoch_fn, pin_memory
        self.epoch, self.batches_taken = 0, 0
        self.skipped_images = 0  # undecodable or oversized images in the batches taken from this loader
        self._resume_state: dict | None = None

    def __len__(self) -> int:
        return len(self.stream)

    def _layout(self) -> dict[str, int]:
        return {"num_workers": self.num_workers, "world_size": self.stream.world_size,
                "batch_size": self.stream.batch_size, "batches_per_epoch": len(self.stream)}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_taken": self.batches_taken, **self._layout()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_state = dict(state)

    def _start_batch(self, epoch: int) -> int:
        state, self._resume_state = self._resume_state, None
        if state is None or state["epoch"] != epoch:
            return 0
        if any(state.get(k) != v for k, v in self._layout().items()):
            log.warning("resuming with a different data layout (%s, was %s): the rest of epoch %d is a new stream",
                        self._layout(), {k: state.get(k) for k in self._layout()}, epoch)
        return min(state["batches_taken"], len(self))

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch_fn()
        start = self._start_batch(epoch)
        if start:
            log.info("resuming epoch %d at batch %d of %d", epoch, start, len(self))
        self.stream.set_position(epoch, start)
        self.epoch, self.batches_taken = epoch, start
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            persistent_workers=False)
        pending: dict[int, dict] = {}  # after a resume, workers deliver up to num_workers - 1 batches early
        for batch in loader:
            if "error" in batch:
                raise InputError(**batch["error"])
            pending[batch.pop("batch_index")] = batch
            while self.batches_taken in pending:
                batch = pending.pop(self.batches_taken)
                self._count_skipped(batch.pop("skipped"))
                self.batches_taken += 1
                yield batch

    def _count_skipped(self, skipped: list[dict]) -> None:
        for s in skipped:
            log.warning("%s: sample %s skipped: image %s", s["file"], s["key"], s["reason"])
        self.skipped_images += len(skipped)


class ShardDataModule(pl.LightningDataModule):
    """Lightning data module over a ``ShardSet``: one ``ResumableLoader`` per rank."""

    def __init__(self, shards: ShardSet, *, transform: Callable, tokenizer: Callable, batch_size: int,
                 samples_per_epoch: int | None = None, num_workers: int = 2, seed: int = 0,
                 resampled: bool = True, shuffle_buffer: int = 1000, sample_rewrites: bool = True):
        super().__init__()
        self.shards, self.transform, self.tokenizer = shards, transform, tokenizer
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.samples_per_epoch = samples_per_epoch or shards.total
        self.resampled, self.shuffle_buffer, self.sample_rewrites = resampled, shuffle_buffer, sample_rewrites

    def batches_per_epoch(self, world_size: int) -> int:
        n = self.samples_per_epoch // (self.batch_size * world_size)
        if n == 0:
            raise ConfigError(f"samples_per_epoch={self.samples_per_epoch} is less than one batch of "
                              f"{self.batch_size} x {world_size} devices")
        return n

    def _check_split(self, world_size: int) -> None:
        slots = world_size * max(1, self.num_workers)
        if not self.resampled and len(self.shards.paths) < slots:
            raise ConfigError(f"{self.shards.spec}: {len(self.shards.paths)} shards cannot be split across "
                              f"{world_size} devices x {max(1, self.num_workers)} workers; "
                              f"use resampled: true or more shards")

    @property
    def skipped_images(self) -> int:
        """Images this rank's loader skipped so far (undecodable or oversized)."""
        loader = getattr(self, "loader", None)
        return loader.skipped_images if loader is not None else 0

    def train_dataloader(self) -> ResumableLoader:
        rank, world_size = self.trainer.global_rank, self.trainer.world_size
        self._check_split(world_size)
        stream = ShardStream(self.shards.paths, transform=self.transform, tokenizer=self.tokenizer,
                             batch_size=self.batch_size, batches_per_epoch=self.batches_per_epoch(world_size),
                             rank=rank, world_size=world_size, seed=self.seed, resampled=self.resampled,
                             shuffle_buffer=self.shuffle_buffer, sample_rewrites=self.sample_rewrites)
        self.loader = ResumableLoader(stream, num_workers=self.num_workers,
                                      epoch_fn=lambda: self.trainer.current_epoch,
                                      pin_memory=self.trainer.strategy.root_device.type == "cuda")
        return self.loader
