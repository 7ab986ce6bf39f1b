"""``clipmill stage score``: CLIP-score filter of the rule survivors."""
from __future__ import annotations

import argparse

from .scoring import score_survivors

HELP = "CLIP-score filter: image-caption cosine similarity, top-fraction/absolute threshold -> data/curate/scores.parquet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", default="data/download/manifest.parquet", help="download manifest (input)")
    parser.add_argument("--rules", default="data/curate/rules.parquet", help="rule filter table: its kept uids are scored")
    parser.add_argument("--shards", default="data/download/shards", help="download shards (images are read from here)")
    parser.add_argument("--bootstrap-model", default="data/scorer/model",
                        help="local-dir export of the bootstrap filtering network (used when score.scorer is 'bootstrap')")
    parser.add_argument("--out-dir", default="data/curate",
                        help="where scores.parquet and scores_summary.json go (output)")


def run(args: argparse.Namespace, params) -> int:
    score_survivors(args.manifest, args.rules, args.shards, args.out_dir, params.score, params.ray, params.tracking,
                    bootstrap_model=args.bootstrap_model)
    return 0
