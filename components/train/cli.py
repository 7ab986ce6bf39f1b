"""``clipmill stage train``: train a model on shards, validate on the held-out sets, export it."""
from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import ValidationError

from clipmill.components.common.errors import ConfigError, InputError
from clipmill.components.common.io import read_json
from clipmill.components.common.layout import add_path_option, resolve_paths
from clipmill.components.common.log import get_logger
from clipmill.components.common.params import section_at
from clipmill.components.common.training.params import TrainParams

HELP = "train a CLIP-style model (Lightning over open_clip) on webdataset shards and export it (open_clip local-dir)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_path_option(p, "train", "shards", "directory of .tar shards or a brace pattern")
    add_path_option(p, "train", "eval-dir", "held-out sets for in-loop validation; '' disables it")
    add_path_option(p, "train", "out", "output directory")
    add_path_option(p, "train", "best-params",
                    "tuned values applied over the section when the file exists and was tuned for it", metavar="FILE")
    p.add_argument("--warm-start", default=None, metavar="FILE",
                   help="warm_start.yaml: when it names a model, train from it with the continual: section "
                        "(default: none, from scratch)")
    p.add_argument("--config-key", default="train", metavar="KEY",
                   help="dotted params.yaml key of the TrainParams section to use, e.g. score.bootstrap "
                        "(default: %(default)s)")


def resolve_section(params: object, key: str) -> TrainParams:
    """The ``TrainParams`` section at dotted ``key`` of the loaded params."""
    section = section_at(params, key)
    if not isinstance(section, TrainParams):
        raise ConfigError(f"params: '{key}' is not a training section ({type(section).__name__})")
    return section


def apply_best_params(section: TrainParams, path: str | None, key: str) -> TrainParams:
    """``section`` with the tuned ``overrides`` of ``path`` applied, when the file exists and was tuned for ``key``."""
    if not path or not Path(path).is_file():
        return section
    best = read_json(path)
    if not isinstance(best, dict) or not isinstance(best.get("overrides"), dict):
        raise InputError(path, "expected an object with an 'overrides' mapping", field="overrides")
    if not isinstance(best.get("config_key"), str):
        raise InputError(path, "missing: the training section the values were tuned for (as tune writes it)",
                         field="config_key")
    if best["config_key"] != key:
        get_logger("train").warning("%s: tuned for %s, not applied to %s", path, best["config_key"], key)
        return section
    try:
        return TrainParams.model_validate({**section.model_dump(), **best["overrides"]})
    except ValidationError as e:
        err = e.errors()[0]
        raise InputError(path, f"{err['msg']} (got {err.get('input')!r})",
                         field="overrides." + ".".join(map(str, err["loc"]))) from None


def run(args: argparse.Namespace, params) -> int:
    from clipmill.components.common.io import check_stage_dir
    from clipmill.components.common.log import get_logger
    from clipmill.components.common.tracking import tracking_uri
    from clipmill.components.common.training.fit import OUTPUT_ENTRIES, train

    from .warm_start import continual_section, read_warm_start, warm_start_weights

    log = get_logger("train")
    args = resolve_paths(args, params, "train")
    check_stage_dir(args.out, "a training output", OUTPUT_ENTRIES)  # before anything is written there
    base = resolve_section(params, args.config_key)
    warm = read_warm_start(args.warm_start)
    if warm.init_from:
        section = continual_section(base, params.continual, warm)
        log.info("warm start from %s (loss %s): continual schedule %s, lr %g, %d epochs; tuned values are not "
                 "applied to a warm start", warm.init_from, section.loss, section.schedule, section.lr, section.epochs)
    else:
        section = apply_best_params(base, args.best_params, args.config_key)
        if section != base:
            log.info("applied tuned params from %s", args.best_params)
    stage = "train" if args.config_key == "train" else f"train[{args.config_key}]"
    with warm_start_weights(warm, args.warm_start or ".", tracking_uri(params.tracking)) as weights:
        result = train(section, shards=args.shards, out_dir=args.out, eval_dir=args.eval_dir or None,
                       seed=params.project.seed if section.seed is None else section.seed,
                       tracking=params.tracking, stage=stage, init_weights=weights)
    metrics = ", ".join(f"{k}={v:.3f}" for k, v in result.metrics.items() if k != "step")
    print(f"train: {result.steps} steps, {result.samples_seen} samples, {result.wall_time_s:.1f} s -> {args.out}/model"
          + (f" ({metrics})" if metrics else ""))
    return 0
