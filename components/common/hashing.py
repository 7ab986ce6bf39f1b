"""Stable identifiers and content hashes used for lineage.

File hashes are cached by (device and inode, size, mtime) in a small SQLite file (``CLIPMILL_HASH_CACHE``, default
``.clipmill/hash_cache.sqlite`` under the working directory), the way DVC and make trust a file's stat: the
stages of a run hash each input byte once, however many of them name the same data in their lineage.
``bytes_hashed()`` counts the bytes this process actually read for hashing.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
HASH_CACHE_ENV = "CLIPMILL_HASH_CACHE"
_bytes_hashed = 0
_cache: tuple[int, sqlite3.Connection] | None = None  # (pid, connection): a forked child opens its own


def make_uid(url: str, caption: str) -> str:
    """Stable id of a crawl pair: 128 bits of sha256 over (url, caption)."""
    h = hashlib.sha256()
    h.update(url.encode("utf-8", "surrogateescape"))
    h.update(b"\x00")
    h.update(caption.encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


def hash_obj(obj: Any) -> str:
    """sha256 of the canonical JSON form of ``obj`` (params sections, configs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def params_dump(params: Any) -> Any:
    """A params section as plain JSON data for ``hash_obj``: a pydantic model's dump, anything else as it is."""
    return params.model_dump(mode="json") if hasattr(params, "model_dump") else params


def _files(paths: Iterable[str | os.PathLike]) -> list[tuple[str, Path]]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += [(f"{p.name}/{f.relative_to(p).as_posix()}", f) for f in p.rglob("*") if f.is_file()]
        elif p.is_file():
            out.append((p.name, p))
    return sorted(out)


def _object_digests(url: str, read: bool = False) -> list[tuple[str, str]]:
    """(relative name, the store's checksum) of every object at or below ``url``: an object store keeps a
    checksum (S3's ETag) of every object, so nothing is read to hash it. ``read``: the sha256 of each object's
    bytes instead (what ``content_hash`` gives for the same files on a local disk)."""
    from .storage import location, open_input

    target = location(url)
    fs, root = target.fs, target.path.rstrip("/")
    found = fs.find(root, detail=True)
    name = root.rsplit("/", 1)[-1]
    out = []
    for key, info in sorted(found.items()):
        rel = name if key == root else f"{name}/{key[len(root) + 1:]}"
        if read:
            with open_input(f"{target.protocol}://{key}") as fh:
                digest = _stream_sha256(fh)
        else:
            digest = info.get("ETag") or info.get("checksum") or f"{info.get('size')}:{info.get('LastModified')}"
        out.append((rel, str(digest).strip('"')))
    return out


def content_hash(paths: Iterable[str | os.PathLike], read_objects: bool = False) -> str:
    """sha256 over the relative names and bytes of every file under ``paths`` (files or directories; on object
    storage, over the objects' names and the store's checksums, or their bytes with ``read_objects``)."""
    from .storage import is_url

    paths = list(paths)
    entries = [(rel, file_sha256(f)) for rel, f in _files(p for p in paths if not is_url(p))]
    for url in (p for p in paths if is_url(p)):
        entries += _object_digests(str(url), read_objects)
    h = hashlib.sha256()
    for rel, digest in sorted(entries):
        h.update(rel.encode() + b"\x00" + digest.encode() + b"\x00")
    return h.hexdigest()


def bytes_hashed() -> int:
    """Bytes read for hashing by this process so far (cache hits read nothing)."""
    return _bytes_hashed


def _hash_cache() -> sqlite3.Connection | None:
    global _cache
    if _cache is None or _cache[0] != os.getpid():
        path = Path(os.environ.get(HASH_CACHE_ENV) or Path(".clipmill") / "hash_cache.sqlite")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            connection.execute("CREATE TABLE IF NOT EXISTS file_hashes (inode TEXT PRIMARY KEY, size INTEGER, "
                               "mtime_ns INTEGER, sha256 TEXT)")
        except (OSError, sqlite3.Error):
            return None  # no cache (read-only or busy): hash from the bytes
        _cache = (os.getpid(), connection)
    return _cache[1]


def _stream_sha256(fh) -> str:
    global _bytes_hashed
    h = hashlib.sha256()
    while chunk := fh.read(_CHUNK):
        h.update(chunk)
        _bytes_hashed += len(chunk)
    return h.hexdigest()


def _read_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return _stream_sha256(fh)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, from the cache when the file's size and mtime are those it was hashed at."""
    stat = os.stat(path)
    key = f"{stat.st_dev}:{stat.st_ino}"
    cache = _hash_cache()
    try:
        row = cache.execute("SELECT size, mtime_ns, sha256 FROM file_hashes WHERE inode = ?", (key,)).fetchone() \
            if cache is not None else None
    except sqlite3.Error:
        row = None
    if row is not None and row[0] == stat.st_size and row[1] == stat.st_mtime_ns:
        return row[2]
    digest = _read_sha256(path)
    if cache is not None:
        try:
            cache.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)",
                          (key, stat.st_size, stat.st_mtime_ns, digest))
        except sqlite3.Error:
            pass
    return digest
