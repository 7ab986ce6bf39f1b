"""``clipmill stage reshard``: the curated, shuffled training shards with rewrites attached."""
from __future__ import annotations

import argparse

from .curated import reshard

HELP = "curated training shards (kept by every curation stage, shuffled, with rewrites) -> data/curated/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", default="data/download/manifest.parquet", help="download manifest (input)")
    parser.add_argument("--shards", default="data/download/shards", help="download shards directory (input)")
    parser.add_argument("--rules", default="data/curate/rules.parquet", help="rule filter table (input)")
    parser.add_argument("--scores", default="data/curate/scores.parquet", help="CLIP-score table (input)")
    parser.add_argument("--balance", default="data/curate/balance.parquet", help="balancing table (input)")
    parser.add_argument("--rewrites", default="data/curate/rewrites.parquet", help="caption rewrites (input)")
    parser.add_argument("--out", default="data/curated", help="curated shards, manifest, content hash (output)")


def run(args: argparse.Namespace, params) -> int:
    reshard(args.manifest, args.shards, args.rules, args.scores, args.balance, args.rewrites, args.out,
            params.reshard, params.project.seed + params.reshard.seed_offset, params.tracking)
    return 0
