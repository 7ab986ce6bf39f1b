"""``clipmill stage demo_corpus``: the synthetic web crawl, its server's content, held-out and trusted sets."""
from __future__ import annotations

import argparse

from clipmill.components.common.layout import add_path_option, resolve_paths

HELP = ("synthetic web crawl -> data/crawl (urls.parquet, web/, ground truth), "
        "data/eval (held-out sets), data/trusted (clean seed shards)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_path_option(parser, "demo_corpus", "crawl-out",
                    "urls.parquet, web/ (the demo server's content), ground_truth.parquet, summary.json (output)")
    add_path_option(parser, "demo_corpus", "eval-out",
                    "zeroshot.parquet, zeroshot_classes.json, retrieval.parquet, suite.json (output)")
    add_path_option(parser, "demo_corpus", "trusted-out",
                    "trusted-000000.tar... webdataset shards and manifest.parquet (output)")


def run(args: argparse.Namespace, params) -> int:
    from .corpus import run_demo_corpus  # imported when the stage runs: `--help` stays fast

    args = resolve_paths(args, params, "demo_corpus")
    run_demo_corpus(params.demo_corpus, params.project.seed, params.tracking, args.crawl_out, args.eval_out,
                    args.trusted_out)
    return 0
