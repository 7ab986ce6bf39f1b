"""``clipmill stage download``: URL list -> webdataset shards, manifest.parquet and summary.json (img2dataset)."""
from __future__ import annotations

import argparse

from clipmill.components.common.layout import add_path_option, resolve_paths

HELP = "download the URL list with img2dataset -> data/download (shards/, manifest.parquet, summary.json)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--urls", default=None,
                        help="URL list: parquet with url, caption, optional uid and passthrough columns "
                             "(default: download.urls in params)")
    parser.add_argument("--additions", default=None,
                        help="directory of URL lists appended to the crawl (`clipmill run full --new-urls`); "
                             "'' for none (default: download.additions in params)")
    add_path_option(parser, "download", "out", "output directory: shards/, manifest.parquet, summary.json, run.json")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output directory that holds a different run (default: refuse)")


def run(args: argparse.Namespace, params) -> int:
    from .stage import download  # imported when the stage runs: `--help` stays fast

    args = resolve_paths(args, params, "download")
    additions = params.download.additions if args.additions is None else (args.additions or None)
    download(params.download, args.urls or params.download.urls, args.out, tracking=params.tracking,
             ray_params=params.ray, additions=additions, overwrite=args.overwrite)
    return 0
