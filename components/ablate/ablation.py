"""The curation ablation's records: its inputs, the MLflow parent run (and the evaluation's metrics added to each
child training run), the progress lines, and the output files.

The ablation itself composes the curate, reshard and train stages, so it lives with the other compositions of
stages: ``pipelines/ablate.py`` (``clipmill ablate``), which describes the runs and their outputs.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from clipmill.components.common.curation import STEPS_DIR
from clipmill.components.common.io import atomic_path, check_replaceable, mark_output, output_owner, write_json
from clipmill.components.common.log import get_logger
from clipmill.components.common.tracking import PARENT_RUN_ENV, lineage_tags, tracking_uri, use_experiment

from . import report, stats
from .arms import Arm

log = get_logger("ablate")

ABLATE_OWNER = "ablate"
ABLATION_FILES = ("table.md", "means.csv", "effects.csv", "runs.csv", "per_class.csv", "arms.csv", "ablation.json",
                  "ablation.png")


@dataclass
class Inputs:
    curate: Path                      # the curate stage's directory
    shards: Path                      # the download shards
    eval_dir: Path                    # the held-out suite
    manifest: Path | None = None      # the download manifest: "all but" arms curate again
    bootstrap_model: Path | None = None
    logged: dict[str, Any] = field(default_factory=dict)  # -S overrides and tuned values, logged as params


def log_to_run(run_id: str, params, metrics: dict[str, float], tags: dict[str, str]) -> None:
    """``metrics`` and ``tags`` added to a finished run (a training run, with its evaluation's metrics)."""
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


def check_out_dir(out_dir: str) -> None:
    """Refuse, before any training, an ``ablate.out_dir`` that the results could not replace: a file, or a
    directory that is not an ablation's. One that holds only the files an ablation writes, from before outputs
    were marked, is taken as the ablation's."""
    path = Path(out_dir)
    if path.is_dir() and not path.is_symlink() and output_owner(path) is None and any(path.iterdir()) \
            and {p.name for p in path.iterdir()} <= set(ABLATION_FILES):
        mark_output(path, ABLATE_OWNER)
    check_replaceable(path, ABLATE_OWNER)


def work_dir(configured: str | None) -> tuple[Path, bool]:
    """(the work directory, whether to remove it at the end)."""
    if configured:
        Path(configured).mkdir(parents=True, exist_ok=True)
        return Path(configured), False
    return Path(tempfile.mkdtemp(prefix="clipmill-ablate-")), True


def progress(i: int, n: int, arm: Arm, info: dict, rows: list[dict], seconds: float) -> None:
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
    # the suite's attribute accuracies (e.g. the colour and the shape of a class) come with the chosen metrics
    metrics = ab.metrics + sorted(c for c in runs.columns if c.startswith("zeroshot/acc1_") and c not in ab.metrics)
    means = stats.means_table(runs, arms, metrics)
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
    with atomic_path(ab.out_dir, owner=ABLATE_OWNER) as tmp:
        tmp.mkdir()
        (tmp / "table.md").write_text(report.markdown(means, effects, metrics, facts, ab.confidence))
        means.to_csv(tmp / "means.csv", index=False)
        effects.to_csv(tmp / "effects.csv", index=False)
        runs.to_csv(tmp / "runs.csv", index=False)
        classes.to_csv(tmp / "per_class.csv", index=False)
        pd.DataFrame(built).drop(columns="shards").to_csv(tmp / "arms.csv", index=False)
        write_json(summary, tmp / "ablation.json")
        report.plot(means, effects, metrics, tmp / "ablation.png")
    print((Path(ab.out_dir) / "table.md").read_text(), flush=True)
    return summary


def log_outputs(params, run_id: str, summary: dict) -> None:
    """The output files and the wall time, on the parent run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(params.tracking))
    client.log_artifacts(run_id, params.ablate.out_dir, "ablation")
    client.log_metric(run_id, "wall_time_s", summary["wall_time_s"])
