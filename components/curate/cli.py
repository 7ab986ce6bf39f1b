"""``clipmill stage curate``: the declared curation steps over every download shard, resumably."""
from __future__ import annotations

import argparse

from components.common.curation import STEP_NAMES

HELP = f"curation steps ({' -> '.join(STEP_NAMES)}) per download shard -> data/curate/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", default="data/download/manifest.parquet", help="download manifest (input; a path or an object-storage URL such as s3://…)")
    parser.add_argument("--shards", default="data/download/shards", help="download shards, for images (input; path or URL)")
    parser.add_argument("--bootstrap-model", default="data/scorer/model",
                        help="local-dir export of the bootstrap filtering network (when score.scorer is 'bootstrap')")
    parser.add_argument("--out", default="data/curate",
                        help="curation directory: per-shard outputs of every step, summary.json (output; path or URL)")


def run(args: argparse.Namespace, params) -> int:
    from .stage import curate  # imported when the stage runs: `--help` stays fast

    curate(args.manifest, args.shards, args.out, params,
           inputs={"bootstrap_model": args.bootstrap_model, "manifest": args.manifest})
    return 0
