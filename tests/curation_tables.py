"""The curation tables of a tiny download (tests/curation_fixtures.py), shaped like the curation stages write them.

rules.parquet covers every manifest uid (failed downloads as ``download:<reason>``); scores.parquet the uids the
rules kept (mismatched captions score low); balance.parquet the uids the score kept (one head entry subsampled);
rewrites.parquet the uids balancing kept. Each table has one row per uid with ``keep`` and ``reason``.
``make_curated`` adds the curated shards written by the real reshard stage.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from components.common.params import TrackingParams
from components.common.text import spaced_text
from components.reshard.curated import reshard
from components.reshard.params import ReshardParams

from tests.curation_fixtures import COLORS, SHAPES, make_download

ENTRIES = list(COLORS) + SHAPES + [f"{c} {s}" for c in COLORS for s in SHAPES] + ["background"]
THRESHOLD = 0.2
HEAD_ENTRY = "circle"


def _rule_reason(row) -> str | None:
    if row.status != "success":
        return f"download:{row.error_reason}"
    if len(str(row.caption).split()) < 3:
        return "min_words"
    if str(row.caption).startswith("IMG_"):
        return "boilerplate"
    if min(row.original_width, row.original_height) < 20:
        return "min_image_side"
    if max(row.original_width, row.original_height) / min(row.original_width, row.original_height) > 3:
        return "max_aspect_ratio"
    return None


def funnel_table(uids, reasons, **columns) -> pd.DataFrame:
    reasons = list(reasons)
    return pd.DataFrame({"uid": list(uids), **columns, "keep": [r is None for r in reasons], "reason": reasons})


def make_curation(root: Path, n: int = 160, per_shard: int = 50, seed: int = 0) -> dict:
    """Download fixture + curate tables under ``root``; returns their paths and the tables."""
    download = make_download(root / "download", n=n, per_shard=per_shard, seed=seed)
    manifest = download["table"]
    curate = root / "curate"
    curate.mkdir(parents=True, exist_ok=True)
    rules = funnel_table(manifest["uid"], [_rule_reason(r) for r in manifest.itertuples()])
    survivors = manifest[rules["keep"].to_numpy()]
    rng = np.random.default_rng(seed)
    mismatched = np.array([int(url.rsplit("/", 1)[1].split(".")[0]) % 7 == 6 for url in survivors["url"]])
    clip_score = np.where(mismatched, rng.uniform(-0.05, 0.15, len(survivors)), rng.uniform(0.18, 0.45, len(survivors)))
    score_keep = clip_score >= THRESHOLD
    scores = funnel_table(survivors["uid"], [None if k else "low_clip_score" for k in score_keep],
                          clip_score=clip_score.astype(np.float32), threshold=np.float32(THRESHOLD))
    kept = survivors[score_keep]
    matched = [[e for e in ENTRIES if f" {e} " in spaced_text(c)] for c in kept["caption"]]
    counts = pd.Series([e for m in matched for e in m]).value_counts()
    # Every other text of a frequent entry is subsampled away, as balancing does to head entries.
    head_seen = 0
    reasons = []
    for entries in matched:
        reason = None if entries else "no_metadata_match"
        if HEAD_ENTRY in entries:
            head_seen += 1
            reason = "balance_subsampled" if head_seen % 2 == 0 else reason
        reasons.append(reason)
    balance = funnel_table(kept["uid"], reasons, matched_entries=matched)
    after = pd.Series([e for m, r in zip(matched, reasons) if r is None for e in m]).value_counts()
    entry_counts = pd.DataFrame({"entry": counts.index, "count_before": counts.to_numpy(np.int64),
                                 "count_after": after.reindex(counts.index, fill_value=0).to_numpy(np.int64)})
    balanced = balance[balance["keep"]]
    rewrites = pd.DataFrame({"uid": balanced["uid"],
                             "rewrites": [[f"a picture of {c}", f"{c}, seen up close"] for c in
                                          manifest.set_index("uid").loc[balanced["uid"], "caption"]],
                             "backend": "rules", "model": "rules"})
    paths = {"manifest": download["manifest"], "shards": download["shards"], "rules": curate / "rules.parquet",
             "scores": curate / "scores.parquet", "balance": curate / "balance.parquet",
             "entry_counts": curate / "entry_counts.parquet", "rewrites": curate / "rewrites.parquet"}
    for name, table in (("rules", rules), ("scores", scores), ("balance", balance), ("entry_counts", entry_counts),
                        ("rewrites", rewrites)):
        table.to_parquet(paths[name], index=False)
    urls = manifest[["uid", "url", "caption"]]
    paths["urls"] = root / "urls.parquet"
    urls.to_parquet(paths["urls"], index=False)
    return {"paths": paths, "manifest": manifest, "rules": rules, "scores": scores, "balance": balance,
            "entry_counts": entry_counts, "rewrites": rewrites}


def make_curated(root: Path, n: int, per_shard: int, samples_per_shard: int) -> dict:
    """``make_curation`` plus ``root/curated`` from the reshard stage (``paths["curated"]``)."""
    curation = make_curation(root, n=n, per_shard=per_shard)
    p = curation["paths"]
    p["curated"] = root / "curated"
    reshard(p["manifest"], p["shards"], p["rules"], p["scores"], p["balance"], p["rewrites"], p["curated"],
            ReshardParams(samples_per_shard=samples_per_shard), 0, TrackingParams(enabled=False))
    return curation
