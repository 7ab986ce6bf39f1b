"""The rule filter: one row per crawled uid with ``keep`` and the first rule it failed.

Failed downloads are carried as dropped (``download:<error_reason>``) so the curation funnel starts from the
URL list; the per-sample rules run as a batch function on the chosen engine; exact-duplicate images are then
resolved over the whole table (the smallest uid of each sha256 is kept).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from components.common.engine import map_batches
from components.common.errors import InputError
from components.common.funnel import funnel_metrics, funnel_summary
from components.common.io import read_parquet, write_json, write_parquet
from components.common.log import get_logger
from components.common.params import RayParams, TrackingParams
from components.common.tracking import stage_run

from .params import FilterParams

MANIFEST_COLUMNS = ["uid", "status", "error_reason", "caption", "original_width", "original_height", "sha256"]
DUPLICATE_REASON = "duplicate_image"

log = get_logger("filter")


def rule_reasons(batch: pd.DataFrame, params: FilterParams) -> pd.DataFrame:
    """Manifest rows in, ``uid`` + ``reason`` out: the first failed check, or None when every rule passes.

    Order of checks: download status, caption words, caption characters, boilerplate, image side, aspect ratio.
    """
    caption = batch["caption"].fillna("").astype(str)
    width = batch["original_width"].astype("float64").to_numpy()
    height = batch["original_height"].astype("float64").to_numpy()
    checks: list[tuple[np.ndarray, object]] = [
        ((batch["status"] != "success").to_numpy(),
         ("download:" + batch["error_reason"].fillna("unknown").astype(str)).to_numpy()),
    ]
    if params.min_words is not None:
        checks.append(((caption.str.split().str.len() < params.min_words).to_numpy(), "min_words"))
    if params.min_chars is not None:
        checks.append(((caption.str.strip().str.len() < params.min_chars).to_numpy(), "min_chars"))
    if params.boilerplate_patterns:
        patterns = [re.compile(p) for p in params.boilerplate_patterns]
        boilerplate = np.array([any(p.search(text) for p in patterns) for text in caption], dtype=bool)
        checks.append((boilerplate, "boilerplate"))
    if params.min_image_side is not None:
        checks.append((np.minimum(width, height) < params.min_image_side, "min_image_side"))
    if params.max_aspect_ratio is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.maximum(width, height) / np.minimum(width, height)
        checks.append((ratio > params.max_aspect_ratio, "max_aspect_ratio"))
    reason = np.full(len(batch), None, dtype=object)
    for failed, value in checks:
        first = failed & pd.isna(reason)
        reason[first] = value[first] if isinstance(value, np.ndarray) else value
    return pd.DataFrame({"uid": batch["uid"].to_numpy(), "reason": reason.astype(object)})
    return pd.DataFrame({"uid": batch["uid"].to_numpy(), "reason": reason})


def _check_manifest(manifest: pd.DataFrame, path: Path, params: FilterParams) -> None:
    if manifest["uid"].isna().any():
        raise InputError(path, f"{int(manifest['uid'].isna().sum())} rows have no uid", field="uid")
    duplicated = manifest["uid"].duplicated()
    if duplicated.any():
        raise InputError(path, f"uid {manifest['uid'][duplicated].iloc[0]!r} appears more than once", field="uid")
    ok = manifest["status"] == "success"
    needed = ["original_width", "original_height"] + (["sha256"] if params.dedup_images else [])
    for column in needed:
        missing = ok & manifest[column].isna()
        if missing.any():
            raise InputError(path, f"missing for {int(missing.sum())} successful downloads "
                                   f"(first uid {manifest['uid'][missing].iloc[0]})", field=column)


def drop_duplicate_images(table: pd.DataFrame) -> pd.DataFrame:
    """Mark every sample that passed the rules but repeats an earlier image (same sha256, smaller uid) as a duplicate."""
    candidates = table[table["reason"].isna()]
    first_uid = candidates.groupby("sha256")["uid"].transform("min")
    duplicates = candidates.index[candidates["uid"] != first_uid]
    table.loc[duplicates, "reason"] = DUPLICATE_REASON
    return table


def filter_manifest(manifest_path: str | os.PathLike, out_dir: str | os.PathLike, params: FilterParams,
                    ray_params: RayParams, tracking: TrackingParams) -> dict:
    """Download manifest in; ``out_dir/rules.parquet`` (uid, keep, reason) and ``out_dir/rules_summary.json`` out.

    Returns the summary: input count, kept count and dropped counts per reason.
    """
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    manifest = read_parquet(manifest_path, MANIFEST_COLUMNS)
    _check_manifest(manifest, manifest_path, params)
    with stage_run("filter", tracking, params, [manifest_path]) as run:
        reasons = map_batches(manifest[MANIFEST_COLUMNS[:-1]], rule_reasons, engine=params.engine,
                              ray_params=ray_params, batch_size=params.batch_size, fn_kwargs={"params": params},
                              desc="rules")
        table = pd.DataFrame({"uid": manifest["uid"].to_numpy(), "reason": reasons["reason"].to_numpy(),
                              "sha256": manifest["sha256"].to_numpy()})
        if params.dedup_images:
            table = drop_duplicate_images(table)
        rules = pd.DataFrame({"uid": table["uid"], "keep": table["reason"].isna(), "reason": table["reason"]})
        summary = funnel_summary(rules["reason"])
        write_parquet(rules, out_dir / "rules.parquet")
        write_json(summary, out_dir / "rules_summary.json")
        if run is not None:
            mlflow.log_metrics(funnel_metrics(summary))
            mlflow.log_artifact(str(out_dir / "rules_summary.json"))
    log.info("rules: kept %d of %d (%s)", summary["kept"], summary["input"],
             ", ".join(f"{k}={v}" for k, v in summary["dropped"].items()) or "nothing dropped")
    return summary
