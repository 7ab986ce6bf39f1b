"""The curation ablation (``clipmill ablate``): each arm's curated shards, N seeded training runs per arm, one
evaluation suite. It composes the curate and reshard stages and the core library's training engine; the records
(MLflow runs, tables, plot) are ``clipmill.components.ablate.ablation``'s.

In: the curate stage's outputs (``data/curate``: every step's per-shard decisions), the download shards, the
held-out suite, and the whole params (``ablate:``, ``train:``, ``evaluate:``, ``curate.steps``). The arms are cut
from the curation under the ablation's own params: the curate stage's directory is hard-linked into
``<work>/curate`` and the curate stage runs over it with them, so a ``-S`` override of a step's section
(``filter.*``, ``score.*``, ``balance.*``, ``rewrite.*``) redoes that step and the later ones, and with the stage's
own params every shard is found finished (nothing is redone). For each arm
(``clipmill.components.ablate.arms``) the reshard code writes the uids that the arm's steps kept into
``<work>/<arm>/curated``; an "all but X" arm is first curated again without X (``<work>/<arm>/curate``, the
outputs of the steps before X reused through hard links), so the later steps see what X would have dropped.
Every run trains ``ablate.samples_per_epoch`` x ``train.epochs`` samples (equal samples seen), with seed
``train.seed + k``, and is evaluated on the same suite (no plots).

Out (``ablate.out_dir``, written atomically): ``table.md`` (means over seeds, the marginal effects and the whole
funnel's (most steps against raw), with paired class-bootstrap CIs), ``means.csv``, ``effects.csv``, ``runs.csv`` (one
row per arm and seed), ``per_class.csv`` (recall per arm, seed and class), ``arms.csv`` (each arm's steps, samples
and a hash of its uids), ``ablation.json`` and ``ablation.png``. MLflow: one parent run (``ablation``) with one
child run per arm and seed (the training run, with the evaluation's metrics added).

``clipmill ablate --prefect`` runs the same code as a Prefect flow: each arm's shards and each (arm, seed)
training run are tasks.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from clipmill.components.ablate.ablation import (
    Inputs,
    check_out_dir,
    log_outputs,
    log_to_run,
    parent_run,
    progress,
    work_dir,
    write_outputs,
)
from clipmill.components.ablate.arms import Arm, resolve_arms
from clipmill.components.common.curation import STEPS_DIR, UNITS_DIR, step_dir
from clipmill.components.common.errors import ConfigError, InputError
from clipmill.components.common.evalsets import EvalSuite, evaluate_details, load_eval_suite
from clipmill.components.common.model import load_clip
from clipmill.components.common.training.fit import train
from clipmill.components.curate.stage import curate
from clipmill.components.reshard.curated import reshard

# A unit of work: ``call(fn, name, *args)`` runs ``fn(*args)`` (the Prefect flow runs it as a task).
Call = Callable[..., Any]


def _direct(fn: Callable, name: str, *args):
    return fn(*args)


def _quiet(params):
    """``params`` with stage-level MLflow runs off (the reshard and curate calls inside an arm)."""
    return params.model_copy(update={"tracking": params.tracking.model_copy(update={"enabled": False})})


def _link_tree(source: Path, target: Path) -> None:
    """A copy of ``source`` whose files are hard links (the curate stage replaces files, never edits them)."""
    shutil.copytree(source, target, copy_function=os.link, dirs_exist_ok=True)


def curate_again(arm: Arm, params, inputs: Inputs, out: Path) -> Path:
    """The curation of an "all but X" arm in ``out``: the units and the outputs of the steps before X linked from
    the curate stage's directory, then the curate stage over ``arm.steps`` (it redoes only what changed)."""
    if inputs.manifest is None:
        raise ConfigError(f"ablate: arm {arm.name!r} curates again and needs the download manifest (--manifest)")
    left_out = arm.name[1:]
    steps = list(params.curate.steps)
    _link_tree(inputs.curate / UNITS_DIR, out / UNITS_DIR)
    for step in steps[:steps.index(left_out)]:
        _link_tree(step_dir(inputs.curate, step), out / STEPS_DIR / step)
    arm_curate = params.curate.model_copy(update={"steps": list(arm.steps)})
    arm_params = _quiet(params).model_copy(update={"curate": arm_curate})
    extra = {"bootstrap_model": str(inputs.bootstrap_model)} if inputs.bootstrap_model else {}
    curate(inputs.manifest, inputs.shards, out, arm_params, inputs={**extra, "manifest": str(inputs.manifest)})
    return out


def variant_curation(params, inputs: Inputs, out: Path) -> Inputs:
    """``inputs`` whose curation is the curate stage's directory curated again in ``out`` under ``params`` (see
    the module docstring); without a download manifest, the stage's directory as it is."""
    if not (inputs.curate / "summary.json").is_file():
        raise InputError(inputs.curate, "not a finished curation (no summary.json): run the curate stage first "
                                        "(dvc repro curate)")
    if inputs.manifest is None:
        return inputs
    shutil.rmtree(out, ignore_errors=True)  # a work_dir of an earlier ablation
    _link_tree(inputs.curate, out)
    extra = {"bootstrap_model": str(inputs.bootstrap_model)} if inputs.bootstrap_model else {}
    curate(inputs.manifest, inputs.shards, out, _quiet(params), inputs={**extra, "manifest": str(inputs.manifest)})
    return replace(inputs, curate=out)


def build_arm(arm: Arm, params, inputs: Inputs, work: Path) -> dict:
    """The arm's curated shards (``work/curated``) from the curation's per-step decisions, by the reshard code."""
    source = curate_again(arm, params, inputs, work / "curate") if arm.recurate else inputs.curate
    quiet = _quiet(params)
    summary = reshard(source, inputs.shards, work / "curated", params.reshard,
                      params.project.seed + params.reshard.seed_offset, quiet.tracking, list(arm.steps))
    if summary["samples"] == 0:
        raise ConfigError(f"ablate: arm {arm.name!r} ({arm.label}) keeps no samples"
                          + (" (curated again with this ablation's params)" if arm.recurate else ""))
    uids = sorted(pd.read_parquet(work / "curated" / "manifest.parquet", columns=["uid"])["uid"])
    return {"arm": arm.name, "label": arm.label, "steps": " ".join(arm.steps) or "-", "recurated": arm.recurate,
            "baseline": arm.baseline or "", "samples": summary["samples"],
            "uid_hash": hashlib.sha256("\n".join(uids).encode()).hexdigest()[:16], "shards": str(work / "curated")}


def train_and_evaluate(arm: Arm, seed: int, params, shards: Path, out: Path,
                       suite: EvalSuite) -> tuple[dict, pd.DataFrame]:
    """One run of ``arm``: train at the ablation's samples per epoch with ``seed``, evaluate on ``suite``."""
    section = params.train.model_copy(update={"samples_per_epoch": params.ablate.samples_per_epoch, "seed": seed,
                                              "checkpoint_every_n_steps": 0})
    result = train(section, shards=str(shards), out_dir=out, eval_dir=None, seed=seed, tracking=params.tracking,
                   stage=f"ablate:{arm.name}:seed{seed}")
    clip = load_clip(str(out / "model"), device=params.evaluate.device)
    scores = evaluate_details(clip, suite, params.evaluate.batch_size)
    if result.run_id is not None:
        log_to_run(result.run_id, params, scores.metrics, {"clipmill.ablation.arm": arm.name,
                                                            "clipmill.ablation.seed": str(seed)})
    row = {"arm": arm.name, "seed": seed, "run_id": result.run_id or "", "steps": result.steps,
           "samples_seen": result.samples_seen, "wall_time_s": result.wall_time_s, **scores.metrics}
    per_class = scores.per_class.assign(arm=arm.name, seed=seed) if scores.per_class is not None else pd.DataFrame()
    return row, per_class


def ablate(params, inputs: Inputs, call: Call = _direct) -> dict:
    """Run every arm and seed (module doc); returns the summary written to ``ablation.json``."""
    ab = params.ablate
    if not params.train.resampled:
        raise ConfigError("ablate: train.resampled must be true: a small arm's shards run out before "
                          "ablate.samples_per_epoch otherwise, and the arms would not see equal samples")
    arms = resolve_arms(ab.arms, list(params.curate.steps))
    check_out_dir(ab.out_dir)
    suite = load_eval_suite(inputs.eval_dir, params.evaluate.concept_counts, params.evaluate.extra_zeroshot)
    seeds = [(params.train.seed if params.train.seed is not None else params.project.seed) + k for k in range(ab.seeds)]
    work, temporary = work_dir(ab.work_dir)
    started = time.perf_counter()
    built, rows, per_class = [], [], []
    try:
        with parent_run(params, inputs, arms) as run_id:
            inputs = call(variant_curation, "curate", params, inputs, work / "curate")
            for i, arm in enumerate(arms, 1):
                arm_started = time.perf_counter()
                info = call(build_arm, f"build-{arm.name}", arm, params, inputs, work / arm.name)
                built.append(info)
                for seed in seeds:
                    row, classes = call(train_and_evaluate, f"train-{arm.name}-seed{seed}", arm, seed, params,
                                        Path(info["shards"]) / "shards", work / arm.name / f"seed{seed}", suite)
                    rows.append({**row, "arm_samples": info["samples"]})
                    per_class.append(classes)
                progress(i, len(arms), arm, info, rows[-len(seeds):], time.perf_counter() - arm_started)
            summary = write_outputs(params, arms, built, rows, per_class, seeds, run_id,
                                    time.perf_counter() - started)
            if run_id is not None:
                log_outputs(params, run_id, summary)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    return summary


def _as_task(fn: Callable, name: str, *args) -> Any:
    from prefect import task
    from prefect.cache_policies import NONE

    return task(fn, name=fn.__name__, task_run_name=name, cache_policy=NONE)(*args)


def ablation_flow(params, inputs: Inputs) -> dict:
    """``ablate(params, inputs)`` as the Prefect flow ``clipmill-ablate``, each unit of work a task (Prefect is
    imported here: the plain command does not load it)."""
    from prefect import flow

    def clipmill_ablate(params, inputs) -> dict:
        return ablate(params, inputs, call=_as_task)

    return flow(clipmill_ablate, name="clipmill-ablate", log_prints=True)(params=params, inputs=inputs)

