"""``clipmill stage report``: the curation report (HTML + PNG), also logged to MLflow."""
from __future__ import annotations

import argparse

from clipmill.components.common.layout import add_path_option, resolve_paths

HELP = "curation report: funnel over the curation steps, step figures, examples -> reports/curation/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_path_option(parser, "report", "manifest", "download manifest (input)")
    add_path_option(parser, "report", "download-summary", "download summary, for the URLs listed twice (input)")
    add_path_option(parser, "report", "shards", "download shards, for thumbnails (input)")
    add_path_option(parser, "report", "curate", "curation directory: units/, steps/ (input)")
    add_path_option(parser, "report", "curated", "curated shards directory (input)")
    add_path_option(parser, "report", "validation", "boundary validation results (input)")
    parser.add_argument("--ground-truth", default=None,
                        help="the crawl's ground truth (the demo's data/crawl/ground_truth.parquet): adds each "
                             "filter's precision and recall against the planted defects (input, optional)")
    add_path_option(parser, "report", "out", "report directory (output)")


def run(args: argparse.Namespace, params) -> int:
    from .curation_report import build_report

    args = resolve_paths(args, params, "report")
    build_report(args.manifest, args.download_summary, args.shards, args.curate, args.curated, args.validation,
                 args.out, params.report, params.project.seed + params.report.seed_offset, params.tracking,
                 params.curate.steps, ground_truth=args.ground_truth)
    return 0
