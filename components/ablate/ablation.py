"""The curation ablation: each arm's curated shards, N seeded training runs per arm, one evaluation suite.

In: the curate stage's outputs (``data/curate``: every step's per-shard decisions), the download shards, the
held-out suite, and the whole params (``ablate:``, ``train:``, ``evaluate:``, ``curate.steps``). For each arm
(``components.ablate.arms``) the reshard code writes the uids that the arm's steps kept into
``<work>/<arm>/curated``; an "all but X" arm is first curated again without X (``<work>/<arm>/curate``, the
outputs of the steps before X reused through hard links), so the later steps see what X would have dropped.
Every run trains ``ablate.samples_per_epoch`` x ``train.epochs`` samples (equal samples seen), with seed
``train.seed + k``, and is evaluated on the same suite (no plots).

Out (``ablate.out_dir``, written atomically): ``table.md`` (means over seeds and the marginal effects with
paired class-bootstrap CIs), ``means.csv``, ``effects.csv``, ``runs.csv`` (one row per arm and seed),
``per_class.csv`` (recall per arm, seed and class), ``arms.csv`` (each arm's steps, samples and a hash of its
uids), ``ablation.json`` and ``ablation.png``. MLflow: one parent run (``ablation``) with one child run per arm
and seed (the training run, with the evaluation's metrics added).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd

from components.common.curation import STEPS_DIR, UNITS_DIR, step_dir
from components.common.errors import ConfigError
from components.common.evalsets import EvalSuite, evaluate_details, load_eval_suite
from components.common.io import atomic_path, write_json
from components.common.log import get_logger
from components.common.tracking import PARENT_RUN_ENV, lineage_tags, tracking_uri, use_experiment

from . import report, stats
from .arms import Arm, resolve_arms

log = get_logger("ablate")

# A unit of work: ``call(fn, name, *args)`` runs ``fn(*args)`` (the Prefect flow runs it as a task).
Call = Callable[..., Any]


def _direct(fn: Callable, name: str, *args):
    return fn(*args)


@dataclass
class Inputs:
    curate: Path                      # the curate stage's directory
    shards: Path                      # the download shards
    eval_dir: Path                    # the held-out suite
    manifest: Path | None = None      # the download manifest: "all but" arms curate again
    bootstrap_model: Path | None = None
    logged: dict[str, Any] = field(default_factory=dict)  # -S overrides and tuned values, logged as params


def _quiet(params):
    """``params`` with stage-level MLflow runs off (the reshard and curate calls inside an arm)."""
    return params.model_copy(update={"tracking": params.tracking.model_copy(update={"enabled": False})})


def _link_tree(source: Path, target: Path) -> None:
    """A copy of ``source`` whose files are hard links (the curate stage replaces files, never edits them)."""
    shutil.copytree(source, target, copy_function=os.link, dirs_exist_ok=True)


def curate_again(arm: Arm, params, inputs: Inputs, out: Path) -> Path:
    """The curation of an "all but X" arm in ``out``: the units and the outputs of the steps before X linked from
    the curate stage's directory, then the curate stage over ``arm.steps`` (it redoes only what changed)."""
    from components.curate.stage import curate

    if inputs.manifest is None:
        raise ConfigError(f"ablate: arm {arm.name!r} curates again and needs the download manifest (--manifest)")
    left_out = arm.name[1:]
    steps = list(params.curate.steps)
    _link_tree(inputs.curate / UNITS_DIR, out / UNITS_DIR)
    for step in steps[:steps.index(left_out)]:
        _link_tree(step_dir(inputs.curate, step), out / STEPS_DIR / step)
    arm_params = _quiet(params).model_copy(update={"curate": params.curate.model_copy(update={"steps": list(arm.steps)})})
    extra = {"bootstrap_model": str(inputs.bootstrap_model)} if inputs.bootstrap_model else {}
    curate(inputs.manifest, inputs.shards, out, arm_params, inputs={**extra, "manifest": str(inputs.manifest)})
    return out


def build_arm(arm: Arm, params, inputs: Inputs, work: Path) -> dict:
    """The arm's curated shards (``work/curated``) from the curation's per-step decisions, by the reshard code."""
    from components.reshard.curated import reshard

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


def train_and_evaluate(arm: Arm, seed: int, params, shards: Path, out: Path, suite: EvalSuite) -> tuple[dict, pd.DataFrame]:
    """One run of ``arm``: train at the ablation's samples per epoch with ``seed``, evaluate on ``suite``."""
    from components.common.model import load_clip
    from components.train.train import train

    section = params.train.model_copy(update={"samples_per_epoch": params.ablate.samples_per_epoch, "seed": seed,
                                              "checkpoint_every_n_steps": 0})
    result = train(section, shards=str(shards), out_dir=out, eval_dir=None, seed=seed, tracking=params.tracking,
                   stage=f"ablate:{arm.name}:seed{seed}")
    clip = load_clip(str(out / "model"), device=params.evaluate.device)
    scores = evaluate_details(clip, suite, params.evaluate.batch_size)
    if result.run_id is not None:
        _log_to_run(result.run_id, params, scores.metrics, {"clipmill.ablation.arm": arm.name,
                                                            "clipmill.ablation.seed": str(seed)})
    row = {"arm": arm.name, "seed": seed, "run_id": result.run_id or "", "steps": result.steps,
           "samples_seen": result.samples_seen, "wall_time_s": result.wall_time_s, **scores.metrics}
    per_class = scores.per_class.assign(arm=arm.name, seed=seed) if scores.per_class is not None else pd.DataFrame()
    return row, per_class


def _log_to_run(run_id: str, params, metrics: dict[str, float], tags: dict[str, str]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    MlflowClient(tracking_uri(params.tracking)).log_batch(
        run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        tags=[RunTag(k, v) for k, v in tags.items()])


@contextmanager
def parent_run(params, inputs: Inputs, arms: list[Arm]) -> Iterator[str | None]:
    """The MLflow parent run; training runs started inside are its children (``CLIPMILL_PARENT_RUN_ID``)."""
    if not params.tracking.enabled:
        yield None
        return
    from mlflow import MlflowClient

    experiment = use_experiment(params.tracking)
    client = MlflowClient(tracking_uri(params.tracking))
    tags = {"clipmill.stage": "ablate", "clipmill.ablation.arms": ",".join(a.name for a in arms),
            **lineage_tags(params.ablate, [inputs.curate / STEPS_DIR])}
    run = client.create_run(experiment, run_name="ablation", tags=tags)
    run_id = run.info.run_id
    logged = {f"ablate.{k}": v for k, v in params.ablate.model_dump(mode="json").items()}
    logged.update({"train.seed": params.train.seed, "train.epochs": params.train.epochs,
                   "curate.steps": " ".join(params.curate.steps), **inputs.logged})
    for key, value in logged.items():
        client.log_param(run_id, key, str(value)[:6000])
    before = os.environ.get(PARENT_RUN_ENV)
    os.environ[PARENT_RUN_ENV] = run_id
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        if before is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = before
        client.set_terminated(run_id, status)


def _work_dir(configured: str | None) -> tuple[Path, bool]:
    """(the work directory, whether to remove it at the end)."""
    if configured:
        Path(configured).mkdir(parents=True, exist_ok=True)
        return Path(configured), False
    return Path(tempfile.mkdtemp(prefix="clipmill-ablate-")), True


def ablate(params, inputs: Inputs, call: Call = _direct) -> dict:
    """Run every arm and seed (module doc); returns the summary written to ``ablation.json``."""
    ab = params.ablate
    if not params.train.resampled:
        raise ConfigError("ablate: train.resampled must be true: a small arm's shards run out before "
                          "ablate.samples_per_epoch otherwise, and the arms would not see equal samples")
    arms = resolve_arms(ab.arms, list(params.curate.steps))
    suite = load_eval_suite(inputs.eval_dir, params.evaluate.concept_counts, params.evaluate.extra_zeroshot)
    seeds = [(params.train.seed if params.train.seed is not None else params.project.seed) + k for k in range(ab.seeds)]
    work, temporary = _work_dir(ab.work_dir)
    started = time.perf_counter()
    built, rows, per_class = [], [], []
    try:
        with parent_run(params, inputs, arms) as run_id:
            for i, arm in enumerate(arms, 1):
                arm_started = time.perf_counter()
                info = call(build_arm, f"build-{arm.name}", arm, params, inputs, work / arm.name)
                built.append(info)
                for seed in seeds:
                    row, classes = call(train_and_evaluate, f"train-{arm.name}-seed{seed}", arm, seed, params,
                                        Path(info["shards"]) / "shards", work / arm.name / f"seed{seed}", suite)
                    rows.append({**row, "arm_samples": info["samples"]})
                    per_class.append(classes)
                _progress(i, len(arms), arm, info, rows[-len(seeds):], time.perf_counter() - arm_started)
            summary = write_outputs(params, arms, built, rows, per_class, seeds, run_id,
                                    time.perf_counter() - started)
            if run_id is not None:
                _log_outputs(params, run_id, summary)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    return summary


def _progress(i: int, n: int, arm: Arm, info: dict, rows: list[dict], seconds: float) -> None:
    acc = pd.Series([r.get("zeroshot/acc1", float("nan")) for r in rows])
    tail = pd.Series([r.get("zeroshot/recall_tail", float("nan")) for r in rows])
    line = (f"ablate: arm {i}/{n} {arm.name} ({arm.label}): {info['samples']} samples, {len(rows)} seeds x "
            f"{rows[0]['samples_seen']} samples seen, acc1 {acc.mean():.3f} ± {acc.std(ddof=0):.3f}"
            + (f", tail recall {tail.mean():.3f}" if tail.notna().any() else "") + f", {seconds:.0f} s")
    log.info(line)
    print(line, flush=True)


def write_outputs(params, arms: list[Arm], built: list[dict], rows: list[dict], per_class: list[pd.DataFrame],
                  seeds: list[int], run_id: str | None, seconds: float) -> dict:
    ab = params.ablate
    runs = pd.DataFrame(rows)
    classes = pd.concat(per_class, ignore_index=True)
    means = stats.means_table(runs, arms, ab.metrics)
    effects = (stats.effects_table(classes, arms, ab.bootstrap, ab.confidence, params.project.seed)
               if len(classes) else pd.DataFrame())
    facts = {"Arms": ", ".join(f"{a.name} ({a.label})" for a in arms),
             "Seeds": ", ".join(map(str, seeds)) + " (train.seed + k)",
             "Samples seen per run": f"{int(runs['samples_seen'].iloc[0])} (ablate.samples_per_epoch "
                                     f"{ab.samples_per_epoch} x train.epochs {params.train.epochs})",
             "Wall time": f"{seconds:.0f} s", "MLflow parent run": run_id or "tracking off"}
    summary = {"arms": built, "seeds": seeds, "samples_per_epoch": ab.samples_per_epoch, "epochs": params.train.epochs,
               "wall_time_s": round(seconds, 1), "mlflow_parent_run": run_id,
               "means": means.to_dict(orient="records"), "effects": effects.to_dict(orient="records")}
    with atomic_path(ab.out_dir) as tmp:
        tmp.mkdir()
        (tmp / "table.md").write_text(report.markdown(means, effects, ab.metrics, facts, ab.confidence))
        means.to_csv(tmp / "means.csv", index=False)
        effects.to_csv(tmp / "effects.csv", index=False)
        runs.to_csv(tmp / "runs.csv", index=False)
        classes.to_csv(tmp / "per_class.csv", index=False)
        pd.DataFrame(built).drop(columns="shards").to_csv(tmp / "arms.csv", index=False)
        write_json(summary, tmp / "ablation.json")
        report.plot(means, effects, ab.metrics, tmp / "ablation.png")
    print((Path(ab.out_dir) / "table.md").read_text(), flush=True)
    return summary


def _log_outputs(params, run_id: str, summary: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(params.tracking))
    client.log_artifacts(run_id, params.ablate.out_dir, "ablation")
    client.log_metric(run_id, "wall_time_s", summary["wall_time_s"])
