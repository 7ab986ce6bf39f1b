"""``clipmill stage report``: the curation report (HTML + PNG), also logged to MLflow."""
from __future__ import annotations

import argparse

HELP = "curation report: funnel, score histogram, entry rank-frequency, examples, rewrites -> reports/curation/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--urls", default="data/crawl/urls.parquet", help="URL list (input)")
    parser.add_argument("--additions", default=None,
                        help="URL lists appended to the crawl (input; default: download.additions; '' for none)")
    parser.add_argument("--manifest", default="data/download/manifest.parquet", help="download manifest (input)")
    parser.add_argument("--shards", default="data/download/shards", help="download shards, for thumbnails (input)")
    parser.add_argument("--rules", default="data/curate/rules.parquet", help="rule filter table (input)")
    parser.add_argument("--scores", default="data/curate/scores.parquet", help="CLIP-score table (input)")
    parser.add_argument("--balance", default="data/curate/balance.parquet", help="balancing table (input)")
    parser.add_argument("--entry-counts", default="data/curate/entry_counts.parquet", help="per-entry counts (input)")
    parser.add_argument("--rewrites", default="data/curate/rewrites.parquet", help="caption rewrites (input)")
    parser.add_argument("--rewrites-summary", default="data/curate/rewrites_summary.json", help="rewrite counts (input)")
    parser.add_argument("--curated", default="data/curated", help="curated shards directory (input)")
    parser.add_argument("--validation", default="data/validation", help="boundary validation results (input)")
    parser.add_argument("--out", default=None, help="report directory (output; default: <project.reports_dir>/curation)")


def run(args: argparse.Namespace, params) -> int:
    from .curation_report import build_report

    out = args.out or f"{params.project.reports_dir}/curation"
    build_report(args.urls, args.manifest, args.shards, args.rules, args.scores, args.balance, args.entry_counts,
                 args.rewrites, args.rewrites_summary, args.curated, args.validation, out, params.report,
                 params.project.seed + params.report.seed_offset, params.balance.t, params.tracking,
                 additions=params.download.additions if args.additions is None else (args.additions or None))
    return 0
