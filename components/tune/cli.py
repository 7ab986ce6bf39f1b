"""``clipmill stage tune``: a Ray Tune sweep of short training runs; writes the best config."""
from __future__ import annotations

import argparse

HELP = "sweep training hyperparameters with Ray Tune (ASHA); write the best config to best_params.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", default="data/curated", help="directory of .tar shards or a brace pattern (default: %(default)s)")
    p.add_argument("--eval-dir", default="data/eval", help="held-out sets the trials are ranked on (default: %(default)s)")
    p.add_argument("--out", default="data/tune", help="output directory: best_params.json, trials.json (default: %(default)s)")


def run(args: argparse.Namespace, params) -> int:
    from components.common.errors import ConfigError
    from components.common.params import section_at
    from components.train.params import TrainParams

    from .tune import run_sweep

    base = section_at(params, params.tune.config_key)
    if not isinstance(base, TrainParams):
        raise ConfigError(f"tune.config_key: '{params.tune.config_key}' is not a training section")
    best = run_sweep(base, params.tune, shards=args.shards, eval_dir=args.eval_dir, out_dir=args.out,
                     seed=params.project.seed, tracking=params.tracking, ray_params=params.ray)
    print(f"tune: best {best['metric']}={best['value']:.4f} with {best['overrides']} -> {args.out}/best_params.json")
    return 0
