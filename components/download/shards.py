"""Checking img2dataset's shards after a run: each shard complete, readable and consistent with its stats.

img2dataset writes, per shard ``NNNNN``: ``NNNNN.tar`` (the successes), ``NNNNN.parquet`` (one row per URL of
the shard) and, last, ``NNNNN_stats.json``; a shard without its stats file was interrupted.
"""
from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clipmill.components.common.errors import InputError
from clipmill.components.common.io import atomic_path
from clipmill.components.common.shards import index_shard

OOM_SHARD_COUNT = 5  # shard names have five digits: 00000.tar
SAMPLE_FIELDS = ("jpg", "txt", "json")
STATUS_COUNTERS = {"success": "successes", "failed_to_download": "failed_to_download",
                   "failed_to_resize": "failed_to_resize"}


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


def shard_files(shards_dir: Path, shard_id: int) -> list[Path]:
    name = shard_name(shard_id)
    return [shards_dir / f"{name}.tar", shards_dir / f"{name}.parquet", shards_dir / f"{name}_stats.json"]


def finished_shards(shards_dir: Path) -> set[int]:
    """Ids of the shards whose stats file exists (img2dataset's own notion of done)."""
    return {int(p.name.split("_")[0]) for p in shards_dir.glob("*_stats.json")} if shards_dir.is_dir() else set()


def read_shard(shards_dir: Path, shard_id: int) -> pd.DataFrame:
    """The per-URL results of one finished shard, after checking it against its stats file and its tar.

    Raises ``InputError`` naming the shard file and what is wrong: missing stats (interrupted), counts that do
    not add up (count = successes + failed_to_download + failed_to_resize), an unreadable or truncated file,
    or a tar whose samples differ from the successes listed in the parquet.
    """
    return check_shard(shards_dir, shard_id)[0]


def check_shard(shards_dir: Path, shard_id: int) -> tuple[pd.DataFrame, dict[str, dict[str, tuple[int, int]]]]:
    """``read_shard``'s results and checks, with the index of the shard's tar (``index_shard``), which
    ``canonicalize_shard`` reuses instead of reading the tar's headers again."""
    tar, table, stats_file = shard_files(shards_dir, shard_id)
    if not stats_file.exists():
        raise InputError(stats_file, "missing: the shard was not finished")
    try:
        stats = json.loads(stats_file.read_text())
        counters = {k: int(stats[k]) for k in ("count", *STATUS_COUNTERS.values())}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InputError(stats_file, f"not a readable stats file ({e})") from None
    failures = counters["failed_to_download"] + counters["failed_to_resize"]
    if counters["count"] != counters["successes"] + failures:
        raise InputError(stats_file, f"count {counters['count']} != successes {counters['successes']} + "
                                     f"failed_to_download {counters['failed_to_download']} + "
                                     f"failed_to_resize {counters['failed_to_resize']}", field="count")
    try:
        rows = pq.read_table(table).to_pandas()
    except (OSError, pa.ArrowException) as e:
        raise InputError(table, f"not a readable parquet file ({e})") from None
    if len(rows) != counters["count"]:
        raise InputError(table, f"{len(rows)} rows, but the stats file counts {counters['count']} URLs")
    by_status = rows["status"].value_counts()
    for status, counter in STATUS_COUNTERS.items():
        if int(by_status.get(status, 0)) != counters[counter]:
            raise InputError(table, f"{int(by_status.get(status, 0))} rows with status {status}, but the stats "
                                    f"file counts {counters[counter]}", field="status")
    members = index_shard(tar)
    size = tar.stat().st_size
    if any(offset + length > size for fields in members.values() for offset, length in fields.values()):
        raise InputError(tar, "truncated: a member's bytes run past the end of the file")
    success_keys = set(rows.loc[rows["status"] == "success", "key"])
    if set(members) != success_keys:
        extra, missing = sorted(set(members) - success_keys), sorted(success_keys - set(members))
        raise InputError(tar, f"samples differ from the successes in {table.name} "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    incomplete = sorted(k for k, fields in members.items() if not set(SAMPLE_FIELDS) <= set(fields))
    if incomplete:
        raise InputError(tar, f"samples without all of {', '.join(SAMPLE_FIELDS)}: {incomplete[:3]}")
    return rows.assign(shard=f"{shard_name(shard_id)}.tar"), members


# img2dataset's clock readings in a stats file: they describe the run, not the shard (the run's own record keeps
# the download's durations), so a canonical shard has none.
RUN_STATS = ("start_time", "end_time", "duration")


def is_canonical(shards_dir: Path, shard_id: int) -> bool:
    """Whether ``canonicalize_shard`` has rewritten this finished shard (its stats file has no clock readings)."""
    stats = json.loads(shard_files(shards_dir, shard_id)[2].read_text())
    return not any(k in stats for k in RUN_STATS)


def _canonical_json(data: bytes, listed_urls: dict[str, str]) -> bytes:
    meta = json.loads(data)
    meta["url"] = listed_urls.get(meta.get("uid"), meta.get("url"))
    return json.dumps(meta, indent=4, sort_keys=True).encode()


def _rewrite_tar(tar_path: Path, listed_urls: dict[str, str], index: dict[str, dict[str, tuple[int, int]]]) -> None:
    """The tar's samples in key order, the listed URL in each ``.json``, and no times, owners or modes; ``index``
    (the tar's, from ``index_shard``) says where each member's bytes lie."""
    raw = tar_path.read_bytes()
    members = sorted(((f"{key}.{field}" if field else key, raw[offset:offset + size])
                      for key, fields in index.items() for field, (offset, size) in fields.items()),
                     key=lambda item: item[0].split(".", 1))
    del raw
    with atomic_path(tar_path) as tmp:
        tmp.write_bytes(ustar_archive((name, _canonical_json(data, listed_urls) if name.endswith(".json") else data)
                                      for name, data in members))


def _member_header(name: str, size: int) -> bytes:
    """``TarInfo.tobuf``'s USTAR header of a regular file ``name`` of ``size`` bytes, mode 0644, no time or owner:
    its template with the name, size and checksum filled in (a header built by tarfile costs ten times as much); a
    name or size the template's fields cannot hold as tarfile would (a name over 100 bytes goes to the prefix field)
    takes tarfile's own header."""
    encoded = name.encode(tarfile.ENCODING, "surrogateescape")
    if len(encoded) > tarfile.LENGTH_NAME or size >= 8 ** 11:
        return _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
    header = bytearray(_HEADER_TEMPLATE)
    header[:len(encoded)] = encoded
    header[124:136] = b"%011o\0" % size
    checksum = sum(header)  # the checksum field counts as eight spaces, as the template holds it
    header[148:156] = b"%06o\0 " % checksum
    return bytes(header)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info


def _empty_header() -> bytes:
    """tarfile's header of an empty name and size 0, with the checksum field as the eight spaces it counts as."""
    header = _tarinfo("", 0).tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
    return header[:148] + b" " * 8 + header[156:]


_HEADER_TEMPLATE = _empty_header()


def ustar_archive(members: Iterable[tuple[str, bytes]]) -> bytes:
    """The bytes ``tarfile`` writes for these (name, data) members in USTAR format, each a regular file with mode
    0644 and no time or owner, in one pass without its per-member copies and file objects (a shard holds thousands
    of small members: most of the time of canonicalizing it went there)."""
    chunks, offset = [], 0
    for name, data in members:
        header = _member_header(name, len(data))
        padding = -len(data) % tarfile.BLOCKSIZE
        chunks += (header, data, tarfile.NUL * padding)
        offset += len(header) + len(data) + padding
    end = tarfile.NUL * (2 * tarfile.BLOCKSIZE)  # then zeros up to a whole record, as TarFile.close writes them
    offset += len(end)
    chunks += (end, tarfile.NUL * (-offset % tarfile.RECORDSIZE))
    return b"".join(chunks)


def canonicalize_shard(shards_dir: Path, shard_id: int, listed_urls: dict[str, str],
                       index: dict[str, dict[str, tuple[int, int]]] | None = None) -> pd.DataFrame:
    """Rewrite a checked shard so that its bytes depend on its inputs alone, not on the run that fetched it;
    returns its per-URL results as ``read_shard`` reads them back (the shard is not read again).

    img2dataset writes samples in the order its threads finish, records the URL it fetched (a mirror's address
    has a port of the run) and the tar members' times, and puts clock readings in the stats file. The canonical
    shard has its rows and samples in key order, the URL as listed (``listed_urls``: uid -> URL), members without
    times, and a stats file without clock readings. The stats file is written last: it marks the shard finished.
    ``index``: the tar's index from ``check_shard``, when the shard was just checked.
    """
    tar, table, stats_file = shard_files(shards_dir, shard_id)
    _rewrite_tar(tar, listed_urls, index if index is not None else index_shard(tar))
    rows = pq.read_table(table)
    urls = [listed_urls.get(uid, url) for uid, url in zip(rows["uid"].to_pylist(), rows["url"].to_pylist())]
    at = rows.schema.get_field_index("url")
    rows = rows.set_column(at, rows.schema.field(at), pa.array(urls, rows.schema.field(at).type)).sort_by("key")
    with atomic_path(table) as tmp:
        pq.write_table(rows, tmp)
    stats = {k: v for k, v in json.loads(stats_file.read_text()).items() if k not in RUN_STATS}
    with atomic_path(stats_file) as tmp:
        tmp.write_text(json.dumps(stats, indent=4, sort_keys=True) + "\n")
    return rows.to_pandas().assign(shard=f"{shard_name(shard_id)}.tar")
