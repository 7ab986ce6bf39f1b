"""The curation report: ``index.html`` with PNG figures and ``funnel.json`` under the report directory.

It shows the funnel (counts and reasons per stage; they add up, or the report refuses to build), the
CLIP-score histogram with the threshold, the entry rank-frequency before and after balancing, thumbnails of
kept and dropped samples with captions and reasons, and captions beside their rewrites.
"""
from __future__ import annotations

import base64
import io
import json
import os
import random
from pathlib import Path

import mlflow
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from components.common.errors import InputError
from components.common.io import atomic_path, read_json, read_parquet
from components.common.log import get_logger
from components.common.params import TrackingParams
from components.common.shards import ShardReader, shard_file_name
from components.common.tracking import stage_run

from .funnel import StageCounts, curation_funnel
from .page import render_page
from .params import ReportParams
from .plots import funnel_figure, rank_frequency_figure, save_figure, score_histogram_figure

VALIDATED_BOUNDARIES = ("download", "curate", "rewrites", "curated")

log = get_logger("report")


def thumbnail(jpg: bytes, px: int) -> str | None:
    """A JPEG data URI of the image scaled to fit ``px`` x ``px``; None when the bytes are not an image."""
    try:
        with Image.open(io.BytesIO(jpg)) as img:
            small = ImageOps.exif_transpose(img).convert("RGB")
    except (UnidentifiedImageError, OSError):
        return None
    small.thumbnail((px, px))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def validation_status(validation_dir: str | os.PathLike) -> list[dict]:
    """Per boundary: whether its Great Expectations results exist and passed, and the failed expectations."""
    rows = []
    for boundary in VALIDATED_BOUNDARIES:
        path = Path(validation_dir) / f"{boundary}.json"
        if not path.is_file():
            rows.append({"boundary": boundary, "status": "not run", "passed": 0, "total": 0, "failed": []})
            continue
        results = read_json(path)
        expectations = [(check["table"], e) for check in results["checks"] for e in check["expectations"]]
        failed = [f"{table}: {e['expectation']}" + (f"({e['column']})" if e.get("column") else "")
                  for table, e in expectations if not e["success"]]
        rows.append({"boundary": boundary, "status": "passed" if results["success"] else "failed",
                     "passed": len(expectations) - len(failed), "total": len(expectations), "failed": failed})
    return rows


def pick_dropped(fate: pd.DataFrame, n: int, rng: random.Random) -> pd.DataFrame:
    """Up to ``n`` dropped samples, taken in turn from each (stage, reason) so that every reason shows."""
    groups = [list(g.index) for _, g in fate[fate["reason"].notna()].groupby(["stage", "reason"], sort=True)]
    for members in groups:
        rng.shuffle(members)
    chosen = []
    while len(chosen) < n and any(groups):
        for members in groups:
            if members and len(chosen) < n:
                chosen.append(members.pop())
    return fate.loc[chosen]


def example_cards(rows: pd.DataFrame, manifest: pd.DataFrame, reader: ShardReader, px: int) -> list[dict]:
    cards = []
    for row in rows.itertuples():
        source = manifest.loc[row.uid]
        image = None
        if source["status"] == "success" and isinstance(source["key"], str):
            image = thumbnail(reader.read(shard_file_name(source["shard"]), source["key"], "jpg"), px)
        cards.append({"uid": row.uid, "caption": str(source["caption"]), "stage": row.stage, "reason": row.reason,
                      "thumbnail": image})
    return cards


def build_report(urls_path: str | os.PathLike, manifest_path: str | os.PathLike, shard_dir: str | os.PathLike,
                 rules_path: str | os.PathLike, scores_path: str | os.PathLike, balance_path: str | os.PathLike,
                 entry_counts_path: str | os.PathLike, rewrites_path: str | os.PathLike,
                 rewrites_summary_path: str | os.PathLike, curated_dir: str | os.PathLike,
                 validation_dir: str | os.PathLike, out_dir: str | os.PathLike, params: ReportParams, seed: int,
                 balance_t: int | None, tracking: TrackingParams,
                 additions: str | os.PathLike | None = None) -> list[StageCounts]:
    """Every curation output and the boundary validation results in; the report directory out (also logged to
    MLflow). ``additions``: the URL lists appended to the crawl (the funnel starts from all lists). Returns the
    funnel stages."""
    from components.download.additions import read_crawl

    curated_dir = Path(curated_dir)
    crawl = read_crawl(urls_path, additions)
    urls = crawl.url_list.table[["uid"]]
    manifest = read_parquet(manifest_path, ["uid", "key", "shard", "status", "error_reason", "caption"])
    stages, fate = curation_funnel(urls, manifest, rules_path, scores_path, balance_path,
                                   curated_dir / "manifest.parquet", duplicates=crawl.duplicates)
    scores = read_parquet(scores_path, ["uid", "clip_score", "keep", "threshold"])
    entry_counts = read_parquet(entry_counts_path, ["entry", "count_before", "count_after"])
    rewrites = read_parquet(rewrites_path, ["uid", "rewrites"])
    hash_file = curated_dir / "content_hash.txt"
    if not hash_file.is_file():
        raise InputError(hash_file, "no such file (run the reshard stage first)")
    rewrite_summary = read_json(rewrites_summary_path)
    manifest = manifest.drop_duplicates("uid").set_index("uid")
    rng = random.Random(seed)
    curated = fate[fate["reason"].isna()]
    kept_rows = curated.loc[sorted(rng.sample(list(curated.index), min(params.examples_per_group, len(curated))))]
    dropped_rows = pick_dropped(fate, params.examples_per_group, rng)
    rewrite_rows = rewrites.iloc[sorted(rng.sample(range(len(rewrites)), min(params.rewrite_examples, len(rewrites))))]
    with ShardReader(shard_dir) as reader:
        kept_cards = example_cards(kept_rows, manifest, reader, params.thumbnail_px)
        dropped_cards = example_cards(dropped_rows, manifest, reader, params.thumbnail_px)
    funnel = [s.as_dict() for s in stages]
    context = {
        "funnel": funnel, "total_dropped": sum(s.input - s.kept for s in stages),
        "curated_hash": hash_file.read_text().strip(), "thumb_px": params.thumbnail_px,
        "head_entries": entry_counts.sort_values("count_before", ascending=False).head(15).to_dict("records"),
        "validation": validation_status(validation_dir), "kept_examples": kept_cards, "dropped_examples": dropped_cards, "rewrite_summary": rewrite_summary,
        "rewrite_examples": [{"caption": str(manifest.at[uid, "caption"]), "rewrites": list(r)}
                             for uid, r in zip(rewrite_rows["uid"], rewrite_rows["rewrites"])],
    }
    if funnel[-1]["kept"] + context["total_dropped"] != funnel[0]["input"]:
        raise AssertionError(f"funnel does not add up: {funnel}")
    out_dir = Path(out_dir)
    data_paths = [Path(p) for p in (urls_path, *([additions] if additions else []), manifest_path, rules_path, scores_path, balance_path,
                                    entry_counts_path, rewrites_path, curated_dir / "manifest.parquet")]
    with stage_run("report", tracking, params, data_paths) as run:
        with atomic_path(out_dir) as tmp:
            tmp.mkdir(parents=True)
            save_figure(funnel_figure(stages), tmp / "funnel.png")
            save_figure(score_histogram_figure(scores, params.histogram_bins), tmp / "score_histogram.png")
            save_figure(rank_frequency_figure(entry_counts, balance_t), tmp / "entry_rank_frequency.png")
            (tmp / "funnel.json").write_text(json.dumps({"stages": funnel, "curated": funnel[-1]["kept"],
                                                         "dropped": context["total_dropped"]}, indent=2) + "\n")
            (tmp / "index.html").write_text(render_page(context))
        if run is not None:
            mlflow.log_metrics({f"funnel.{s.stage.replace(' ', '_')}.kept": s.kept for s in stages})
            mlflow.log_artifacts(str(out_dir), artifact_path="curation_report")
    log.info("report: %s -> %s", " -> ".join(f"{s.stage} {s.kept:,}" for s in stages), out_dir / "index.html")
    return stages
