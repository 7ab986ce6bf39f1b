"""The curation report: ``index.html`` with PNG figures and ``funnel.json`` under the report directory.

It shows the funnel (URL list, download, every listed curation step, curated; the counts add up, or the report
refuses to build), the boundary validation status, and thumbnails of kept and dropped samples with captions
and reasons. Sections tied to a step's output show only when a listed step adds that output (found by the
step's ``columns``): the CLIP-score histogram with the threshold (``clip_score``), the entry rank-frequency
before and after balancing (``matched_entries``), captions beside their rewrites (``rewrites``). Given the
crawl's ground truth (the demo's), it also shows each filter's precision and recall against the planted defects
(``defects.json``).
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

from clipmill.components.common.curation import (
    output_path,
    read_step_table,
    step_classes,
    step_dir,
    unit_path,
    units_of,
)
from clipmill.components.common.errors import InputError
from clipmill.components.common.io import atomic_path, read_json, read_parquet
from clipmill.components.common.log import get_logger
from clipmill.components.common.params import TrackingParams
from clipmill.components.common.shards import ShardReader, shard_file_name
from clipmill.components.common.steps import Step
from clipmill.components.common.tracking import stage_run

from .defects import defect_scores
from .funnel import StageCounts, curation_funnel
from .page import render_page
from .params import ReportParams
from .plots import funnel_figure, rank_frequency_figure, save_figure, score_histogram_figure

VALIDATED_BOUNDARIES = ("download", "curate", "curated")
MANIFEST_COLUMNS = ["uid", "key", "shard", "status", "error_reason", "caption"]

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
    """Fate rows (uid, stage, reason) in; cards (uid, caption, stage, reason, thumbnail or None) out."""
    cards = []
    for row in rows.itertuples():
        source = manifest.loc[row.uid]
        image = None
        if source["status"] == "success" and isinstance(source["key"], str):
            image = thumbnail(reader.read(shard_file_name(source["shard"]), source["key"], "jpg"), px)
        cards.append({"uid": row.uid, "caption": str(source["caption"]), "stage": row.stage, "reason": row.reason,
                      "thumbnail": image})
    return cards


def read_manifest(manifest_path: str | os.PathLike) -> pd.DataFrame:
    """The download manifest's columns the report reads; uids must be unique."""
    manifest = read_parquet(manifest_path, MANIFEST_COLUMNS)
    if manifest["uid"].duplicated().any():
        raise InputError(manifest_path, f"uid {manifest['uid'][manifest['uid'].duplicated()].iloc[0]!r} appears "
                                        "more than once", field="uid")
    return manifest


def read_duplicates(download_summary_path: str | os.PathLike) -> int:
    """The download summary's ``duplicates``: URL-list uids an earlier list already had (listed, not fetched)."""
    summary = read_json(download_summary_path)
    if not isinstance(summary.get("duplicates"), int):
        raise InputError(download_summary_path, "missing or not a count", field="duplicates")
    return summary["duplicates"]


def step_with(steps: list[type[Step]], column: str) -> type[Step] | None:
    """The listed step that adds ``column`` (None when no listed step does)."""
    return next((step for step in steps if column in step.columns), None)


def step_summary(curate_dir: Path, step: type[Step]) -> dict:
    return read_json(step_dir(curate_dir, step.name) / "summary.json",
                     missing=f"no summary of step {step.name!r} (run the curate stage first)")


def score_section(curate_dir: Path, step: type[Step], bins: int) -> tuple[dict, dict]:
    """The CLIP-score histogram of ``step``'s samples with its threshold: (page context, figures)."""
    scores = read_step_table(curate_dir, step.name, ["uid", "clip_score", "keep"])
    threshold = step_summary(curate_dir, step).get("threshold")
    figure = score_histogram_figure(scores, threshold, bins)
    return {"step": step.name, "figure": "score_histogram.png"}, {"score_histogram.png": figure}


def balance_section(curate_dir: Path, step: type[Step]) -> tuple[dict, dict]:
    """The entry rank-frequency before and after ``step`` and its head entries: (page context, figures)."""
    counts_path = step_dir(curate_dir, step.name) / "entry_counts.parquet"
    entry_counts = read_parquet(counts_path, ["entry", "count_before", "count_after"])
    t = step_summary(curate_dir, step).get("t")
    figure = rank_frequency_figure(entry_counts, t)
    head = entry_counts.sort_values("count_before", ascending=False, kind="stable").head(15)
    return ({"step": step.name, "figure": "entry_rank_frequency.png", "head_entries": head.to_dict("records")},
            {"entry_rank_frequency.png": figure})


def rewrite_section(curate_dir: Path, step: type[Step], manifest: pd.DataFrame, n: int,
                    rng: random.Random) -> tuple[dict, dict]:
    """``step``'s rewrite counts and ``n`` captions beside their rewrites: (page context, no figures)."""
    rewrites = read_step_table(curate_dir, step.name, ["uid", "rewrites"])
    rows = rewrites.iloc[sorted(rng.sample(range(len(rewrites)), min(n, len(rewrites))))]
    summary = step_summary(curate_dir, step).get("rewrites")
    if not isinstance(summary, dict):
        raise InputError(step_dir(curate_dir, step.name) / "summary.json", "missing", field="rewrites")
    examples = [{"caption": str(manifest.at[uid, "caption"]), "rewrites": [str(r) for r in rewrites_of]}
                for uid, rewrites_of in zip(rows["uid"], rows["rewrites"])]
    return {"step": step.name, "summary": summary, "examples": examples}, {}


def step_sections(curate_dir: Path, steps: list[str], manifest: pd.DataFrame, params: ReportParams,
                  rng: random.Random) -> tuple[dict, dict]:
    """Page context of each step-specific section (None where no listed step adds its column), and figures."""
    classes = step_classes(steps)
    builders = {
        "clip_scores": ("clip_score", lambda s: score_section(curate_dir, s, params.histogram_bins)),
        "entry_balance": ("matched_entries", lambda s: balance_section(curate_dir, s)),
        "caption_rewrites": ("rewrites",
                             lambda s: rewrite_section(curate_dir, s, manifest, params.rewrite_examples, rng)),
    }
    context, figures = {}, {}
    for section, (column, build) in builders.items():
        step = step_with(classes, column)
        context[section], section_figures = build(step) if step is not None else (None, {})
        figures.update(section_figures)
    return context, figures


def curation_files(curate_dir: Path, steps: list[str]) -> list[Path]:
    """The curation directory's files the funnel reads: every unit and every listed step's decisions."""
    units = units_of(curate_dir)
    return [unit_path(curate_dir, u) for u in units] + [output_path(curate_dir, s, u) for s in steps for u in units]


def check_adds_up(funnel: list[dict]) -> int:
    """Total dropped over the funnel; curated + dropped must equal the URL list."""
    dropped = sum(s["input"] - s["kept"] for s in funnel)
    if funnel[-1]["kept"] + dropped != funnel[0]["input"]:
        raise AssertionError(f"funnel does not add up: {funnel}")
    return dropped


def build_report(manifest_path: str | os.PathLike, download_summary_path: str | os.PathLike,
                 shard_dir: str | os.PathLike, curate_dir: str | os.PathLike, curated_dir: str | os.PathLike,
                 validation_dir: str | os.PathLike, out_dir: str | os.PathLike, params: ReportParams, seed: int,
                 tracking: TrackingParams, steps: list[str],
                 ground_truth: str | os.PathLike | None = None) -> list[StageCounts]:
    """The download manifest and summary, the curation directory (``steps``: the listed steps), the curated
    shards, the boundary validation results and, optionally, the crawl's ground truth in; the report directory
    out (also logged to MLflow). Returns the funnel stages."""
    curate_dir, curated_dir, out_dir = Path(curate_dir), Path(curated_dir), Path(out_dir)
    manifest = read_manifest(manifest_path)
    stages, fate = curation_funnel(manifest, curate_dir, steps, curated_dir / "manifest.parquet",
                                   duplicates=read_duplicates(download_summary_path))
    funnel = [s.as_dict() for s in stages]
    total_dropped = check_adds_up(funnel)
    hash_file = curated_dir / "content_hash.txt"
    if not hash_file.is_file():
        raise InputError(hash_file, "no such file (run the reshard stage first)")
    manifest = manifest.set_index("uid")
    rng = random.Random(seed)
    curated = fate[fate["reason"].isna()]
    kept_rows = curated.loc[sorted(rng.sample(list(curated.index), min(params.examples_per_group, len(curated))))]
    dropped_rows = pick_dropped(fate, params.examples_per_group, rng)
    sections, figures = step_sections(curate_dir, steps, manifest, params, rng)
    defects = defect_scores(curate_dir, steps, ground_truth) if ground_truth is not None else None
    with ShardReader(shard_dir) as reader:
        kept_cards = example_cards(kept_rows, manifest, reader, params.thumbnail_px)
        dropped_cards = example_cards(dropped_rows, manifest, reader, params.thumbnail_px)
    context = {"funnel": funnel, "total_dropped": total_dropped, "curated_hash": hash_file.read_text().strip(),
               "thumb_px": params.thumbnail_px, "validation": validation_status(validation_dir),
               "kept_examples": kept_cards, "dropped_examples": dropped_cards, "defects": defects, **sections}
    data_paths = [Path(manifest_path), Path(download_summary_path), *curation_files(curate_dir, steps),
                  curated_dir / "manifest.parquet", *([Path(ground_truth)] if ground_truth is not None else [])]
    with stage_run("report", tracking, params, data_paths) as run:
        with atomic_path(out_dir, owner="report") as tmp:
            tmp.mkdir(parents=True)
            save_figure(funnel_figure(stages), tmp / "funnel.png")
            for name, figure in figures.items():
                save_figure(figure, tmp / name)
            (tmp / "funnel.json").write_text(json.dumps({"stages": funnel, "curated": funnel[-1]["kept"],
                                                         "dropped": total_dropped}, indent=2) + "\n")
            if defects is not None:
                (tmp / "defects.json").write_text(json.dumps({"steps": defects}, indent=2) + "\n")
            (tmp / "index.html").write_text(render_page(context))
        if run is not None:
            mlflow.log_metrics({f"funnel.{s.stage.replace(' ', '_')}.kept": s.kept for s in stages})
            mlflow.log_metrics({f"defects.{row['step']}.{k}": row[k] for row in defects or []
                                for k in ("precision", "recall") if row[k] is not None})
            mlflow.log_artifacts(str(out_dir), artifact_path="curation_report")
    log.info("report: %s -> %s", " -> ".join(f"{s.stage} {s.kept:,}" for s in stages), out_dir / "index.html")
    return stages
