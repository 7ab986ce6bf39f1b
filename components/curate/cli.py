"""``clipmill stage curate``: the declared curation steps over every download shard, resumably."""
from __future__ import annotations

import argparse

from clipmill.components.common.curation import STEP_NAMES
from clipmill.components.common.layout import add_path_option, resolve_paths

HELP = f"curation steps ({' -> '.join(STEP_NAMES)}) per download shard -> data/curate/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_path_option(parser, "curate", "manifest", "download manifest (input; a path or an object-storage URL such as s3://…)")
    add_path_option(parser, "curate", "shards", "download shards, for images (input; path or URL)")
    add_path_option(parser, "curate", "bootstrap-model",
                    "local-dir export of the bootstrap filtering network (when score.scorer is 'bootstrap')")
    add_path_option(parser, "curate", "out",
                    "curation directory: per-shard outputs of every step, summary.json (output; path or URL)")


def run(args: argparse.Namespace, params) -> int:
    from .stage import curate  # imported when the stage runs: `--help` stays fast

    args = resolve_paths(args, params, "curate")
    curate(args.manifest, args.shards, args.out, params,
           inputs={"bootstrap_model": args.bootstrap_model, "manifest": args.manifest})
    return 0
