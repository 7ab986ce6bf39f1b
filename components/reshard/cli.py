"""``clipmill stage reshard``: the curated, shuffled training shards (kept by every listed curation step)."""
from __future__ import annotations

import argparse

HELP = "curated training shards (kept by every curation step in curate.steps, shuffled) -> data/curated/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--curate", default="data/curate", help="curation directory: units/, steps/ (input; path or URL)")
    parser.add_argument("--shards", default="data/download/shards", help="download shards directory (input; path or URL)")
    parser.add_argument("--out", default="data/curated", help="curated shards, manifest, content hash (output; path or URL)")


def run(args: argparse.Namespace, params) -> int:
    from .curated import reshard  # imported when the stage runs: `--help` stays fast

    reshard(args.curate, args.shards, args.out, params.reshard, params.project.seed + params.reshard.seed_offset,
            params.tracking, params.curate.steps)
    return 0
