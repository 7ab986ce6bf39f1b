"""``clipmill stage filter``: DataComp basic rules, boilerplate and exact-duplicate images."""
from __future__ import annotations

import argparse

from .rules import filter_manifest

HELP = "rule filter: caption/image rules, boilerplate, duplicate images -> data/curate/rules.parquet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", default="data/download/manifest.parquet", help="download manifest (input)")
    parser.add_argument("--out-dir", default="data/curate",
                        help="where rules.parquet (per-uid keep/reason) and rules_summary.json go (output)")


def run(args: argparse.Namespace, params) -> int:
    filter_manifest(args.manifest, args.out_dir, params.filter, params.ray, params.tracking)
    return 0
