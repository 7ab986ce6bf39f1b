"""``clipmill stage register``: register the trained model as ``challenger`` and apply the promotion policy."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "register the trained model in the MLflow registry (alias challenger) and apply the promotion policy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="data/train/model", help="local-dir export of the trained model (input)")
    parser.add_argument("--metrics", default="data/evaluate/metrics.json", help="its evaluation record (input)")
    parser.add_argument("--train-run", default="data/train/run.json", help="training run.json: MLflow run id (input)")
    parser.add_argument("--curated", default="data/curated", help="curated training data, hashed for lineage (input)")
    parser.add_argument("--download-summary", default="data/download/summary.json",
                        help="the download's summary.json: the crawl's URL lists, recorded on the version (input)")
    parser.add_argument("--eval-dir", default="data/eval",
                        help="evaluation suite, to re-evaluate a champion measured on another suite version (input)")
    parser.add_argument("--out", default="data/register", help="registration.json (output)")
    parser.add_argument("--reports", default=None, help="promotion.md (output; default: <project.reports_dir>)")


def run(args: argparse.Namespace, params) -> int:
    from .register import register  # torch and mlflow load only when the stage runs

    result = register(args.model, args.metrics, args.eval_dir, args.out, args.reports or Path(params.project.reports_dir),
                      params=params.register, tracking=params.tracking, pipeline_params=params,
                      train_run_file=args.train_run, curated_dir=args.curated,
                      download_summary=args.download_summary or None,
                      eval_batch_size=params.evaluate.batch_size, eval_device=params.evaluate.device)
    outcome = f"; promotion: {result.promotion.decision.outcome} ({result.promotion.decision.reason})" \
        if result.promotion else ""
    state = "newly registered" if result.newly_registered else "already registered"
    print(f"register: {result.model_uri} ({state}) is the challenger{outcome}")
    return 0
