"""The rewrite stage: captions kept by balancing in, ``rewrites.parquet`` (uid, rewrites, backend, model) out."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from components.common.engine import map_batches
from components.common.errors import ClipmillError, InputError
from components.common.funnel import kept_uids
from components.common.io import atomic_path, read_parquet, write_json
from components.common.log import get_logger
from components.common.params import RayParams, TrackingParams
from components.common.tracking import stage_run

from .backends import make_backend, model_name
from .guard import guard_rewrites
from .params import RewriteParams

REWRITES_SCHEMA = pa.schema([("uid", pa.string()), ("rewrites", pa.list_(pa.string())),
                             ("backend", pa.string()), ("model", pa.string())])

log = get_logger("rewrite")


class CaptionRewriter:
    """Batch function: (uid, caption, matched_entries) in; (uid, rewrites, dropped) out.

    ``rewrites`` are the candidates that passed the faithfulness guard, ``dropped`` one reason per dropped slot.
    The backend (and its model or HTTP client) is built once per worker.
    """

    def __init__(self, params: RewriteParams, seed: int):
        self.params = params
        self.backend = make_backend(params, seed)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        uids = batch["uid"].tolist()
        captions = batch["caption"].tolist()
        entries = [list(e) for e in batch["matched_entries"]]
        generated = self.backend.generate(uids, captions, entries)
        guarded = [guard_rewrites(c, e, g, self.params.rewrites_per_caption)
                   for c, e, g in zip(captions, entries, generated)]
        return pd.DataFrame({"uid": uids, "rewrites": [k for k, _ in guarded], "dropped": [d for _, d in guarded]})


def load_kept_captions(balance_path: str | os.PathLike, manifest_path: str | os.PathLike) -> pd.DataFrame:
    """(uid, caption, matched_entries) of every uid balancing kept, in uid order."""
    kept = kept_uids(balance_path)
    entries = read_parquet(balance_path, ["uid", "matched_entries"]).set_index("uid")["matched_entries"]
    manifest = read_parquet(manifest_path, ["uid", "caption"]).drop_duplicates("uid").set_index("uid")["caption"]
    missing = kept.difference(manifest.index)
    if len(missing):
        raise InputError(manifest_path, f"{len(missing)} uids kept by balancing have no row "
                                        f"(first {missing[0]!r})", field="uid")
    uids = kept.sort_values()
    matched = entries.loc[uids]
    if matched.isna().any():
        raise InputError(balance_path, f"null for kept uid {matched.index[matched.isna()][0]!r}", field="matched_entries")
    return pd.DataFrame({"uid": uids, "caption": manifest.loc[uids].fillna("").astype(str).to_numpy(),
                         "matched_entries": [list(e) for e in matched]})


def summarize(table: pd.DataFrame, params: RewriteParams, model: str) -> dict:
    """Slot counts of a rewrite run: every caption has ``rewrites_per_caption`` slots, each kept or dropped."""
    k = params.rewrites_per_caption
    dropped = Counter(reason for reasons in table["dropped"] for reason in reasons)
    failed = Counter(reasons[0] for reasons in table["dropped"]
                     if len(reasons) == k and reasons[0].startswith("backend:"))
    summary = {
        "backend": params.backend, "model": model, "captions": int(len(table)), "rewrites_per_caption": k,
        "slots": int(len(table) * k), "kept": int(table["rewrites"].map(len).sum()),
        "dropped": dict(sorted(dropped.items())),
        "captions_with_rewrites": int((table["rewrites"].map(len) > 0).sum()),
        "failed_captions": dict(sorted(failed.items())),
    }
    if summary["kept"] + sum(dropped.values()) != summary["slots"]:
        raise AssertionError(f"rewrite counts do not add up: {summary}")
    return summary


def write_rewrites(table: pd.DataFrame, backend: str, model: str, path: str | os.PathLike) -> None:
    out = pa.table({"uid": table["uid"].tolist(), "rewrites": table["rewrites"].map(list).tolist(),
                    "backend": [backend] * len(table), "model": [model] * len(table)}, schema=REWRITES_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(out, tmp)


def rewrite_captions(balance_path: str | os.PathLike, manifest_path: str | os.PathLike, out_path: str | os.PathLike,
                     summary_path: str | os.PathLike, params: RewriteParams, seed: int, ray_params: RayParams,
                     tracking: TrackingParams) -> dict:
    """Balance table and download manifest in; ``rewrites.parquet`` and a summary JSON of slot counts out.

    Returns the summary. Raises ``ClipmillError`` when more than ``openai.max_failed_fraction`` of the captions
    got no answer from the backend (nothing is written then; the answer cache keeps what did come back).
    """
    captions = load_kept_captions(balance_path, manifest_path)
    with stage_run("rewrite", tracking, params, [Path(balance_path), Path(manifest_path)]) as run:
        rewritten = map_batches(captions, CaptionRewriter, engine=params.engine, ray_params=ray_params,
                                batch_size=params.batch_size, fn_constructor_kwargs={"params": params, "seed": seed},
                                desc="rewrite")
        model = model_name(params)
        summary = summarize(rewritten, params, model)
        failed = sum(summary["failed_captions"].values())
        if captions.shape[0] and failed / captions.shape[0] > params.openai.max_failed_fraction:
            raise ClipmillError(f"rewrite: {failed} of {len(captions)} captions got no answer from the backend "
                                f"({summary['failed_captions']}), more than max_failed_fraction="
                                f"{params.openai.max_failed_fraction}; rerun to retry them (answers are cached)")
        write_rewrites(rewritten, params.backend, model, out_path)
        write_json(summary, summary_path)
        if run is not None:
            mlflow.log_metrics({"captions": summary["captions"], "kept": summary["kept"],
                                "samples_in": summary["captions"], "samples_out": summary["captions"],
                                **{f"dropped.{k.replace(':', '.')}": v for k, v in summary["dropped"].items()}})
            mlflow.log_artifact(str(summary_path))
            examples = [{"caption": c, "rewrites": list(r)} for c, r in
                        zip(captions["caption"].head(20), rewritten["rewrites"].head(20))]
            mlflow.log_dict({"examples": examples}, "rewrite_examples.json")
    log.info("rewrite (%s): %d captions, kept %d of %d rewrites (%s)", params.backend, summary["captions"],
             summary["kept"], summary["slots"],
             ", ".join(f"{k}={v}" for k, v in summary["dropped"].items()) or "nothing dropped")
    return summary
