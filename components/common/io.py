"""Atomic writes: a killed stage never leaves a file that looks complete, and a write never replaces a
directory that is not the writing stage's own output.

A directory output carries a marker file, ``.clipmill-output``, that names the stage (its ``owner``); it is part of
the output, with deterministic content. Replacing a non-empty directory needs that marker with the same owner;
anything else (a checkout, an inbox of URL lists, another stage's output) is refused with an ``InputError`` and
nothing is deleted. Temporary outputs live beside the target in ``.<name>.tmp/<pid>.<random>/``; a write that
starts removes the ones that processes no longer running left behind (a killed stage).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

OUTPUT_MARKER = ".clipmill-output"


def output_owner(path: str | os.PathLike) -> str | None:
    """The stage named by the marker of the directory ``path``, or None when it has none."""
    marker = Path(path) / OUTPUT_MARKER
    try:
        return marker.read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def check_replaceable(path: str | os.PathLike, owner: str | None) -> None:
    """Raise an ``InputError`` unless ``path`` may be replaced by ``owner``'s output: it is absent, a link, an
    empty directory, a directory whose marker names ``owner``, or a file (only when no ``owner`` is given: a
    stage's directory output never takes the place of a file)."""
    from .errors import InputError

    path = Path(path)
    if owner is not None and path.is_file() and not path.is_symlink():
        raise InputError(path, f"refusing to replace this file with the output directory of {owner!r}; nothing "
                               "was deleted (choose another output path)")
    if path.is_symlink() or not path.is_dir() or not any(path.iterdir()):
        return
    found = output_owner(path)
    if owner is not None and found == owner:
        return
    if found is None:
        why = f"it holds files but no {OUTPUT_MARKER} marker, so it is not a clipmill stage output"
    elif owner is None:
        why = f"it is the output directory of {found!r}, and a file is to be written in its place"
    else:
        why = f"it is the output directory of {found!r}, not of {owner!r}"
    raise InputError(path, f"refusing to replace this directory: {why}; nothing was deleted "
                           "(choose another output path, or remove it by hand)")


def check_stage_dir(path: str | os.PathLike, what: str, entries: Iterable[str]) -> None:
    """A stage that writes its files into ``path`` one by one (and reuses them on a rerun) writes only there: it
    must be absent, empty or hold nothing but ``entries`` (its own files, hidden ones aside). A file, or a directory
    holding anything else (another stage's output, one's own files), is an ``InputError`` naming ``what`` the
    directory should be, raised before anything is written."""
    from .errors import InputError

    path = path if hasattr(path, "iterdir") else Path(path)  # a Path, or an object-storage UPath
    if not path.exists():
        return
    if not path.is_dir():
        raise InputError(path, f"is a file, not {what} (choose another output path)")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in set(entries) and not p.name.startswith("."))
    if foreign:
        raise InputError(path, f"holds files that are not part of {what} ({', '.join(foreign[:5])}): another stage's "
                               "output or files of one's own; nothing was written (choose another output path)")


def mark_output(directory: str | os.PathLike, owner: str) -> None:
    """Write the marker that makes ``directory`` the output of ``owner``."""
    (Path(directory) / OUTPUT_MARKER).write_text(f"{owner}\n")


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _temp_root(path: Path) -> Path:
    """Where writes to ``path`` keep their temporary outputs."""
    return path.parent / f".{path.name}.tmp"


def _claim_root(path: Path) -> bool:
    """Create the temporary root of ``path``; False when it exists (another writer, or a dead one's leftovers)."""
    try:
        _temp_root(path).mkdir()
    except FileExistsError:
        return False
    return True


def _remove_dead(root: Path) -> None:
    """What writers that no longer run left in the temporary root ``root``."""
    for entry in root.iterdir() if root.is_dir() else ():
        pid = entry.name.split(".")[0]
        if pid != str(os.getpid()) and not _alive(pid):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def remove_dead_writes(folder: str | os.PathLike) -> None:
    """The temporary roots in ``folder`` of atomic writes whose writers were killed (a root emptied then is
    removed too), for a stage that resumes in ``folder`` while nothing else writes there."""
    for root in Path(folder).glob(".*.tmp"):  # none in a folder that does not exist
        _remove_dead(root)
        try:
            root.rmdir()
        except OSError:
            pass  # a live writer's, or not a directory


def _temp_dir(path: Path) -> Path:
    """A fresh temporary directory for a write to ``path``; leftovers of dead writers to ``path`` go first."""
    root = _temp_root(path)
    _remove_dead(root)
    while True:
        root.mkdir(parents=True, exist_ok=True)
        try:
            return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}.", dir=root))
        except FileNotFoundError:  # another writer to the same path removed the empty root in between
            continue


@contextmanager
def atomic_path(path: str | os.PathLike, owner: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is renamed onto ``path`` (file or directory).

    A directory output gets the marker naming ``owner`` (the stage). An existing non-empty directory at ``path``
    is replaced only when its marker names ``owner``; otherwise an ``InputError`` is raised before anything is
    written or deleted."""
    path = Path(path).absolute()  # writers that resolve relative paths elsewhere still land in the temp dir
    check_replaceable(path, owner)
    path.parent.mkdir(parents=True, exist_ok=True)
    own_root = owner is None and len(path.name.encode()) <= 240 and _claim_root(path)  # <pid>.<name> fits NAME_MAX
    # A file written with no other writer and no leftovers under way writes straight into the root it created
    # (as <pid>.<name>, which a later writer's clean-up reads as this process's); otherwise into a directory of its
    # own in the root. (Two directory operations fewer a file: a third of a small shard's write.)
    tmp = _temp_root(path) if own_root else _temp_dir(path)
    target = tmp / f"{os.getpid()}.{path.name}" if own_root else tmp / path.name
    try:
        yield target
        if target.is_dir() and not target.is_symlink() and owner is not None:
            mark_output(target, owner)
        check_replaceable(path, owner)  # the path may have changed while the output was written
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        if own_root:  # only what this write made: another writer may have joined the root meanwhile
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            _temp_root(path).rmdir()
        except OSError:
            pass  # another write to the same path is under way


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """``df`` without its index, atomically: the bytes of ``df.to_parquet(path, index=False)``, written by pyarrow
    itself (pandas' file handling took a millisecond a file, as long as a small shard's write)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_text(path: str | os.PathLike) -> str:
    """A text file read as UTF-8; other bytes are an ``InputError`` naming the file and where (an editor that saved
    a params file or a word list in Latin-1)."""
    from .errors import InputError

    path = path if hasattr(path, "read_text") else Path(path)  # a Path, or an object-storage UPath
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping. PyYAML keeps the last silently: a second
    ``train:`` section pasted at the end of params.yaml would replace the whole first one (DVC's own reader refuses
    the file, without saying where)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key}' given twice in one mapping (first on line {first[key] + 1})",
                        key_node.start_mark)
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``text`` parsed as YAML (safe types only), a key given twice being a ``yaml.YAMLError``."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: safe types only


def read_json(path: str | os.PathLike, missing: str = "no such file") -> Any:
    """Parse a JSON file; a missing file (reason ``missing``) or invalid JSON is an ``InputError`` naming it."""
    from .errors import InputError

    path = path if hasattr(path, "read_text") else Path(path)  # a Path, or an object-storage UPath
    if not path.is_file():
        raise InputError(path, missing)
    try:
        return json.loads(read_text(path))
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
