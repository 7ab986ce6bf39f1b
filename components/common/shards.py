"""Random access to the samples of webdataset tar shards by key, without unpacking them.

A shard's member ``<key>.<field>`` (``00000012.jpg``) holds one field of one sample; the index records where
each member's bytes lie in the tar, so a sample is read with one seek.
"""
from __future__ import annotations

import mmap
import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO

from .errors import InputError
from .storage import is_url, location, open_input


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


def _number(field: bytes) -> int:
    """tarfile's reading of an octal header field (text up to the first NUL); ValueError for anything else."""
    if field[:1] in (b"\x80", b"\xff"):  # base-256: left to tarfile
        raise ValueError("base-256 number")
    return int(field.split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")


_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
_PAX_TIMES = frozenset({b"mtime", b"atime", b"ctime"})


def _times_only(records: bytes) -> bool:
    """Whether a PAX extended header holds nothing but times (webdataset's writer, and so img2dataset's shards,
    give every member one with its fractional mtime), which change no name, size or offset."""
    position = 0
    while position < len(records):
        match = _PAX_RECORD.match(records, position)
        if match is None or int(match.group(1)) < 1 or match.group(2) not in _PAX_TIMES:
            return False
        position += int(match.group(1))
    return position == len(records) and bool(records)


def plain_index(data: bytes | mmap.mmap) -> dict[str, dict[str, tuple[int, int]]] | None:
    """``index_shard``'s answer read straight from the headers of a tar whose members are all plain regular files
    (what img2dataset and reshard write), the way ``tarfile`` reads them, at a quarter of its cost; None for anything
    else (other member types, extended headers other than a member's times, long-name headers, a header that does
    not check out, an archive cut short or without its end), which ``tarfile`` then reads and judges."""
    index: dict[str, dict[str, tuple[int, int]]] = {}
    position, block = 0, tarfile.BLOCKSIZE
    while position + block <= len(data):
        header = data[position:position + block]
        if header.count(0) == block:  # the end-of-archive block (at the start: an empty archive, tarfile's call)
            return index if position else None
        kind = header[156:157]
        try:  # the fields tarfile needs here; a header whose checksum holds is taken as written for the rest
            checksum, size = _number(header[148:156]), _number(header[124:136])
            name = _text(header[:100])
            prefix = _text(header[345:500]) if header[345] else ""
        except (ValueError, UnicodeDecodeError):
            return None
        checked = (checksum == sum(header) - sum(header[148:156]) + 256  # as tarfile: unsigned, or signed
                   or checksum == tarfile.calc_chksums(header)[1])
        if checked and kind == tarfile.XHDTYPE and _times_only(data[position + block:position + block + size]):
            position += block + -(-size // block) * block  # a member's own PAX header holding only its times
            continue
        if kind not in (tarfile.REGTYPE, tarfile.AREGTYPE) or name.endswith("/") or not checked:
            return None
        key, field = split_member_name(f"{prefix}/{name}" if prefix else name)
        index.setdefault(key, {})[field] = (position + block, size)
        position += block + -(-size // block) * block
    return None


def index_shard(path) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> field -> (byte offset, size) of every regular member of the tar at ``path`` (a local tar of plain
    files is read by ``plain_index``)."""
    target = location(path)
    if not is_url(target):
        try:  # mapped, not read: only the pages of the headers are touched
            with open(target, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                index = plain_index(data)
        except FileNotFoundError:
            raise InputError(path, "no such shard") from None
        except (OSError, ValueError):  # an empty file cannot be mapped: tarfile says what is wrong
            index = None
        if index is not None:
            return index
    index = {}
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
