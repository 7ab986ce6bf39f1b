"""``clipmill stage register``: register the trained model as ``challenger`` and apply the promotion policy."""
from __future__ import annotations

import argparse

from clipmill.components.common.layout import add_path_option, resolve_paths

HELP = "register the trained model in the MLflow registry (alias challenger) and apply the promotion policy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_path_option(parser, "register", "model", "local-dir export of the trained model (input)")
    add_path_option(parser, "register", "metrics", "its evaluation record (input)")
    add_path_option(parser, "register", "train-run", "training run.json: MLflow run id (input)")
    add_path_option(parser, "register", "curated", "curated training data, hashed for lineage (input)")
    add_path_option(parser, "register", "download-summary",
                    "the download's summary.json: the crawl's URL lists, recorded on the version (input)")
    add_path_option(parser, "register", "eval-dir",
                    "evaluation suite, to re-evaluate a champion measured on another suite version (input)")
    add_path_option(parser, "register", "out", "registration.json (output)")
    add_path_option(parser, "register", "reports", "promotion.md (output)")


def run(args: argparse.Namespace, params) -> int:
    from .register import register  # torch and mlflow load only when the stage runs

    args = resolve_paths(args, params, "register")
    result = register(args.model, args.metrics, args.eval_dir, args.out, args.reports,
                      params=params.register, tracking=params.tracking, pipeline_params=params,
                      train_run_file=args.train_run, curated_dir=args.curated,
                      download_summary=args.download_summary or None,
                      eval_batch_size=params.evaluate.batch_size, eval_device=params.evaluate.device)
    outcome = f"; promotion: {result.promotion.decision.outcome} ({result.promotion.decision.reason})" \
        if result.promotion else ""
    state = "newly registered" if result.newly_registered else "already registered"
    print(f"register: {result.model_uri} ({state}) is the challenger{outcome}")
    return 0
