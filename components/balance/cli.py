"""``clipmill stage balance``: MetaCLIP balancing of the CLIP-score survivors."""
from __future__ import annotations

import argparse

from .balancing import balance

HELP = "MetaCLIP balancing: match captions to metadata entries, subsample head entries -> data/curate/balance.parquet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", default="data/download/manifest.parquet", help="download manifest (captions)")
    parser.add_argument("--scores", default="data/curate/scores.parquet", help="score stage table: its kept uids are balanced")
    parser.add_argument("--out-dir", default="data/curate",
                        help="where balance.parquet, entry_counts.parquet and balance_summary.json go (output)")


def run(args: argparse.Namespace, params) -> int:
    balance(args.manifest, args.scores, args.out_dir, params.balance, params.project.seed, params.ray, params.tracking)
    return 0
