"""``clipmill stage validate <boundary>``: Great Expectations checks at a data boundary."""
from __future__ import annotations

import argparse

from .boundaries import BOUNDARIES

HELP = "validate a data boundary with Great Expectations -> data/validation/<boundary>.json, reports/validation/<boundary>/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    boundaries = parser.add_subparsers(dest="boundary", metavar="BOUNDARY", required=True)
    for name, spec in BOUNDARIES.items():
        sub = boundaries.add_parser(name, help=spec.help, description=f"Validate {spec.help}.")
        for option, (default, text) in spec.inputs.items():
            sub.add_argument(f"--{option}", default=default, help=f"{text} (default: %(default)s)")
        sub.add_argument("--out", default="data/validation",
                         help="results directory: <boundary>.json (default: %(default)s)")
        sub.add_argument("--reports", default="reports/validation",
                         help="data docs directory: <boundary>/index.html (default: %(default)s)")
        sub.add_argument("--params", default=argparse.SUPPRESS, metavar="FILE", help="params file (as before BOUNDARY)")


def run(args: argparse.Namespace, params) -> int:
    from .stage import validate

    spec = BOUNDARIES[args.boundary]
    inputs = {option: getattr(args, option.replace("-", "_")) for option in spec.inputs}
    validate(args.boundary, inputs, params, args.out, args.reports)
    return 0
