"""``clipmill ablate``: train and evaluate the curation funnel cut after each step (the ablation of
``pipelines/ablate.py``, directly or as its Prefect flow)."""
from __future__ import annotations

import argparse

from clipmill.components.common.layout import add_path_option, resolve_paths

HELP = ("curation ablation: each arm (raw, the funnel cut after a step, all but a step) resharded from the "
        "curate stage's decisions, trained with N seeds at equal samples seen, evaluated -> reports/ablation/")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_path_option(parser, "ablate", "curate", "the curate stage's directory (input)")
    add_path_option(parser, "ablate", "shards", "download shards directory (input)")
    add_path_option(parser, "ablate", "manifest",
                    "download manifest, for the arms that curate again without a step (input)")
    add_path_option(parser, "ablate", "bootstrap-model",
                    "bootstrap filtering network, for arms that curate again (input)")
    add_path_option(parser, "ablate", "eval-dir", "held-out suite (input)")
    parser.add_argument("--out", default=None, help="reports directory (default: ablate.out_dir)")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this ablation, e.g. -S ablate.seeds=3 -S train.epochs=2 "
                             "(as `dvc exp run -S`; repeatable; logged as override.<key>)")
    parser.add_argument("--best-params", default=None, metavar="FILE",
                        help="apply the tuned values of a tune stage's best_params.json to train: (logged as "
                             "tuned.<key>; without this option no tuned value is applied)")
    parser.add_argument("--prefect", action="store_true",
                        help="run as a Prefect flow (each arm and each training run a task)")


def run(args: argparse.Namespace, params) -> int:
    from pathlib import Path

    from clipmill.components.ablate.ablation import Inputs
    from clipmill.components.ablate.variants import load_variant

    overrides = list(args.overrides) + ([f"ablate.out_dir={args.out}"] if args.out else [])
    params, changed = load_variant(args.params, overrides, args.best_params)
    args = resolve_paths(args, params, "ablate")
    for key, value in changed.items():
        print(f"ablate: {key} = {value}", flush=True)
    inputs = Inputs(Path(args.curate), Path(args.shards), Path(args.eval_dir), Path(args.manifest),
                    Path(args.bootstrap_model) if args.bootstrap_model else None, logged=changed)
    if args.prefect:
        from .ablate import ablation_flow

        ablation_flow(params=params, inputs=inputs)
    else:
        from .ablate import ablate

        ablate(params, inputs)
    return 0


def register(subparsers, add_params_option) -> None:
    p = subparsers.add_parser("ablate", help=HELP, description=HELP)
    add_params_option(p)
    add_arguments(p)
    p.set_defaults(handler=run, needs_params=True)
