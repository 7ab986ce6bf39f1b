"""Random access to the samples of webdataset tar shards by key, without unpacking them.

A shard's member ``<key>.<field>`` (``00000012.jpg``) holds one field of one sample; the index records where
each member's bytes lie in the tar, so a sample is read with one seek.
"""
from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO

from .errors import InputError
from .storage import location, open_input


def shard_file_name(shard: str) -> str:
    """The tar file a manifest's ``shard`` value names, relative to the shards directory: '00000' and '00000.tar'
    give '00000.tar', 'crawl/00000.tar' (a URL list's own folder) stays as it is, an absolute path gives its name."""
    path = Path(str(shard))
    name = path.name if path.is_absolute() else path.as_posix()
    return name if name.endswith(".tar") else f"{name}.tar"


def split_member_name(name: str) -> tuple[str, str]:
    """Webdataset's split of a member name: the key runs up to the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field


def index_shard(path) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> field -> (byte offset, size) of every regular member of the tar at ``path``."""
    index: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with open_input(path) as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    key, field = split_member_name(member.name)
                    index.setdefault(key, {})[field] = (member.offset_data, member.size)
    except FileNotFoundError:
        raise InputError(path, "no such shard") from None
    except (tarfile.TarError, OSError) as e:
        raise InputError(path, f"not a readable tar shard ({e})") from None
    return index


class ShardReader:
    """Reads fields of samples from the shards in ``shard_dir``; shards are indexed on first use.

    At most ``max_open`` shard files stay open (the least recently read is closed first).
    """

    def __init__(self, shard_dir: str | os.PathLike, max_open: int = 64):
        self.shard_dir = location(shard_dir)  # a local folder or an object-storage URL
        self.max_open = max_open
        self._index: dict[str, dict[str, dict[str, tuple[int, int]]]] = {}
        self._files: OrderedDict[str, BinaryIO] = OrderedDict()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()

    def _open(self, shard: str, path: Path) -> BinaryIO:
        if shard in self._files:
            self._files.move_to_end(shard)
        else:
            if len(self._files) >= self.max_open:
                self._files.popitem(last=False)[1].close()
            self._files[shard] = open_input(path)
        return self._files[shard]

    def read(self, shard: str, key: str, field: str) -> bytes:
        """The bytes of ``field`` of sample ``key`` in ``shard`` (a file name in ``shard_dir``)."""
        path = self.shard_dir / shard
        if shard not in self._index:
            self._index[shard] = index_shard(path)
        location = self._index[shard].get(key, {}).get(field)
        if location is None:
            raise InputError(path, f"no member {key}.{field} (sample {key!r} is not in this shard)", field=field)
        offset, size = location
        fh = self._open(shard, path)
        fh.seek(offset)
        data = fh.read(size)
        if len(data) != size:
            raise InputError(path, f"member {key}.{field} is truncated ({len(data)} of {size} bytes)")
        return data
