"""Reshard: copy the samples kept by every curation stage into shuffled training shards, once.

Out (under ``out_dir``, written in a temporary directory and renamed at the end):
``shards/{00000..}.tar`` (``__key__`` = uid, ``jpg``, ``txt`` = original caption, ``json`` = {uid, rewrites,
clip_score, matched_entries, source_shard, source_key}), ``manifest.parquet`` (uid, shard, key),
``content_hash.txt`` (sha256 over the shards' names and bytes) and ``summary.json``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import webdataset as wds
from tqdm import tqdm

from components.common.errors import InputError
from components.common.funnel import kept_uids
from components.common.hashing import content_hash, file_sha256
from components.common.io import atomic_path, read_parquet
from components.common.log import get_logger, progress_disabled
from components.common.params import TrackingParams
from components.common.shards import ShardReader, shard_file_name
from components.common.tracking import stage_run

from .params import ReshardParams

log = get_logger("reshard")


def curated_uids(funnel_paths: list[Path]) -> pd.Index:
    """The uids every funnel table (uid, keep, reason) kept, sorted; a uid absent from a table was not kept by it."""
    kept = kept_uids(funnel_paths[0])
    for path in funnel_paths[1:]:
        kept = kept.intersection(kept_uids(path))
    return kept.sort_values()


def _lookup(path: Path, columns: list[str], uids: pd.Index, what: str) -> pd.DataFrame:
    table = read_parquet(path, ["uid"] + columns)
    if table["uid"].duplicated().any():
        raise InputError(path, f"uid {table['uid'][table['uid'].duplicated()].iloc[0]!r} appears more than once",
                         field="uid")
    table = table.set_index("uid")
    missing = uids.difference(table.index)
    if len(missing):
        raise InputError(path, f"{len(missing)} uids kept by every curation stage have no {what} "
                               f"(first {missing[0]!r})", field="uid")
    table = table.loc[uids]
    for column in columns:
        if table[column].isna().any():
            raise InputError(path, f"null for kept uid {table.index[table[column].isna()][0]!r}", field=column)
    return table


def shuffled_order(uids: pd.Index, seed: int) -> list[str]:
    """The curated uids in a seeded random order (the same for the same uids and seed)."""
    return [uids[i] for i in np.random.default_rng(seed).permutation(len(uids))]


def reshard(manifest_path: str | os.PathLike, shard_dir: str | os.PathLike, rules_path: str | os.PathLike,
            scores_path: str | os.PathLike, balance_path: str | os.PathLike, rewrites_path: str | os.PathLike,
            out_dir: str | os.PathLike, params: ReshardParams, seed: int, tracking: TrackingParams) -> dict:
    """Download manifest and shards, the curation tables and the rewrites in; the curated shards out (see module doc).

    Returns the summary: samples, shards, samples per shard, bytes, per-shard sha256 and the content hash.
    """
    paths = [Path(p) for p in (manifest_path, rules_path, scores_path, balance_path, rewrites_path)]
    manifest_path, rules_path, scores_path, balance_path, rewrites_path = paths
    uids = curated_uids([rules_path, scores_path, balance_path])
    source = _lookup(manifest_path, ["shard", "key"], uids, "download key")
    clip_score = _lookup(scores_path, ["clip_score"], uids, "score")["clip_score"]
    matched = _lookup(balance_path, ["matched_entries"], uids, "matched entries")["matched_entries"]
    rewrites = _lookup(rewrites_path, ["rewrites"], uids, "rewrites row")["rewrites"]
    order = shuffled_order(uids, seed)
    size = params.samples_per_shard
    out_dir = Path(out_dir)
    with stage_run("reshard", tracking, params, paths) as run:
        started = time.perf_counter()
        with atomic_path(out_dir) as tmp, ShardReader(shard_dir) as reader:
            (tmp / "shards").mkdir(parents=True)
            rows, total_bytes = [], 0
            with tqdm(total=len(order), desc="reshard", unit="sample", disable=progress_disabled()) as bar:
                for start in range(0, len(order), size):
                    name = f"{start // size:05d}.tar"
                    # Fixed mtime and owner: the same samples give byte-identical shards.
                    with wds.TarWriter(str(tmp / "shards" / name), user="clipmill", group="clipmill", mtime=0,
                                       encoder=False) as writer:
                        for uid in order[start:start + size]:
                            shard, key = shard_file_name(source.at[uid, "shard"]), source.at[uid, "key"]
                            source_meta = json.loads(reader.read(shard, key, "json"))
                            if source_meta.get("uid") != uid:
                                raise InputError(Path(shard_dir) / shard, f"sample {key!r} has uid "
                                                 f"{source_meta.get('uid')!r}, the manifest says {uid!r}", field="uid")
                            meta = {"uid": uid, "rewrites": [str(r) for r in rewrites[uid]],
                                    "clip_score": float(clip_score[uid]),
                                    "matched_entries": [str(e) for e in matched[uid]],
                                    "source_shard": shard, "source_key": key}
                            sample = {"__key__": uid, "jpg": reader.read(shard, key, "jpg"),
                                      "txt": reader.read(shard, key, "txt"),
                                      "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()}
                            total_bytes += writer.write(sample)
                            rows.append((uid, name, uid))
                            bar.update(1)
            manifest = pd.DataFrame(rows, columns=["uid", "shard", "key"])
            manifest.to_parquet(tmp / "manifest.parquet", index=False)
            shard_files = sorted((tmp / "shards").glob("*.tar"))
            summary = {
                "samples": len(order), "shards": len(shard_files), "samples_per_shard": size, "seed": seed,
                "bytes": total_bytes, "shard_sha256": {f.name: file_sha256(f) for f in shard_files},
                "content_hash": content_hash([tmp / "shards"]),
            }
            (tmp / "content_hash.txt").write_text(summary["content_hash"] + "\n")
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        elapsed = time.perf_counter() - started
        if run is not None:
            mlflow.log_metrics({"samples": summary["samples"], "shards": summary["shards"], "bytes": total_bytes,
                                "samples_in": summary["samples"], "samples_out": summary["samples"]})
            mlflow.set_tag("clipmill.curated_hash", summary["content_hash"])
            mlflow.log_artifact(str(out_dir / "summary.json"))
    log.info("reshard: %d samples in %d shards (%.1f MB) in %.1f s (%.0f samples/s); content hash %s",
             summary["samples"], summary["shards"], total_bytes / 1e6, elapsed, len(order) / max(elapsed, 1e-9),
             summary["content_hash"][:12])
    return summary
