"""``clipmill stage evaluate``: zero-shot classification, retrieval and modality gap on the held-out suite."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "evaluate a model on the held-out suite -> data/evaluate/metrics.json + plots in reports/evaluation/"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="data/train/model",
                        help="local-dir export or MLflow URI (models:/<name>@<alias>) of the model (input)")
    parser.add_argument("--eval-dir", default="data/eval", help="held-out sets and suite.json (input)")
    parser.add_argument("--out", default="data/evaluate", help="metrics.json and per_class.csv (output)")
    parser.add_argument("--reports", default=None, help="plots (output; default: <project.reports_dir>/evaluation)")


def run(args: argparse.Namespace, params) -> int:
    from .evaluate import evaluate  # torch and matplotlib load only when the stage runs

    reports = args.reports or Path(params.project.reports_dir) / "evaluation"
    evaluate(args.model, args.eval_dir, args.out, reports, params.evaluate, params.tracking)
    return 0
