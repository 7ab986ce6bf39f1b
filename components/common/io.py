"""Atomic writes: a killed stage never leaves a file that looks complete."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is renamed onto ``path`` (file or directory)."""
    path = Path(path).absolute()  # writers that resolve relative paths elsewhere still land in the temp dir
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_json(path: str | os.PathLike, missing: str = "no such file") -> Any:
    """Parse a JSON file; a missing file (reason ``missing``) or invalid JSON is an ``InputError`` naming it."""
    from .errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(path, missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(path, f"not valid JSON ({e.msg} at line {e.lineno})") from None


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a stage's parquet table; a missing or unreadable file or a missing column is an ``InputError``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file (run the stage that writes it first)")
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(path, f"not a readable parquet file ({e})") from None
    for column in columns or []:
        if column not in schema.names:
            raise InputError(path, "missing column", field=column)
    return pq.read_table(path, columns=columns).to_pandas()
