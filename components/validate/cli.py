"""``clipmill stage validate <boundary>``: Great Expectations checks at a data boundary."""
from __future__ import annotations

import argparse

from clipmill.components.common.layout import add_path_option, resolve_paths

from .boundaries import BOUNDARIES

HELP = ("validate a data boundary with Great Expectations -> data/validation/<boundary>.json, "
        "reports/validation/<boundary>/")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    boundaries = parser.add_subparsers(dest="boundary", metavar="BOUNDARY", required=True)
    for name, spec in BOUNDARIES.items():
        sub = boundaries.add_parser(name, help=spec.help, description=f"Validate {spec.help}.")
        for option, (_, text) in spec.inputs.items():
            add_path_option(sub, f"validate_{name}", option, text)
        add_path_option(sub, f"validate_{name}", "out", "results directory: <boundary>.json")
        add_path_option(sub, f"validate_{name}", "reports", "data docs directory: <boundary>/index.html")
        sub.add_argument("--params", default=argparse.SUPPRESS, metavar="FILE", help="params file (as before BOUNDARY)")


def run(args: argparse.Namespace, params) -> int:
    from .stage import validate

    spec = BOUNDARIES[args.boundary]
    args = resolve_paths(args, params, f"validate_{args.boundary}")
    inputs = {option: getattr(args, option.replace("-", "_")) for option in spec.inputs}
    validate(args.boundary, inputs, params, args.out, args.reports)
    return 0
