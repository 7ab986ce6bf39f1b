"""Filter precision and recall against the defects planted in a crawl whose ground truth is known (the demo).

For each listed step that targets a planted defect: of the samples that reached the step, ``planted`` carry the
defect and ``dropped`` left at the step; precision = dropped planted / dropped, recall = dropped planted /
planted. Duplicates are counted the way the steps keep them: in each group of copies of one image that reached
the step, every copy but the smallest uid is planted (the exact copies for ``dedup``, exact and near copies for
``neardup``). Samples outside the ground truth (URL lists appended later) are not measured.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from clipmill.components.common.curation import read_step_table
from clipmill.components.common.errors import InputError
from clipmill.components.common.io import read_parquet

GROUND_TRUTH_COLUMNS = ["uid", "mismatched", "exact_duplicate", "near_duplicate", "duplicate_of", "caption_noise"]
# step -> (what it targets, the planted kind)
TARGETS: dict[str, tuple[str, str]] = {
    "langid": ("captions with a foreign-language fragment", "foreign"),
    "dedup": ("exact-duplicate images", "exact"),
    "neardup": ("near-duplicate images", "near"),
    "score": ("mismatched captions", "mismatched"),
}


def read_ground_truth(path: str | os.PathLike) -> pd.DataFrame:
    """The crawl's ground truth (uid index): mismatched, foreign, and the duplicate groups."""
    table = read_parquet(path, GROUND_TRUTH_COLUMNS)
    if table["uid"].duplicated().any():
        raise InputError(path, f"uid {table['uid'][table['uid'].duplicated()].iloc[0]!r} appears more than once",
                         field="uid")
    source = table["duplicate_of"].where(table["duplicate_of"].notna(), table["uid"])
    return pd.DataFrame({
        "mismatched": table["mismatched"].astype(bool).to_numpy(),
        "foreign": [noise is not None and "foreign" in list(noise) for noise in table["caption_noise"]],
        "exact": np.where(table["exact_duplicate"].astype(bool), source, table["uid"]),
        "near": np.where(table["exact_duplicate"].astype(bool) | table["near_duplicate"].astype(bool), source,
                         table["uid"]),
    }, index=pd.Index(table["uid"], name="uid"))


def planted_mask(reached: pd.DataFrame, truth: pd.DataFrame, kind: str) -> np.ndarray:
    """Which reached samples carry the defect ``kind`` (duplicates: every copy in a group but the smallest uid)."""
    column = truth.loc[reached["uid"], kind].to_numpy()
    if kind in ("exact", "near"):
        groups = pd.Series(column, index=reached["uid"].to_numpy()).sort_index()
        return groups.duplicated().reindex(reached["uid"].to_numpy()).to_numpy(bool)
    return column.astype(bool)


def defect_scores(curate_dir: str | os.PathLike, steps: list[str], ground_truth: str | os.PathLike) -> list[dict]:
    """One row per listed step with a planted target: counts, precision and recall (None when undefined)."""
    truth = read_ground_truth(ground_truth)
    rows = []
    for step in steps:
        if step not in TARGETS:
            continue
        label, kind = TARGETS[step]
        table = read_step_table(Path(curate_dir), step, ["uid", "keep"])
        reached = table[table["uid"].isin(truth.index)].reset_index(drop=True)
        planted = planted_mask(reached, truth, kind)
        dropped = ~reached["keep"].astype(bool).to_numpy()
        hits = int((planted & dropped).sum())
        rows.append({"step": step, "defect": label, "reached": int(len(reached)), "planted": int(planted.sum()),
                     "dropped": int(dropped.sum()), "dropped_planted": hits,
                     "precision": hits / int(dropped.sum()) if dropped.any() else None,
                     "recall": hits / int(planted.sum()) if planted.any() else None,
                     "not_in_ground_truth": int(len(table) - len(reached))})
    return rows
