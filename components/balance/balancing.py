"""MetaCLIP balancing of the score survivors: match captions to metadata entries, subsample head entries.

An entry e matched by count_e texts gets p_e = t / max(count_e, t); a text matching entries E is kept with
probability 1 - prod_{e in E}(1 - p_e); texts that match no entry are dropped. The draw for a text is a
uniform number derived from (seed, uid), so the outcome does not depend on batching, order or engine.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from components.common.engine import map_batches
from components.common.errors import InputError
from components.common.funnel import funnel_metrics, funnel_summary, kept_uids
from components.common.io import read_parquet, write_json, write_parquet
from components.common.log import get_logger
from components.common.params import RayParams, TrackingParams
from components.common.tracking import stage_run

from .matching import EntryMatcher, read_metadata
from .params import BalanceParams

NO_MATCH_REASON = "no_metadata_match"
SUBSAMPLED_REASON = "balance_subsampled"

log = get_logger("balance")


def uid_uniform(uids: pd.Series, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per uid, fixed by (seed, uid)."""
    return np.array([int.from_bytes(hashlib.blake2b(f"balance:{seed}:{uid}".encode(), digest_size=8).digest(), "big")
                     for uid in uids], dtype=np.float64) / 2.0**64


def keep_probabilities(matched_entries: pd.Series, t: int) -> tuple[np.ndarray, pd.Series]:
    """Per text, 1 - prod(1 - p_e) over its matched entries (0 for none); and count_e per matched entry."""
    exploded = matched_entries.explode().dropna()
    counts = exploded.value_counts()
    p_entry = t / np.maximum(counts.astype(np.float64), t)
    with np.errstate(divide="ignore"):
        log_miss = pd.Series(np.log1p(-exploded.map(p_entry).to_numpy(np.float64)), index=exploded.index)
    miss = np.exp(log_miss.groupby(level=0).sum())
    probability = np.zeros(len(matched_entries))
    probability[miss.index.to_numpy()] = 1.0 - miss.to_numpy()
    return probability, counts


def tail_share(counts: pd.Series, is_tail: pd.Series) -> float:
    """Fraction of the (text, entry) matches that fall in tail entries."""
    total = counts.sum()
    return float(counts[is_tail].sum() / total) if total else 0.0


def entry_counts_figure(entry_counts: pd.DataFrame, t: int):
    """Rank-frequency plot of the matched entries before and after balancing, with t marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for column, label in (("count_before", "before"), ("count_after", "after")):
        values = np.sort(entry_counts[column].to_numpy())[::-1]
        ax.plot(np.arange(1, len(values) + 1), np.maximum(values, 0.5), label=label)
    ax.axhline(t, color="gray", linestyle="--", label=f"t = {t}")
    ax.set(xscale="log", yscale="log", xlabel="entry rank", ylabel="texts matching the entry",
           title="MetaCLIP balancing: texts per metadata entry")
    ax.legend()
    fig.tight_layout()
    return fig


def balance(manifest_path: str | os.PathLike, scores_path: str | os.PathLike, out_dir: str | os.PathLike,
            params: BalanceParams, seed: int, ray_params: RayParams, tracking: TrackingParams) -> dict:
    """Manifest captions of the uids kept in ``scores_path`` in; under ``out_dir``: ``balance.parquet`` (uid,
    matched_entries, keep, reason, keep_probability), ``entry_counts.parquet`` (entry, count_before,
    count_after), and ``balance_summary.json`` (funnel counts, tail share); the MLflow run also gets a rank-frequency plot.

    Returns the summary.
    """
    out_dir = Path(out_dir)
    survivors = kept_uids(scores_path)
    manifest = read_parquet(manifest_path, ["uid", "caption"]).set_index("uid")
    missing = survivors.difference(manifest.index)
    if len(missing):
        raise InputError(manifest_path, f"{len(missing)} uids kept in {scores_path} are not in the manifest "
                                        f"(first {missing[0]})", field="uid")
    texts = manifest.loc[survivors, ["caption"]].reset_index()
    entries = read_metadata(params.metadata)
    log.info("balance: %d texts against %d metadata entries (%s), t = %d",
             len(texts), len(entries), params.metadata, params.t)
    with stage_run("balance", tracking, params, [manifest_path, scores_path, params.metadata]) as run:
        matched = map_batches(texts, EntryMatcher, engine=params.engine, ray_params=ray_params,
                              batch_size=params.batch_size, fn_constructor_kwargs={"entries": entries},
                              desc="match")
        matched_entries = matched["matched_entries"].map(list)
        probability, counts_before = keep_probabilities(matched_entries, params.t)
        has_match = matched_entries.map(len).to_numpy() > 0
        keep = has_match & (uid_uniform(texts["uid"], seed) < probability)
        reason = np.where(keep, None, np.where(has_match, SUBSAMPLED_REASON, NO_MATCH_REASON)).astype(object)
        table = pd.DataFrame({"uid": texts["uid"], "matched_entries": matched_entries, "keep": keep,
                              "reason": reason, "keep_probability": probability})
        counts_after = matched_entries[keep].explode().dropna().value_counts()
        entry_counts = pd.DataFrame({"entry": counts_before.index.astype(str),
                                     "count_before": counts_before.to_numpy(np.int64),
                                     "count_after": counts_after.reindex(counts_before.index, fill_value=0)
                                     .to_numpy(np.int64)})
        is_tail = entry_counts.set_index("entry")["count_before"] < params.t
        summary = {
            **funnel_summary(table["reason"]),
            "t": params.t,
            "metadata_entries": len(entries),
            "matched_entries": int(len(entry_counts)),
            "head_entries": int((~is_tail).sum()),
            "tail_share": tail_share(entry_counts.set_index("entry")["count_before"], is_tail),
            "tail_share_after": tail_share(entry_counts.set_index("entry")["count_after"], is_tail),
            "expected_kept": float(probability.sum()),
        }
        write_parquet(table, out_dir / "balance.parquet")
        write_parquet(entry_counts, out_dir / "entry_counts.parquet")
        write_json(summary, out_dir / "balance_summary.json")
        if run is not None:
            mlflow.log_metrics({**funnel_metrics(summary), "tail_share": summary["tail_share"],
                                "tail_share_after": summary["tail_share_after"],
                                "head_entries": summary["head_entries"], "expected_kept": summary["expected_kept"]})
            mlflow.log_artifact(str(out_dir / "balance_summary.json"))
            figure = entry_counts_figure(entry_counts, params.t)
            mlflow.log_figure(figure, "entry_counts.png")
            figure.clf()
    log.info("balance: kept %d of %d (expected %.1f); %d head entries; tail share %.3f -> %.3f",
             summary["kept"], summary["input"], summary["expected_kept"], summary["head_entries"],
             summary["tail_share"], summary["tail_share_after"])
    return summary
