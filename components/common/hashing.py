"""Stable identifiers and content hashes used for lineage."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

_CHUNK = 1 << 20


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


def _files(paths: Iterable[str | os.PathLike]) -> list[tuple[str, Path]]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += [(f"{p.name}/{f.relative_to(p).as_posix()}", f) for f in p.rglob("*") if f.is_file()]
        elif p.is_file():
            out.append((p.name, p))
    return sorted(out)


def content_hash(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 over the relative names and bytes of every file under ``paths`` (files or directories)."""
    h = hashlib.sha256()
    for rel, f in _files(paths):
        h.update(rel.encode() + b"\x00")
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        h.update(b"\x00")
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
