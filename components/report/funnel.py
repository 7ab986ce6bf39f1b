"""The curation funnel across stages: URL list -> download -> rules -> score -> balance -> curated.

Each uid of the URL list leaves the funnel at exactly one stage, with that stage's reason, or reaches the
curated shards. A stage's input is the previous stage's kept set, and input = kept + dropped at every stage.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import pandas as pd

from components.common.errors import InputError
from components.common.io import read_parquet

NOT_IN_TABLE = "not_in_stage_table"
NOT_IN_MANIFEST = "not_in_manifest"
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


def _stage(name: str, reasons: pd.Series) -> tuple[StageCounts, pd.Index, pd.Series]:
    """Counts of one stage from its input's ``reasons`` (uid -> None when kept); the kept uids; the drops."""
    dropped = reasons.dropna().astype(str)
    counts = StageCounts(name, len(reasons), int(reasons.isna().sum()),
                         {str(k): int(v) for k, v in dropped.value_counts().sort_index().items()})
    if counts.kept + sum(counts.dropped.values()) != counts.input:
        raise AssertionError(f"funnel stage {name} does not add up: {counts}")
    return counts, reasons.index[reasons.isna().to_numpy()], dropped


def _reasons(uids: pd.Index, reason_of: dict, absent: str) -> pd.Series:
    return pd.Series([reason_of.get(uid, absent) for uid in uids], index=uids, dtype=object)


def _table_reasons(path: str | os.PathLike) -> dict:
    """uid -> reason (None when kept) of a stage table (uid, keep, reason)."""
    table = read_parquet(path, ["uid", "keep", "reason"])
    if table["uid"].duplicated().any():
        raise InputError(path, f"uid {table['uid'][table['uid'].duplicated()].iloc[0]!r} appears more than once",
                         field="uid")
    keep = table["keep"].astype(bool)
    silent = ~keep & table["reason"].isna()
    if silent.any():
        raise InputError(path, f"uid {table['uid'][silent].iloc[0]!r} is dropped without a reason", field="reason")
    return {uid: (None if k else str(r)) for uid, k, r in zip(table["uid"], keep, table["reason"])}


def curation_funnel(urls: pd.DataFrame, manifest: pd.DataFrame, rules_path, scores_path, balance_path,
                    curated_manifest_path, duplicates: int = 0) -> tuple[list[StageCounts], pd.DataFrame]:
    """The funnel counts per stage, and each URL-list uid's fate: (uid, stage, reason), reason None when curated.

    ``manifest`` is the download manifest (uid, status, error_reason); the stage tables and the curated manifest
    are read from their paths. ``duplicates``: uids a later URL list repeated (listed, not fetched again).
    """
    uids = pd.Index(urls["uid"])
    download = {uid: (None if status == "success" else (str(reason) if isinstance(reason, str) and reason else "download_failed"))
                for uid, status, reason in zip(manifest["uid"], manifest["status"], manifest["error_reason"])}
    steps = [("download", download, NOT_IN_MANIFEST), ("rules", rules_path, NOT_IN_TABLE),
             ("score", scores_path, NOT_IN_TABLE), ("balance", balance_path, NOT_IN_TABLE)]
    first = StageCounts("URL list", len(uids) + duplicates, len(uids), {"duplicate_url": duplicates} if duplicates else {})
    stages, fates, kept = [first], [], uids
    for name, source, absent in steps:
        reason_of = source if isinstance(source, dict) else _table_reasons(source)
        counts, kept, dropped = _stage(name, _reasons(kept, reason_of, absent))
        stages.append(counts)
        fates.append(pd.DataFrame({"uid": dropped.index, "stage": name, "reason": dropped.to_numpy()}))
    curated_uids = pd.Index(read_parquet(curated_manifest_path, ["uid"])["uid"])
    extra = curated_uids.difference(kept)
    if len(extra):
        raise InputError(curated_manifest_path, f"{len(extra)} curated uids were not kept by balancing "
                                                f"(first {extra[0]!r})", field="uid")
    counts, curated, dropped = _stage(CURATED, _reasons(kept, dict.fromkeys(curated_uids), NOT_RESHARDED))
    stages.append(counts)
    fates += [pd.DataFrame({"uid": dropped.index, "stage": CURATED, "reason": dropped.to_numpy()}),
              pd.DataFrame({"uid": curated, "stage": CURATED, "reason": None})]
    fate = pd.concat(fates, ignore_index=True)
    if len(fate) != len(uids) or fate["uid"].duplicated().any():
        raise AssertionError(f"funnel fates do not cover the URL list once: {len(fate)} fates for {len(uids)} uids")
    return stages, fate
