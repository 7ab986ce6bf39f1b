"""One flow run per checkout: an exclusive lock on ``.clipmill/run.lock`` under the project root.

Two runs in one checkout would collide on DVC's repository lock, ``warm_start.yaml``, ``dvc.lock`` and the data
commit, so the second one is refused in one line (exit ``RUN_LOCKED_EXIT``) or, with ``wait_s``, waits for the
first. The lock is a ``flock``: the kernel releases it when its holder exits or is killed, so a crash never
leaves a stale lock. The file names the holder (pid, flow, start time) for the refusal message. It serialises
runs on one machine; two machines sharing a checkout over a network file system are only serialised where that
file system supports ``flock``.
"""
from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from clipmill.components.common.errors import ClipmillError

LOCK_FILE = Path(".clipmill") / "run.lock"
RUN_LOCKED_EXIT = 75  # EX_TEMPFAIL: try again later

_held: set[Path] = set()  # lock files this process holds: the CLI takes the lock, then the flow re-enters it


class RunLocked(ClipmillError):
    """Another clipmill run holds the checkout."""


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1000).decode(errors="replace").strip()
    return text or "holder unknown"


def _acquire(fd: int, path: Path, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                waited = f" after waiting {wait_s:.0f} s" if wait_s > 0 else ""
                raise RunLocked(f"{path}: another clipmill run holds this checkout ({_holder(fd)}){waited}; "
                                f"wait for it to finish (the lock is released when it exits)") from None
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


@contextmanager
def run_lock(root: str | os.PathLike, what: str, wait_s: float = 0.0) -> Iterator[Path]:
    """Hold the run lock of the checkout at ``root`` (re-entrant within one process); yields its path."""
    path = (Path(root) / LOCK_FILE).resolve()
    if path in _held:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, wait_s)
        since = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {what}, since {since}\n".encode(), 0)
        _held.add(path)
        try:
            yield path
        finally:
            _held.discard(path)
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
