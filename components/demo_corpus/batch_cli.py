"""``clipmill demo-urls``: a new batch of the synthetic crawl, to append with ``clipmill run full --new-urls``."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers, add_params_option) -> None:
    p = subparsers.add_parser(
        "demo-urls", help="write a new batch of the demo crawl (a URL list to append with --new-urls)",
        description="Write batch N of the synthetic crawl: OUT/urls.parquet (uid, url, caption, page_url, "
                    "crawl_date), OUT/web/ (what the demo server answers for those URLs) and OUT/ground_truth.parquet. "
                    "The URLs are new (no batch repeats another's), the misbehaviour and defect rates are those of "
                    "demo_corpus. Append it to the crawl with `clipmill run full --new-urls OUT/urls.parquet`.")
    add_params_option(p)
    p.add_argument("--batch", type=int, default=1, help="batch number, 1 or more (default: %(default)s)")
    p.add_argument("--num-pairs", type=int, default=3000, help="URL/caption pairs in the batch (default: %(default)s)")
    p.add_argument("--out", required=True, help="output directory (an earlier demo-urls output there is replaced; "
                                                "any other non-empty directory is refused)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, params) -> int:
    from clipmill.components.common.errors import ClipmillError

    from .corpus import generate_crawl_batch

    if args.num_pairs < 1:
        raise ClipmillError(f"--num-pairs {args.num_pairs}: must be at least 1")
    summary = generate_crawl_batch(params.demo_corpus, params.project.seed, args.batch, args.num_pairs, args.out)
    print(f"demo crawl batch {args.batch}: {summary['num_pairs']} pairs -> {Path(args.out) / 'urls.parquet'} "
          f"({100 * summary['behaviours']['ok']['rate']:.1f}% answer 200 at once)")
    return 0
