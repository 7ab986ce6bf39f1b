"""The curation funnel: every stage table has one row per input uid with ``keep`` and ``reason``."""
from __future__ import annotations

import os

import pandas as pd

from .errors import InputError
from .io import read_parquet

FUNNEL_COLUMNS = ["uid", "keep", "reason"]


def funnel_summary(reasons: pd.Series) -> dict:
    """A stage's reasons (None = kept) in; input, kept and dropped-per-reason counts out (they add up)."""
    dropped = reasons.dropna().value_counts().sort_index()
    summary = {"input": int(len(reasons)), "kept": int(reasons.isna().sum()),
               "dropped": {str(k): int(v) for k, v in dropped.items()}}
    if summary["kept"] + sum(summary["dropped"].values()) != summary["input"]:
        raise AssertionError(f"funnel counts do not add up: {summary}")
    return summary


def funnel_metrics(summary: dict) -> dict[str, float]:
    """MLflow metric names for a funnel summary (``dropped.<reason>`` with ':' turned into '.').

    ``samples_in`` / ``samples_out`` are the names every stage uses for the pipeline's run summary."""
    return {"input": summary["input"], "kept": summary["kept"],
            "samples_in": summary["input"], "samples_out": summary["kept"],
            **{f"dropped.{k.replace(':', '.')}": v for k, v in summary["dropped"].items()}}


def kept_uids(path: str | os.PathLike) -> pd.Index:
    """The uids an earlier stage kept, read from its funnel table (uid, keep, reason)."""
    table = read_parquet(path, FUNNEL_COLUMNS)
    if table["uid"].duplicated().any():
        raise InputError(path, f"uid {table['uid'][table['uid'].duplicated()].iloc[0]!r} appears more than once",
                         field="uid")
    return pd.Index(table.loc[table["keep"].astype(bool), "uid"])
