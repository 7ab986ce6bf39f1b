"""The curation, declared, and where its work lies.

The ordered list of steps (``STEPS``; see ``clipmill.components.common.steps`` for the contract) is read by the curate
stage, reshard, the funnel, the curation report and the boundary validation. Adding a step is one module with a
``Step`` class, one entry in ``STEPS`` and its params section.

Where curation keeps its work: one file per download shard per step, each with a completion marker.

Under the curation directory (``data/curate``):
- ``units/<unit>.parquet``: the successful downloads of download shard ``<unit>`` (uid, shard, key, caption,
  sizes, sha256); ``units/<unit>.done`` holds the content fingerprint of those rows.
- ``steps/<step>/<unit>.parquet``: the step's decision (uid, keep, reason) and the columns it adds, one row per
  sample that reached the step; ``steps/<step>/<unit>.done``: its fingerprint and counts.
- Pool steps also keep ``steps/<step>/map/<unit>.parquet`` (the per-sample work), ``steps/<step>/partial/
  <unit>.parquet`` (a small statistic) and ``steps/<step>/state.json`` (+ ``state/<key>.parquet``).
- ``steps/<step>/summary.json`` and ``summary.json``: the funnel counts.
- Beside them, not outputs (``dvc.yaml`` tracks neither): ``timings.json``, the last run's seconds, and
  ``combined/<step>.parquet``, the shards a pool step's last combine saw with their map fingerprints, and in its
  metadata the params it ran with and the state it made (a rerun whose params and map outputs of a pool step are
  those, and whose stored state is the one recorded, does not combine it again; a run that only adds shards may
  add them to that state: ``PoolStep.combine_more``).

A file counts only when its ``.done`` marker exists and holds the expected fingerprint, and (a local file) its
parquet footer reads; data files are written atomically before their marker, so a killed run leaves nothing that
looks complete, and a file damaged afterwards is done again.

The curation directory and the download shards may be local paths or object-storage URLs (``s3://…``; see
``clipmill.components.common.storage``): the same layout, read and written the same way.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError
from .hashing import hash_obj
from .shards import shard_file_name
from .steps import Step
from .storage import (
    location,
    open_input,
    read_frame,
    read_json,
    read_json_object,
    read_table,
    relative,
    remove,
    unreadable_parquet,
    write_json,
    write_table,
)

# name -> the step class, as module:Class (imported only when curation runs).
STEPS: dict[str, str] = {
    "rules": "clipmill.components.filter.step:RulesStep",
    "spam": "clipmill.components.filter.spam:SpamStep",
    "langid": "clipmill.components.filter.langid:LangIdStep",
    "dedup": "clipmill.components.filter.step:DedupStep",
    "neardup": "clipmill.components.filter.neardup:NearDupStep",
    "score": "clipmill.components.score.step:ScoreStep",
    "balance": "clipmill.components.balance.step:BalanceStep",
    "rewrite": "clipmill.components.rewrite.step:RewriteStep",
}
STEP_NAMES = tuple(STEPS)
_PARENT_PART = re.compile(r"(?:^|[/\\])\.\.(?:$|[/\\])")  # a shard path with a '..' part names a file outside


@cache
def step_class(name: str) -> type[Step]:
    module, _, cls = STEPS[name].partition(":")
    step = getattr(importlib.import_module(module), cls)
    if step.name != name:
        raise TypeError(f"{STEPS[name]} declares name {step.name!r}, listed as {name!r}")
    return step


def step_classes(names: list[str] | tuple[str, ...] = STEP_NAMES) -> list[type[Step]]:
    return [step_class(n) for n in names]


def step_params(step: type[Step], params) -> object:
    """The params section of ``step`` in the loaded params.yaml."""
    return getattr(params, step.section)


UNITS_DIR = "units"
STEPS_DIR = "steps"
# Manifest columns a unit carries: what the steps may read (a step's ``needs``).
UNIT_COLUMNS = ["uid", "shard", "key", "caption", "original_width", "original_height", "sha256"]


def unit_name(shard: str) -> str:
    """A download shard's unit: its file relative to the shards directory without '.tar' ('crawl/00012')."""
    name = shard_file_name(shard)
    return name[:-4]


def _units_in(folder: Path, suffix: str) -> set[str]:
    """Units with a file of ``suffix`` under ``folder`` (units may sit in sub-folders, one per URL list)."""
    if not folder.is_dir():
        return set()
    return {relative(p, folder)[:-len(suffix)] for p in folder.rglob(f"*{suffix}")}


def _root(curate_dir: str | os.PathLike) -> Path:
    """The curation directory as a path object (a ``Path`` or a ``UPath`` is used as it is)."""
    return curate_dir if isinstance(curate_dir, Path) or hasattr(curate_dir, "protocol") else location(curate_dir)


def unit_path(curate_dir: str | os.PathLike, unit: str) -> Path:
    return _root(curate_dir) / UNITS_DIR / f"{unit}.parquet"


def step_dir(curate_dir: str | os.PathLike, step: str) -> Path:
    return _root(curate_dir) / STEPS_DIR / step


def output_path(curate_dir: Path, step: str, unit: str, phase: str = "apply") -> Path:
    """Where ``step`` keeps ``unit``'s output of ``phase`` (apply/decide: the decision; map; partial)."""
    base = step_dir(curate_dir, step)
    return base / f"{unit}.parquet" if phase in ("apply", "decide") else base / phase / f"{unit}.parquet"


def marker_path(data_path: Path) -> Path:
    return data_path.with_suffix(".done")


def read_marker(data_path: Path) -> dict | None:
    """The marker of a finished data file, or None: no marker, a damaged one, or a data file that is missing or
    was damaged after its marker was written (then the work is done again)."""
    marker = marker_path(data_path)
    if not marker.is_file() or not data_path.is_file() or damaged(data_path):
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None


def damaged(data_path: Path) -> bool:
    """Whether a local parquet file was damaged (``unreadable_parquet``)."""
    return unreadable_parquet(data_path) is not None


def write_output(table: pd.DataFrame | pa.Table, data_path: Path, marker: dict) -> None:
    """The data file, then its marker (both atomic): the marker exists only beside a complete file."""
    remove(marker_path(data_path))
    write_table(table, data_path)
    write_json(marker, marker_path(data_path))


def _plain(value: Any) -> Any:
    """A cell that JSON does not know, as plain data: arrays as lists, NumPy scalars as numbers, missing as null."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is pd.NA or value is pd.NaT:
        return None
    return str(value)


def rows_fingerprint(table: pd.DataFrame) -> str:
    """Content fingerprint of a table's rows: the sha256 of its column names and its columns' values as JSON (list
    cells by their items; 1 and 1.0, True and 1 differ). Not pandas' row hashes: their fixed cost was 0.5-2 ms a
    table, most of a small shard's bookkeeping (two fingerprints a decision, one a unit)."""
    payload = json.dumps([list(map(str, table.columns)), [table[c].tolist() for c in table.columns]],
                         default=_plain, allow_nan=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


def _write_unit(manifest_path: Path, curate_dir: Path, unit: str, parts: list[pd.DataFrame], more: bool) -> None:
    """One unit's rows, unless the unit holds them already (``more``: rows of the unit written earlier in this
    split come first: a shard whose rows were not contiguous in the manifest)."""
    path = unit_path(curate_dir, unit)
    rows = pd.concat(([read_frame(path)] if more else []) + parts, ignore_index=True)
    duplicated = rows["uid"][rows["uid"].duplicated()]
    if len(duplicated):
        raise InputError(manifest_path, f"uid {duplicated.iloc[0]!r} appears more than once", field="uid")
    fingerprint = rows_fingerprint(rows)
    marker = read_marker(path)
    if marker is None or marker.get("fingerprint") != fingerprint:
        write_output(rows, path, {"fingerprint": fingerprint, "rows": int(len(rows))})


def split_manifest(manifest_path: Path, curate_dir: Path) -> list[str]:
    """Write the successful downloads of each download shard to ``units/<unit>.parquet``; returns the units.

    The manifest is read one row group at a time and a unit is written as soon as its shard's rows end (the download
    writes each shard's rows together), so the split holds one shard at a time. A unit whose rows are unchanged
    keeps its file and marker, so the steps downstream of it find their work done. (The download stage and its
    validation guarantee unique uids across the manifest; a repeat within a shard is refused here.)
    """
    manifest = location(manifest_path)
    try:
        source = pq.ParquetFile(open_input(manifest), pre_buffer=False)
    except FileNotFoundError:
        raise InputError(manifest_path, "no such file (run the download stage first)") from None
    except (OSError, pa.ArrowException) as e:
        raise InputError(manifest_path, f"not a readable parquet file ({e})") from None
    needed = UNIT_COLUMNS + ["status"]
    for column in needed:
        if column not in source.schema_arrow.names:
            raise InputError(manifest_path, "missing column", field=column)
    written: set[str] = set()
    current: str | None = None
    buffered: list[pd.DataFrame] = []
    for group in range(source.num_row_groups):  # one row group at a time (the download writes small ones)
        frame = source.read_row_group(group, columns=needed, use_threads=False).to_pandas()
        frame = frame[frame["status"] == "success"].drop(columns="status")
        missing = frame["shard"].isna() | frame["key"].isna()
        if missing.any():
            raise InputError(manifest_path, f"a successful download has no shard or key "
                                            f"(uid {frame['uid'][missing].iloc[0]!r})", field="shard")
        # a manifest names each shard on a thousand rows: its distinct names are checked, not every row
        bad = [name for name in pd.unique(frame["shard"].to_numpy()) if _PARENT_PART.search(str(name))]
        if bad:
            outside = frame["shard"].isin(bad)
            raise InputError(manifest_path, f"shard {frame['shard'][outside].iloc[0]!r} names a file outside the "
                                            f"shards directory (uid {frame['uid'][outside].iloc[0]!r})", field="shard")
        for shard, rows in frame.groupby("shard", sort=False):
            unit = unit_name(shard)
            if unit != current and current is not None:  # a shard's rows are contiguous: it is complete
                _write_unit(manifest_path, curate_dir, current, buffered, current in written)
                written.add(current)
                buffered = []
            current = unit
            buffered.append(rows)
    if current is not None:
        _write_unit(manifest_path, curate_dir, current, buffered, current in written)
        written.add(current)
    units = sorted(written)
    stale = _units_in(curate_dir / UNITS_DIR, ".parquet") - set(units)
    for unit in stale:  # shards that no longer exist in the download
        remove(unit_path(curate_dir, unit))
        remove(marker_path(unit_path(curate_dir, unit)))
    return units


def units_of(curate_dir: str | os.PathLike) -> list[str]:
    """The units of a finished split (each with its marker), sorted."""
    return sorted(_units_in(_root(curate_dir) / UNITS_DIR, ".done"))


def unit_fingerprint(curate_dir: Path, unit: str) -> str:
    marker = read_marker(unit_path(curate_dir, unit))
    if marker is None:
        raise InputError(unit_path(curate_dir, unit), "no finished unit (run the curate stage first)")
    return marker["fingerprint"]


def save_state(curate_dir: Path, step: str, state: dict) -> str:
    """Store a pool step's combined state (frames as parquet, the rest as JSON, last); returns its hash. The old
    ``state.json`` goes first: a state cut off while its frames are written has none."""
    base = step_dir(curate_dir, step)
    remove(base / "state.json")
    plain, frames = {}, {}
    for key, value in state.items():
        (frames if isinstance(value, pd.DataFrame) else plain)[key] = value
    digest = hash_obj({"plain": plain, "frames": {k: rows_fingerprint(v) for k, v in frames.items()}})
    for key, frame in frames.items():
        write_table(frame, base / "state" / f"{key}.parquet")
    write_json({"hash": digest, "state": plain, "frames": sorted(frames)}, base / "state.json")
    return digest


def stored_state_hash(curate_dir: Path, step: str) -> str | None:
    """The hash of a pool step's stored state, or None when there is none (or it cannot be read)."""
    base = step_dir(curate_dir, step)
    stored = read_json_object(base / "state.json")
    if stored is None or any(damaged(base / "state" / f"{key}.parquet") for key in stored.get("frames", [])):
        return None
    return stored.get("hash")


def load_state(curate_dir: Path, step: str) -> tuple[dict, str]:
    base = step_dir(curate_dir, step)
    stored = read_json(base / "state.json", missing="no combined state (run the curate stage first)")
    state: dict[str, Any] = dict(stored["state"])
    for key in stored["frames"]:
        state[key] = read_frame(base / "state" / f"{key}.parquet")
    return state, stored["hash"]


def read_step(curate_dir: str | os.PathLike, step: str, columns: list[str] | None = None,
              units: list[str] | None = None) -> Iterator[tuple[str, pd.DataFrame]]:
    """(unit, decision table) of every finished unit of ``step``, in unit order; ``columns`` to read only some."""
    curate_dir = _root(curate_dir)
    for unit in units if units is not None else units_of(curate_dir):
        path = output_path(curate_dir, step, unit)
        if read_marker(path) is None:
            raise InputError(path, f"missing: step {step!r} has not finished shard {unit} (run the curate stage)")
        yield unit, read_table(path, columns).to_pandas()


def read_step_table(curate_dir: str | os.PathLike, step: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Every unit's decision table of ``step`` concatenated (for reports and checks of small crawls)."""
    frames = [table for _, table in read_step(curate_dir, step, columns)]
    if not frames:
        return pd.DataFrame(columns=columns or ["uid", "keep", "reason"])
    return pd.concat(frames, ignore_index=True)
