"""``clipmill stage report``: the curation report (HTML + PNG), also logged to MLflow."""
from __future__ import annotations

import argparse

HELP = "curation report: funnel over the curation steps, step figures, examples -> reports/curation/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", default="data/download/manifest.parquet", help="download manifest (input)")
    parser.add_argument("--download-summary", default="data/download/summary.json",
                        help="download summary, for the URLs listed twice (input)")
    parser.add_argument("--shards", default="data/download/shards", help="download shards, for thumbnails (input)")
    parser.add_argument("--curate", default="data/curate", help="curation directory: units/, steps/ (input)")
    parser.add_argument("--curated", default="data/curated", help="curated shards directory (input)")
    parser.add_argument("--validation", default="data/validation", help="boundary validation results (input)")
    parser.add_argument("--ground-truth", default=None,
                        help="the crawl's ground truth (the demo's data/crawl/ground_truth.parquet): adds each "
                             "filter's precision and recall against the planted defects (input, optional)")
    parser.add_argument("--out", default=None, help="report directory (output; default: <project.reports_dir>/curation)")


def run(args: argparse.Namespace, params) -> int:
    from .curation_report import build_report

    out = args.out or f"{params.project.reports_dir}/curation"
    build_report(args.manifest, args.download_summary, args.shards, args.curate, args.curated, args.validation, out,
                 params.report, params.project.seed + params.report.seed_offset, params.tracking,
                 params.curate.steps, ground_truth=args.ground_truth)
    return 0
