"""``clipmill ablate`` (also ``clipmill stage ablate``): train and evaluate the curation funnel cut after each step."""
from __future__ import annotations

import argparse

HELP = ("curation ablation: each arm (raw, the funnel cut after a step, all but a step) resharded from the "
        "curate stage's decisions, trained with N seeds at equal samples seen, evaluated -> reports/ablation/")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--curate", default="data/curate", help="the curate stage's directory (input)")
    parser.add_argument("--shards", default="data/download/shards", help="download shards directory (input)")
    parser.add_argument("--manifest", default="data/download/manifest.parquet",
                        help="download manifest, for the arms that curate again without a step (input)")
    parser.add_argument("--bootstrap-model", default="data/scorer/model",
                        help="bootstrap filtering network, for arms that curate again (input)")
    parser.add_argument("--eval-dir", default="data/eval", help="held-out suite (input)")
    parser.add_argument("--out", default=None, help="reports directory (default: ablate.out_dir)")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this ablation, e.g. -S ablate.seeds=3 -S train.epochs=2 "
                             "(as `dvc exp run -S`; repeatable; logged as override.<key>)")
    parser.add_argument("--best-params", default=None, metavar="FILE",
                        help="apply the tuned values of a tune stage's best_params.json to train: (logged as "
                             "tuned.<key>; without this option no tuned value is applied)")
    parser.add_argument("--prefect", action="store_true", help="run as the Prefect flow of pipelines/ablate.py")


def run(args: argparse.Namespace, params) -> int:
    from pathlib import Path

    from .ablation import Inputs
    from .variants import load_variant

    overrides = list(args.overrides) + ([f"ablate.out_dir={args.out}"] if args.out else [])
    params, changed = load_variant(args.params, overrides, args.best_params)
    for key, value in changed.items():
        print(f"ablate: {key} = {value}", flush=True)
    inputs = Inputs(Path(args.curate), Path(args.shards), Path(args.eval_dir), Path(args.manifest),
                    Path(args.bootstrap_model) if args.bootstrap_model else None, logged=changed)
    if args.prefect:
        from pipelines.ablate import ablation_flow

        ablation_flow(params=params, inputs=inputs)
    else:
        from .ablation import ablate

        ablate(params, inputs)
    return 0


def register(subparsers, add_params_option) -> None:
    p = subparsers.add_parser("ablate", help=HELP, description=HELP)
    add_params_option(p)
    add_arguments(p)
    p.set_defaults(handler=run, needs_params=True)
