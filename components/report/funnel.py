"""The curation funnel: URL list -> download -> every listed curation step, in order -> curated.

Each uid of the URL list leaves the funnel at exactly one stage, with that stage's reason, or reaches the
curated shards. A stage's input is the previous stage's kept set, and input = kept + dropped at every stage.
The steps' decisions are read per download shard from the curation directory; a step's table must hold
exactly the uids that reached it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from clipmill.components.common.curation import output_path, read_step, unit_path, units_of
from clipmill.components.common.errors import InputError
from clipmill.components.common.io import read_parquet
from clipmill.components.common.steps import DECISION_COLUMNS

URL_LIST = "URL list"
DOWNLOAD = "download"
DOWNLOAD_FAILED = "download_failed"
DUPLICATE_URL = "duplicate_url"
NOT_RESHARDED = "not_in_curated_shards"
CURATED = "curated"


@dataclass
class StageCounts:
    stage: str
    input: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"stage": self.stage, "input": self.input, "kept": self.kept, "dropped": self.dropped}


def _stage(name: str, reasons: pd.Series) -> tuple[StageCounts, pd.DataFrame]:
    """Counts of one stage from its input's ``reasons`` (uid index -> None when kept); the drops as fates."""
    dropped = reasons.dropna().astype(str)
    counts = StageCounts(name, len(reasons), int(reasons.isna().sum()),
                         {str(k): int(v) for k, v in dropped.value_counts().sort_index().items()})
    if counts.kept + sum(counts.dropped.values()) != counts.input:
        raise AssertionError(f"funnel stage {name} does not add up: {counts}")
    return counts, pd.DataFrame({"uid": dropped.index, "stage": name, "reason": dropped.to_numpy()})


def download_reasons(manifest: pd.DataFrame) -> pd.Series:
    """uid -> None for a successful download, else its error reason (``download_failed`` when none is given)."""
    reasons = [None if status == "success" else (str(reason) if isinstance(reason, str) and reason else
                                                 DOWNLOAD_FAILED)
               for status, reason in zip(manifest["status"], manifest["error_reason"])]
    return pd.Series(reasons, index=pd.Index(manifest["uid"]), dtype=object)


def unit_uids(curate_dir: Path, downloaded: pd.Index) -> dict[str, pd.Index]:
    """unit -> its uids; together they must be exactly the successful downloads of the manifest."""
    units = {unit: pd.Index(read_parquet(unit_path(curate_dir, unit), ["uid"])["uid"]) for unit in units_of(curate_dir)}
    seen = pd.Index(np.concatenate([u.to_numpy() for u in units.values()]) if units else [])
    for unit, uids in units.items():
        extra = uids.difference(downloaded)
        if len(extra):
            raise InputError(unit_path(curate_dir, unit), f"{len(extra)} uids are not successful downloads of "
                                                          f"the manifest (first {extra[0]!r})", field="uid")
    missing = downloaded.difference(seen)
    if len(missing):
        raise InputError(curate_dir / "units", f"{len(missing)} successful downloads are in no curation unit "
                                               f"(first {missing[0]!r}; rerun the curate stage)", field="uid")
    return units


def step_reasons(curate_dir: Path, step: str, unit: str, reached: pd.Index) -> pd.Series:
    """uid -> reason (None when kept) of ``step`` on ``unit``; its table must hold exactly the ``reached`` uids."""
    path = output_path(curate_dir, step, unit)
    try:
        [(_, table)] = read_step(curate_dir, step, DECISION_COLUMNS, units=[unit])
    except pa.ArrowException as e:
        raise InputError(path, f"not a curation step table ({e})") from None
    if table["uid"].duplicated().any():
        raise InputError(path, f"uid {table['uid'][table['uid'].duplicated()].iloc[0]!r} appears more than once",
                         field="uid")
    missing, extra = reached.difference(table["uid"]), pd.Index(table["uid"]).difference(reached)
    if len(missing) or len(extra):
        what = (f"{len(missing)} uids that reached step {step!r} have no row (first {missing[0]!r})" if len(missing)
                else f"{len(extra)} uids did not reach step {step!r} (first {extra[0]!r})")
        raise InputError(path, what, field="uid")
    keep = table["keep"].astype(bool).to_numpy()
    silent = ~keep & table["reason"].isna().to_numpy()
    if silent.any():
        raise InputError(path, f"uid {table['uid'][silent].iloc[0]!r} is dropped without a reason", field="reason")
    return pd.Series([None if k else str(r) for k, r in zip(keep, table["reason"])], index=pd.Index(table["uid"]),
                     dtype=object)


def curated_reasons(curated_manifest_path: str | os.PathLike, kept: pd.Index) -> pd.Series:
    """uid -> None when in the curated shards, else ``not_in_curated_shards``; every curated uid was kept."""
    curated = pd.Index(read_parquet(curated_manifest_path, ["uid"])["uid"])
    extra = curated.difference(kept)
    if len(extra):
        raise InputError(curated_manifest_path, f"{len(extra)} curated uids were not kept by every curation "
                                                f"step (first {extra[0]!r})", field="uid")
    return pd.Series(np.where(kept.isin(curated), None, NOT_RESHARDED), index=kept, dtype=object)


def curation_funnel(manifest: pd.DataFrame, curate_dir: str | os.PathLike, steps: list[str],
                    curated_manifest_path: str | os.PathLike,
                    duplicates: int = 0) -> tuple[list[StageCounts], pd.DataFrame]:
    """The funnel counts per stage, and each URL-list uid's fate: (uid, stage, reason), reason None when curated.

    ``manifest`` is the download manifest (uid, status, error_reason); ``steps`` the listed curation steps, read
    from ``curate_dir``; ``duplicates``: uids a later URL list repeated (listed, not fetched again).
    """
    curate_dir = Path(curate_dir)
    stages = [StageCounts(URL_LIST, len(manifest) + duplicates, len(manifest),
                          {DUPLICATE_URL: duplicates} if duplicates else {})]
    counts, dropped = _stage(DOWNLOAD, download_reasons(manifest))
    stages.append(counts)
    fates = [dropped]
    reached = unit_uids(curate_dir, pd.Index(manifest["uid"][manifest["status"] == "success"]))
    for step in steps:
        reasons = {unit: step_reasons(curate_dir, step, unit, uids) for unit, uids in reached.items()}
        counts, dropped = _stage(step, pd.concat(reasons.values()) if reasons else pd.Series(dtype=object))
        stages.append(counts)
        fates.append(dropped)
        reached = {unit: r.index[r.isna().to_numpy()] for unit, r in reasons.items()}
    kept = pd.Index(sorted(uid for uids in reached.values() for uid in uids))
    curated = curated_reasons(curated_manifest_path, kept)
    counts, dropped = _stage(CURATED, curated)
    stages.append(counts)
    fates += [dropped, pd.DataFrame({"uid": curated.index[curated.isna().to_numpy()], "stage": CURATED,
                                     "reason": None})]
    fate = pd.concat(fates, ignore_index=True)
    if len(fate) != len(manifest) or fate["uid"].duplicated().any():
        raise AssertionError(f"funnel fates do not cover the URL list once: {len(fate)} fates for {len(manifest)} uids")
    return stages, fate
