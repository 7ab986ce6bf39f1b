"""Where data lies: a local path or an object-storage URL (``s3://bucket/prefix``, or any fsspec protocol).

``location(p)`` gives a ``pathlib.Path`` for a local path and a universal-pathlib ``UPath`` for a URL. Both
support ``/``, ``exists``, ``is_file``, ``is_dir``, ``read_text``, ``rglob``, ``unlink`` and ``open``, so code that
walks a directory of per-shard outputs runs unchanged on either.

Object stores take their settings from the standard environment: for S3 and S3-protocol servers
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` (or a profile).

Writes are atomic either way: a local file is written to a temporary sibling and renamed
(``clipmill.components.common.io``); an object is stored by one PUT, which readers see whole or not at all.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import io as local_io


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` names object storage (``scheme://…``; ``file://`` counts as local)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def location(path: str | os.PathLike) -> Path:
    """``path`` as a path object: an absolute ``Path`` for a local path, a ``UPath`` for a URL."""
    if is_url(path):
        from upath import UPath

        # No listings cache: other processes (pool workers, Ray tasks) write the markers this one looks for.
        return path if isinstance(path, UPath) else UPath(str(path).rstrip("/"), use_listings_cache=False)
    return Path(str(path).removeprefix("file://")).absolute()


def relative(path: Path, base: Path) -> str:
    """``path`` below ``base``, as a posix string ('crawl/00012.parquet')."""
    text, prefix = str(path), str(base).rstrip("/") + "/"
    if not text.startswith(prefix):
        raise ValueError(f"{text} is not below {base}")
    return text[len(prefix):]


def write_bytes(data: bytes, path: str | os.PathLike) -> None:
    target = location(path)
    if is_url(target):
        target.write_bytes(data)
        return
    with local_io.atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    if not is_url(path):
        local_io.write_json(obj, path)
        return
    write_bytes((json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), path)


def read_json(path: str | os.PathLike, missing: str = "no such file") -> Any:
    """Parse a JSON file or object; missing or invalid is an ``InputError`` naming it."""
    return local_io.read_json(location(path) if is_url(path) else path, missing)


def read_json_object(path: str | os.PathLike) -> dict | None:
    """A JSON object that a run keeps for itself beside its outputs (timings, caches), or None when the file is
    missing, unreadable or not an object: such a file may only cost work, never decide an output."""
    from .errors import ClipmillError

    try:
        found = read_json(path)
    except (ClipmillError, OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def write_table(table: pa.Table | pd.DataFrame, path: str | os.PathLike) -> None:
    """A parquet file (a DataFrame without its index), written atomically."""
    target = location(path)
    if not is_url(target):
        if isinstance(table, pd.DataFrame):
            local_io.write_parquet(table, target)
        else:
            with local_io.atomic_path(target) as tmp:
                pq.write_table(table, tmp)
        return
    buffer = io.BytesIO()
    if isinstance(table, pd.DataFrame):
        table.to_parquet(buffer, index=False)
    else:
        pq.write_table(table, buffer)
    target.write_bytes(buffer.getvalue())


def read_table(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    target = location(path)
    if not is_url(target):
        if target.is_dir():  # a partitioned dataset
            return pq.read_table(target, columns=columns)
        with pq.ParquetFile(target) as source:  # one file: without the dataset layer's set-up (half the time)
            missing = [c for c in columns or () if c not in source.schema_arrow.names]
            if missing:  # as pq.read_table says it (ParquetFile.read would leave the column out)
                raise pa.ArrowInvalid(f"No match for FieldRef.Name({missing[0]}) in {target}")
            return source.read(columns=columns)
    return pq.read_table(target.path, columns=columns, filesystem=target.fs)


def unreadable_parquet(path: str | os.PathLike) -> str | None:
    """Why a local parquet file cannot be read (its footer is read: 25 us a file), or None when it reads or is
    absent. Object-storage files are not checked: an object is written whole."""
    if is_url(path) or not os.path.exists(path):
        return None
    try:
        pq.read_metadata(path)
    except (OSError, pa.ArrowException) as e:
        return f"not a readable parquet file: {e}"
    return None


def read_frame(path: str | os.PathLike, columns: list[str] | None = None) -> pd.DataFrame:
    """A parquet file as pandas (as ``pd.read_parquet`` reads it)."""
    return read_table(path, columns).to_pandas()


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pd.DataFrame:
    """A stage's parquet table, checked: missing or unreadable, or without a listed column, is an ``InputError``."""
    if not is_url(path):
        return local_io.read_parquet(path, columns)
    from .errors import InputError

    target = location(path)
    if not target.is_file():
        raise InputError(target, "no such file (run the stage that writes it first)")
    try:
        names = pq.read_schema(target.path, filesystem=target.fs).names
    except (OSError, pa.ArrowException) as e:
        raise InputError(target, f"not a readable parquet file ({e})") from None
    for column in columns or []:
        if column not in names:
            raise InputError(target, "missing column", field=column)
    return read_frame(target, columns)


def open_input(path: str | os.PathLike) -> BinaryIO:
    """A seekable binary file (an object store reads ranges on demand)."""
    target = location(path)
    return target.open("rb") if is_url(target) else open(target, "rb")


def remove(path: str | os.PathLike) -> None:
    """Remove a file or object if it exists."""
    target = location(path)
    try:
        target.unlink()
    except FileNotFoundError:
        pass


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a directory (a prefix, on object storage) and everything below it."""
    target = location(path)
    if is_url(target):
        if target.exists():
            target.fs.rm(target.path, recursive=True)
        return
    import shutil

    shutil.rmtree(target, ignore_errors=True)


def publish_dir(local_dir: str | os.PathLike, url: str | os.PathLike, last: str | None = None) -> None:
    """Copy a finished local directory to object storage under ``url``, replacing what is there; the file
    ``last`` (the one that says the output is complete, e.g. a summary) goes up after every other file, so a
    reader that finds it finds the whole output."""
    target = location(url)
    local_dir = Path(local_dir)
    remove_tree(target)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    for path in sorted(files, key=lambda p: p.relative_to(local_dir).as_posix() == last):
        target.fs.put_file(str(path), f"{target.path}/{path.relative_to(local_dir).as_posix()}")


OBJECT_STORE_SCHEMES = ("s3", "gcs", "abfs", "az")
LOCAL_DIR_PREFIX = "local-dir:"  # a model export's directory, as open_clip names it (local-dir:<path>)


def register_webdataset_schemes() -> None:
    """Let webdataset open shards on object storage (``s3://…/00000.tar``) through fsspec, with the same settings
    as every other read here."""
    from webdataset.gopen import gopen_schemes

    def opener(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
        return open_input(url)

    for scheme in OBJECT_STORE_SCHEMES:
        gopen_schemes.setdefault(scheme, opener)
