"""``clipmill stage tune``: a Ray Tune sweep of short training runs; writes the best config."""
from __future__ import annotations

import argparse

from clipmill.components.common.layout import add_path_option, resolve_paths

HELP = "sweep training hyperparameters with Ray Tune (ASHA); write the best config to best_params.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_path_option(p, "tune", "shards", "directory of .tar shards or a brace pattern")
    add_path_option(p, "tune", "eval-dir", "held-out sets the trials are ranked on")
    add_path_option(p, "tune", "out", "output directory: best_params.json, trials.json")


def run(args: argparse.Namespace, params) -> int:
    from clipmill.components.common.errors import ConfigError
    from clipmill.components.common.params import section_at
    from clipmill.components.common.training.params import TrainParams

    from .tune import run_sweep

    args = resolve_paths(args, params, "tune")
    base = section_at(params, params.tune.config_key)
    if not isinstance(base, TrainParams):
        raise ConfigError(f"tune.config_key: '{params.tune.config_key}' is not a training section")
    best = run_sweep(base, params.tune, shards=args.shards, eval_dir=args.eval_dir, out_dir=args.out,
                     seed=params.project.seed, tracking=params.tracking, ray_params=params.ray)
    print(f"tune: best {best['metric']}={best['value']:.4f} with {best['overrides']} -> {args.out}/best_params.json")
    return 0
