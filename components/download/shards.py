"""Checking img2dataset's shards after a run: each shard complete, readable and consistent with its stats.

img2dataset writes, per shard ``NNNNN``: ``NNNNN.tar`` (the successes), ``NNNNN.parquet`` (one row per URL of
the shard) and, last, ``NNNNN_stats.json``; a shard without its stats file was interrupted.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from components.common.errors import InputError
from components.common.shards import index_shard

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
    return rows.assign(shard=f"{shard_name(shard_id)}.tar")
