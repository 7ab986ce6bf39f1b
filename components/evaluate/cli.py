"""``clipmill stage evaluate``: zero-shot classification, retrieval and modality gap on the held-out suite."""
from __future__ import annotations

import argparse

from clipmill.components.common.layout import add_path_option, resolve_paths

HELP = "evaluate a model on the held-out suite -> data/evaluate/metrics.json + plots in reports/evaluation/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_path_option(parser, "evaluate", "model",
                    "local-dir export or MLflow URI (models:/<name>@<alias>) of the model (input)")
    add_path_option(parser, "evaluate", "eval-dir", "held-out sets and suite.json (input)")
    add_path_option(parser, "evaluate", "out", "metrics.json and per_class.csv (output)")
    add_path_option(parser, "evaluate", "reports", "plots (output)")


def run(args: argparse.Namespace, params) -> int:
    from .evaluate import evaluate  # torch and matplotlib load only when the stage runs

    args = resolve_paths(args, params, "evaluate")
    evaluate(args.model, args.eval_dir, args.out, args.reports, params.evaluate, params.tracking)
    return 0
