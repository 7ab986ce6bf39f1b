"""Reshard: copy the samples kept by every listed curation step into shuffled training shards, once.

In: the curation directory (``units/<unit>.parquet``: uid, shard, key of each download; ``steps/<step>/
<unit>.parquet``: each step's decisions and columns), the download shards and the listed steps.

Out (under ``out_dir``, written in a temporary directory and renamed at the end):
``shards/{00000..}.tar`` (``__key__`` = uid, ``jpg``, ``txt`` = original caption, ``json`` = {uid,
source_shard, source_key, every listed step's ``columns``; ``rewrites`` always}), ``manifest.parquet`` (uid,
shard, key), ``content_hash.txt`` (sha256 over the shards' names and bytes) and ``summary.json``.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import webdataset as wds
from tqdm import tqdm

from clipmill.components.common.curation import output_path, read_step, step_classes, unit_path, units_of
from clipmill.components.common.errors import InputError
from clipmill.components.common.hashing import content_hash, file_sha256
from clipmill.components.common.io import atomic_path
from clipmill.components.common.log import get_logger, progress_disabled
from clipmill.components.common.params import TrackingParams
from clipmill.components.common.shards import ShardReader, shard_file_name
from clipmill.components.common.steps import Step
from clipmill.components.common.storage import is_url, location, publish_dir, read_parquet
from clipmill.components.common.tracking import stage_run

from .params import ReshardParams

log = get_logger("reshard")

SOURCE_COLUMNS = ["uid", "shard", "key"]
# Present in every sample's json even when no listed step adds them (training reads json.rewrites).
SAMPLE_DEFAULTS: dict[str, Any] = {"rewrites": []}


def _step_table(curate_dir: Path, step: type[Step], unit: str, reached: pd.Index) -> pd.DataFrame:
    """``step``'s decisions for ``unit``, indexed by uid; its rows must be exactly the uids that ``reached`` it."""
    path = output_path(curate_dir, step.name, unit)
    columns = ["uid", "keep", *step.columns]
    try:
        [(_, table)] = read_step(curate_dir, step.name, columns, units=[unit])
    except pa.ArrowException as e:
        raise InputError(path, f"not a table of step {step.name!r} ({e})") from None
    if table["uid"].duplicated().any():
        raise InputError(path, f"uid {table['uid'][table['uid'].duplicated()].iloc[0]!r} appears more than once",
                         field="uid")
    absent, extra = reached.difference(table["uid"]), pd.Index(table["uid"]).difference(reached)
    if len(absent):
        raise InputError(path, f"{len(absent)} uids that reached step {step.name!r} have no row "
                               f"(first {absent[0]!r})", field="uid")
    if len(extra):
        raise InputError(path, f"{len(extra)} uids did not reach step {step.name!r} (not in the shard's "
                               f"downloads or dropped by an earlier step; first {extra[0]!r})", field="uid")
    return table.set_index("uid")


def unit_samples(curate_dir: Path, unit: str, steps: list[type[Step]]) -> pd.DataFrame:
    """The curated samples of one download shard: uid (index), shard, key and every step's columns."""
    samples = read_parquet(unit_path(curate_dir, unit), SOURCE_COLUMNS).set_index("uid")
    for step in steps:
        table = _step_table(curate_dir, step, unit, samples.index)
        kept = table.index[table["keep"].astype(bool).to_numpy()]
        samples = samples.loc[kept].join(table.loc[kept, list(step.columns)])
        for column in step.columns:
            if samples[column].isna().any():
                raise InputError(output_path(curate_dir, step.name, unit), f"null for kept uid "
                                 f"{samples.index[samples[column].isna()][0]!r}", field=column)
    return samples


def curated_samples(curate_dir: str | os.PathLike, steps: list[str]) -> pd.DataFrame:
    """Every shard's curated samples (``unit_samples``), sorted by uid."""
    curate_dir = location(curate_dir)
    units = units_of(curate_dir)
    if not units:
        raise InputError(curate_dir / "units", "no curated download shards (run the curate stage first)")
    classes = step_classes(steps)
    frames = [unit_samples(curate_dir, unit, classes) for unit in units]
    samples = pd.concat(frames)
    if samples.index.duplicated().any():
        raise InputError(curate_dir / "units", f"uid {samples.index[samples.index.duplicated()][0]!r} is in more "
                                               "than one download shard", field="uid")
    return samples.sort_index()


def shuffled_order(uids: pd.Index, seed: int) -> list[str]:
    """The curated uids in a seeded random order (the same for the same uids and seed)."""
    return [uids[i] for i in np.random.default_rng(seed).permutation(len(uids))]


def _json_value(value: Any) -> Any:
    """A step column's value as JSON: sequences as lists of str, numpy scalars as Python numbers."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    return value if isinstance(value, str) else str(value)


def sample_meta(uid: str, row: pd.Series, columns: list[str], shard: str) -> dict:
    """The curated sample's json: uid, source shard and key, the steps' columns (defaults where absent)."""
    meta = {**SAMPLE_DEFAULTS, "uid": uid, "source_shard": shard, "source_key": row["key"]}
    meta.update({c: _json_value(row[c]) for c in columns})
    return meta


def read_sample(reader: ShardReader, shard_dir: Path, uid: str, shard: str, key: str) -> dict:
    """The source sample's jpg and txt; its json must name ``uid``."""
    source_meta = json.loads(reader.read(shard, key, "json"))
    if source_meta.get("uid") != uid:
        raise InputError(shard_dir / shard, f"sample {key!r} has uid {source_meta.get('uid')!r}, the curation "
                                            f"units say {uid!r}", field="uid")
    return {"jpg": reader.read(shard, key, "jpg"), "txt": reader.read(shard, key, "txt")}


def write_shards(samples: pd.DataFrame, order: list[str], columns: list[str], shard_dir: Path, out: Path,
                 size: int) -> tuple[pd.DataFrame, int]:
    """The samples in ``order`` as tar shards of ``size`` under ``out``; returns (manifest, bytes written)."""
    rows, total_bytes = [], 0
    with ShardReader(shard_dir) as reader, \
            tqdm(total=len(order), desc="reshard", unit="sample", disable=progress_disabled()) as bar:
        for start in range(0, len(order), size):
            name = f"{start // size:05d}.tar"
            # Fixed mtime and owner: the same samples give byte-identical shards.
            with wds.TarWriter(str(out / name), user="clipmill", group="clipmill", mtime=0, encoder=False) as writer:
                for uid in order[start:start + size]:
                    row = samples.loc[uid]
                    shard = shard_file_name(row["shard"])
                    meta = sample_meta(uid, row, columns, shard)
                    sample = {"__key__": uid, **read_sample(reader, shard_dir, uid, shard, row["key"]),
                              "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()}
                    total_bytes += writer.write(sample)
                    rows.append((uid, name, uid))
                    bar.update(1)
    return pd.DataFrame(rows, columns=["uid", "shard", "key"]), total_bytes


def input_files(curate_dir: Path, steps: list[str]) -> list[Path]:
    """The files reshard reads from the curation directory: every unit and every listed step's decisions."""
    units = units_of(curate_dir)
    return [unit_path(curate_dir, u) for u in units] + [output_path(curate_dir, s, u) for s in steps for u in units]


def reshard(curate_dir: str | os.PathLike, shard_dir: str | os.PathLike, out_dir: str | os.PathLike,
            params: ReshardParams, seed: int, tracking: TrackingParams, steps: list[str]) -> dict:
    """The curation directory, the download shards and the listed steps in; the curated shards out (module doc).

    The curated samples are the uids kept by every listed step. Returns the summary: samples, shards, samples
    per shard, seed, steps, bytes, per-shard sha256 and the content hash.
    """
    curate_dir, shard_dir = location(curate_dir), location(shard_dir)
    if is_url(out_dir):  # object storage: built in a local staging folder, then published (summary.json last)
        with tempfile.TemporaryDirectory(prefix="clipmill-reshard-") as staging:
            summary = reshard(curate_dir, shard_dir, Path(staging) / "out", params, seed, tracking, steps)
            publish_dir(Path(staging) / "out", out_dir, last="summary.json")
        return summary
    out_dir = Path(out_dir)
    samples = curated_samples(curate_dir, steps)
    columns = [c for step in step_classes(steps) for c in step.columns]
    order = shuffled_order(samples.index, seed)
    size = params.samples_per_shard
    with stage_run("reshard", tracking, params, input_files(curate_dir, steps)) as run:
        started = time.perf_counter()
        with atomic_path(out_dir, owner="reshard") as tmp:
            (tmp / "shards").mkdir(parents=True)
            manifest, total_bytes = write_shards(samples, order, columns, shard_dir, tmp / "shards", size)
            manifest.to_parquet(tmp / "manifest.parquet", index=False)
            shard_files = sorted((tmp / "shards").glob("*.tar"))
            summary = {
                "samples": len(order), "shards": len(shard_files), "samples_per_shard": size, "seed": seed,
                "steps": list(steps), "bytes": total_bytes,
                "shard_sha256": {f.name: file_sha256(f) for f in shard_files},
                "content_hash": content_hash([tmp / "shards"]),
            }
            (tmp / "content_hash.txt").write_text(summary["content_hash"] + "\n")
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        elapsed = time.perf_counter() - started
        if run is not None:
            mlflow.log_metrics({"samples": summary["samples"], "shards": summary["shards"], "bytes": total_bytes,
                                "samples_in": summary["samples"], "samples_out": summary["samples"]})
            mlflow.set_tag("clipmill.curated_hash", summary["content_hash"])
            mlflow.log_dict(summary, "summary.json")
    log.info("reshard: %d samples in %d shards (%.1f MB) in %.1f s (%.0f samples/s); content hash %s",
             summary["samples"], summary["shards"], total_bytes / 1e6, elapsed, len(order) / max(elapsed, 1e-9),
             summary["content_hash"][:12])
    return summary
