"""``clipmill stage reshard``: the curated, shuffled training shards (kept by every listed curation step)."""
from __future__ import annotations

import argparse

from clipmill.components.common.layout import add_path_option, resolve_paths

HELP = "curated training shards (kept by every curation step in curate.steps, shuffled) -> data/curated/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_path_option(parser, "reshard", "curate", "curation directory: units/, steps/ (input; path or URL)")
    add_path_option(parser, "reshard", "shards", "download shards directory (input; path or URL)")
    add_path_option(parser, "reshard", "out", "curated shards, manifest, content hash (output; path or URL)")


def run(args: argparse.Namespace, params) -> int:
    from .curated import reshard  # imported when the stage runs: `--help` stays fast

    args = resolve_paths(args, params, "reshard")
    reshard(args.curate, args.shards, args.out, params.reshard, params.project.seed + params.reshard.seed_offset,
            params.tracking, params.curate.steps)
    return 0
