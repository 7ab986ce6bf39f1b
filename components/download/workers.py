"""img2dataset's downloader and resizer with the stage's fetch (``fetch.py``) and decode (``decode.py``).

img2dataset still shards, resizes, writes and distributes; ``patched_img2dataset`` makes ``img2dataset.download``
build these two classes in place of its own. Both are picklable (the multiprocessing distributor spawns its
workers, which import this module).

Each process that img2dataset spawns imports img2dataset again (torch, albumentations and wandb with it: seconds of
CPU each), which a small increment pays in full: ``patched_img2dataset`` also replaces img2dataset's progress
process (it only prints totals, which the stage computes from the checked shards) with ``QuietLogger``, and with
``in_process`` runs the shards in this process, one after another, instead of in a pool of one spawned worker.
Otherwise its worker processes fork from a server process that imported img2dataset once
(``forkserver_distributor``), instead of each spawned worker importing it again: six processes, replaced every five
shards, paid that import on two cores for about 6 s of every download and 1 s of every 1,000 URLs.
"""
from __future__ import annotations

import functools
import importlib
import io
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import albumentations as A
import cv2
import img2dataset.downloader as i2d_downloader
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from img2dataset.distributor import retrier
from img2dataset.resizer import ResizeMode, Resizer, SuppressStdoutStderr

from clipmill.components.common.engine import start_forkserver
from clipmill.components.common.errors import InputError

from .decode import DecodeError, decode_image
from .fetch import FetchPolicy, fetch_with_retry
from .shards import canonicalize_shard, check_shard

i2d_main = importlib.import_module("img2dataset.main")  # the package's ``main`` attribute is a function


class SafeDownloader(i2d_downloader.Downloader):
    """img2dataset's downloader, fetching with ``fetch.fetch_with_retry`` under ``policy``; with ``requests_file``
    (the list's requests: uid and URL as listed), each shard is also checked and made canonical where it was
    downloaded (``finish_shard``)."""

    def __init__(self, *args, policy: FetchPolicy, requests_file: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = policy
        self.requests_file = requests_file

    def download_shard(self, row) -> None:
        original = i2d_downloader.download_image_with_retry  # looked up by name for each URL of the shard
        i2d_downloader.download_image_with_retry = self._download_image_with_retry
        try:
            super().download_shard(row)
        finally:
            i2d_downloader.download_image_with_retry = original
        if self.requests_file is not None:
            finish_shard(Path(self.output_folder), row[0], self.requests_file)

    def _download_image_with_retry(self, row, timeout, retries, user_agent_token, disallowed_header_directives):
        key, url = row
        body, error, _ = fetch_with_retry(url, self.policy, retries)
        return key, (io.BytesIO(body) if body is not None else None), error


def finish_shard(shards_dir: Path, shard_id: int, requests_file: str) -> None:
    """Check a shard just downloaded and rewrite it in canonical form, in the worker that downloaded it: while
    other shards download (and this worker's next one starts), instead of one after another in the stage once
    every shard is done (192 shards: about 20 s on one core). The stage then finds it canonical and only checks it
    again. A shard that fails the check is left as it is: the stage's own check finds it and downloads it anew.
    Nor does a requests file this worker cannot read fail the shard (img2dataset would count it failed and fetch it
    again): the stage makes it canonical then, as it does a shard of an earlier version's run."""
    try:
        rows, index = check_shard(shards_dir, shard_id)
        listed = _listed_urls(requests_file, rows["uid"].tolist())
    except (InputError, OSError, pa.ArrowException):
        return
    canonicalize_shard(shards_dir, shard_id, listed, index)


def _listed_urls(requests_file: str, uids: list[str]) -> dict[str, str]:
    """uid -> URL as listed, for ``uids`` (the rows of one shard), from the list's requests."""
    stat = os.stat(requests_file)
    table = _requests(requests_file, stat.st_mtime_ns, stat.st_size)
    chosen = table.filter(pc.is_in(table["uid"], value_set=pa.array(uids, table["uid"].type)))
    return dict(zip(chosen["uid"].to_pylist(), chosen["url"].to_pylist()))


@functools.lru_cache(maxsize=1)
def _requests(requests_file: str, mtime_ns: int, size: int) -> pa.Table:
    """The list's uids and URLs, read once per worker (a worker downloads up to five shards of one list) and again
    when the file changed (a list downloaded anew in the same process)."""
    return pq.read_table(requests_file, columns=["uid", "url"])


class SafeResizer(Resizer):
    """img2dataset's resizer over ``decode.decode_image`` (size checked on the header, 16-bit, palette, EXIF).

    Supports what the stage uses: every resize mode, re-encoding always, no blurring.
    """

    def __call__(self, img_stream, blurring_bbox_list=None):
        try:
            with SuppressStdoutStderr():
                cv2.setNumThreads(1)
                img_stream.seek(0)
                img = decode_image(img_stream.read(), self.max_image_area)
                return self._resize(img)
        except DecodeError as err:
            return None, None, None, None, None, str(err)
        except Exception as err:  # pylint: disable=broad-except  (img2dataset's contract: the error as text)
            return None, None, None, None, None, str(err)

    def _transforms(self, downscale: bool) -> list:
        """img2dataset's albumentations transforms for the resize mode, built once per resizer and direction (building
        one checks every argument: 0.16 ms an image, a quarter of a small image's resize); they hold no state that
        an image changes, so each image gets exactly what img2dataset's per-image transforms give."""
        built = self.__dict__.setdefault("_built", {})
        if downscale not in built:
            interpolation = self.downscale_interpolation if downscale else self.upscale_interpolation
            if self.resize_mode in (ResizeMode.keep_ratio, ResizeMode.center_crop):
                built[downscale] = [A.SmallestMaxSize(max_size=self.image_size, interpolation=interpolation, p=1.0)]
                if self.resize_mode == ResizeMode.center_crop:
                    built[downscale].append(A.CenterCrop(height=self.image_size, width=self.image_size))
            else:
                built[downscale] = [A.LongestMaxSize(max_size=self.image_size, interpolation=interpolation, p=1.0)]
                if self.resize_mode == ResizeMode.border:
                    built[downscale].append(A.PadIfNeeded(min_height=self.image_size, min_width=self.image_size,
                                                          border_mode=cv2.BORDER_CONSTANT, value=[255, 255, 255],
                                                          p=1.0))
        return built[downscale]

    def __getstate__(self) -> dict:
        """Pickled to the workers without the built transforms (each process builds its own)."""
        return {k: v for k, v in self.__dict__.items() if k != "_built"}

    def _resize(self, img):
        original_height, original_width = img.shape[:2]
        if min(original_height, original_width) < self.min_image_size:
            return None, None, None, None, None, "image too small"
        if max(original_height, original_width) / min(original_height, original_width) > self.max_aspect_ratio:
            return None, None, None, None, None, "aspect ratio too large"
        if self.resize_mode in (ResizeMode.keep_ratio, ResizeMode.center_crop):
            downscale = min(original_height, original_width) > self.image_size
        elif self.resize_mode in (ResizeMode.border, ResizeMode.keep_ratio_largest):
            downscale = max(original_width, original_height) > self.image_size
        else:
            downscale = None
        if downscale is not None and (not self.resize_only_if_bigger or downscale):
            for transform in self._transforms(downscale):
                img = transform(image=img)["image"]
        height, width = img.shape[:2]
        encoded = cv2.imencode(f".{self.encode_format}", img, params=self.encode_params)[1].tobytes()
        return encoded, width, height, original_width, original_height, None


class QuietLogger:
    """Stands in for img2dataset's ``LoggerProcess`` (a spawned process that reads the stats files and prints
    totals): nothing to start, nothing to print."""

    def __init__(self, *args, **kwargs):
        self.done_shards: set = set()

    def start(self) -> None:
        pass

    def join(self, timeout=None) -> None:
        pass

    def terminate(self) -> None:
        pass


def in_process_distributor(processes_count, downloader, reader, subjob_size, max_shard_retry) -> None:
    """img2dataset's distributor for one process: each shard in this process, failed shards retried as img2dataset's
    own distributors retry them."""

    def run(rows) -> list:
        return [row for status, row in map(downloader, rows) if status is False]

    retrier(run, run(reader), max_shard_retry)


# What a download worker imports: this module imports img2dataset's downloader, resizer and writer (and torch,
# albumentations, OpenCV and wandb with them).
WORKER_MODULES = [__name__]
# Settings a worker reads from its environment (``run_img2dataset`` sets them per download): a forked worker gets
# the server's, from when it started, so each pool hands its workers the current ones.
WORKER_ENVIRONMENT = ("OPENCV_IO_MAX_IMAGE_PIXELS", "NO_ALBUMENTATIONS_UPDATE")


def _worker_start(values: dict[str, str], started, first: int, stagger: float) -> None:
    """A worker's set-up: the download's environment, and the ``n``-th of the pool's ``first`` workers waits
    ``n * stagger`` seconds before it takes its first shard (``forkserver_distributor``)."""
    os.environ.update(values)
    if stagger <= 0:
        return
    with started.get_lock():
        position = started.value
        started.value += 1
    if position < first:
        time.sleep(position * stagger)


def forkserver_distributor(processes_count, downloader, reader, subjob_size, max_shard_retry,
                           stagger: float = 0.0) -> None:
    """img2dataset's multiprocessing distributor (the same pool, tasks and retries: a worker is replaced after five
    shards) with workers forked from a forkserver that preloaded ``WORKER_MODULES``, not spawned.

    ``stagger``: the pool's first workers start their first shards that many seconds apart, not together. Shards of
    one size that start together end together, each waiting on its slowest URLs (a timeout, retried) while the
    cores idle; started apart, one worker's wait is another's work (``run_img2dataset`` asks for it where there
    are more shards than workers)."""
    context = start_forkserver(WORKER_MODULES)  # the stage started it early, unless called on its own
    environment = {k: os.environ[k] for k in WORKER_ENVIRONMENT if k in os.environ}
    started = context.Value("i", 0)  # workers started so far (a replacement after five shards starts at once)
    with context.Pool(processes_count, initializer=_worker_start,
                      initargs=(environment, started, processes_count, stagger),
                      maxtasksperchild=5) as pool:

        def run(rows) -> list:
            return [row for status, row in pool.imap_unordered(downloader, rows) if status is False]

        retrier(run, run(reader), max_shard_retry)
        pool.terminate()
        pool.join()


@contextmanager
def patched_img2dataset(policy: FetchPolicy, in_process: bool = False,
                        requests_file: str | None = None, stagger: float = 0.0) -> Iterator[None]:
    """Within the block, ``img2dataset.download`` builds a ``SafeDownloader`` (with ``policy`` and
    ``requests_file``), a ``SafeResizer`` and a ``QuietLogger``; its multiprocessing distributor forks its workers
    from a forkserver (the first ones ``stagger`` seconds apart), or with ``in_process`` runs the shards in this
    process."""
    saved = i2d_main.Downloader, i2d_main.Resizer, i2d_main.LoggerProcess, i2d_main.multiprocessing_distributor
    i2d_main.Downloader = functools.partial(SafeDownloader, policy=policy, requests_file=requests_file)
    i2d_main.Resizer = SafeResizer
    i2d_main.LoggerProcess = QuietLogger
    i2d_main.multiprocessing_distributor = (in_process_distributor if in_process else
                                            functools.partial(forkserver_distributor, stagger=stagger))
    try:
        yield
    finally:
        (i2d_main.Downloader, i2d_main.Resizer, i2d_main.LoggerProcess,
         i2d_main.multiprocessing_distributor) = saved
