"""``clipmill stage rewrite``: LaCLIP-style caption rewriting with a faithfulness guard."""
from __future__ import annotations

import argparse

from .captions import rewrite_captions

HELP = "caption rewriting (rules, OpenAI-compatible server or local model) -> data/curate/rewrites.parquet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--balance", default="data/curate/balance.parquet", help="balancing table (input)")
    parser.add_argument("--manifest", default="data/download/manifest.parquet", help="download manifest, for captions (input)")
    parser.add_argument("--out", default="data/curate/rewrites.parquet", help="uid -> rewrites table (output)")
    parser.add_argument("--summary", default="data/curate/rewrites_summary.json", help="kept/dropped rewrite counts (output)")


def run(args: argparse.Namespace, params) -> int:
    rewrite_captions(args.balance, args.manifest, args.out, args.summary, params.rewrite,
                     params.project.seed + params.rewrite.seed_offset, params.ray, params.tracking)
    return 0
