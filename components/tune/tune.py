"""A Ray Tune sweep over short training runs; the best configuration goes to ``best_params.json``.

Each trial is a training run (``clipmill.components.common.training.fit.train``) of ``steps_per_trial`` steps that
validates and calls ``ray.tune.report`` every ``report_every_n_steps``; ASHA stops weak trials at those reports. Every
trial is an MLflow child run of the sweep's run. ``best_params.json``:
``{"config_key": "train", "overrides": {lr, weight_decay, warmup_steps, batch_size, loss}, "metric": ...,
"value": ..., "trial": ...}``; ``clipmill stage train`` applies the overrides over the section named by
``config_key``. ``trials.json`` lists every trial (by its number) with its config, last report and status.
``run.json`` names this run's trials: Ray's trial ids and their MLflow runs (they differ in every run, so they are
kept apart from the results).
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from clipmill.components.common.engine import GPU_IF_AVAILABLE, check_fits, ray_session, resolve_gpus
from clipmill.components.common.errors import ClipmillError
from clipmill.components.common.io import check_stage_dir, write_json
from clipmill.components.common.log import get_logger
from clipmill.components.common.params import RayParams, TrackingParams
from clipmill.components.common.tracking import PARENT_RUN_ENV, stage_run, tracking_uri
from clipmill.components.common.training.params import TrainParams

from .params import SearchSpace, TuneParams

log = get_logger("tune")
STOPPED_TAG = "clipmill.stopped_by_scheduler"  # on the MLflow run of a trial stopped before its last step

TUNED_KEYS = tuple(SearchSpace.model_fields)
OUTPUT_FILES = ("best_params.json", "trials.json", "run.json")  # what a sweep writes into its out_dir


def search_space(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    return {
        "lr": tune.loguniform(*space.lr),
        "weight_decay": tune.loguniform(*space.weight_decay),
        "warmup_steps": tune.choice(space.warmup_steps),
        "batch_size": tune.choice(space.batch_size),
        "loss": tune.choice(space.loss),
    }


def trial_params(base: TrainParams, tune_params: TuneParams, config: dict[str, Any]) -> TrainParams:
    """``base`` with the trial's sampled values and a short, checkpoint-free schedule."""
    return TrainParams.model_validate({
        **base.model_dump(), **{k: config[k] for k in TUNED_KEYS},
        "max_steps": tune_params.steps_per_trial, "epochs": max(base.epochs, tune_params.steps_per_trial),
        "val_every_n_steps": tune_params.report_every_n_steps, "checkpoint_every_n_steps": 0, "resume": False,
        "num_workers": tune_params.trial_num_workers,
    })


def run_trial(config: dict[str, Any], *, base: dict, tune_params: dict, shards: str, eval_dir: str, seed: int,
              tracking: dict, parent_run_id: str | None, cwd: str) -> None:
    """Ray Tune function trainable: one short training run reporting its validation metrics."""
    import mlflow
    from ray import tune

    from clipmill.components.common.training.fit import train

    if os.path.isdir(cwd):  # lineage tags read git and dvc.lock from the repository (absent on other nodes)
        os.chdir(cwd)
    if parent_run_id:
        os.environ[PARENT_RUN_ENV] = parent_run_id
    params = trial_params(TrainParams.model_validate(base), TuneParams.model_validate(tune_params), config)

    reported: dict[str, Any] = {}

    def report(step: int, metrics: dict[str, float]) -> None:
        run = mlflow.active_run()
        reported.update(step=step, run_id=run.info.run_id if run else None)
        tune.report({**metrics, "step": step, "mlflow_run_id": reported["run_id"] or ""})

    with tempfile.TemporaryDirectory(prefix="clipmill-trial-") as out:
        try:
            train(params, shards=shards, out_dir=out, eval_dir=eval_dir, seed=seed,
                  tracking=TrackingParams.model_validate(tracking), stage="tune-trial", validation_listeners=[report])
        except SystemExit:  # how Ray ends a trial it stops, in its report: Lightning has marked the run FAILED
            if reported.get("run_id"):  # at the time Lightning ended it
                client = mlflow.MlflowClient()
                end_trial_run(client, reported["run_id"], reported["step"], params.max_steps,
                              end_time=client.get_run(reported["run_id"]).info.end_time)
            raise


def end_trial_run(client: Any, run_id: str, step: int, max_steps: int, end_time: int | None = None) -> None:
    """End a trial's MLflow run that Ray stopped at a report: FINISHED when that was its last step, else KILLED and
    tagged ``STOPPED_TAG`` (the scheduler stopped it early)."""
    stopped = step < max_steps
    if stopped:
        client.set_tag(run_id, STOPPED_TAG, "true")
    client.set_terminated(run_id, status="KILLED" if stopped else "FINISHED", end_time=end_time)


def trial_resources(tune_params: TuneParams, base: TrainParams, cluster: dict[str, float]) -> dict[str, float]:
    """The Tune resources of one trial, checked against ``cluster`` (``ray.cluster_resources()``): gpus_per_trial
    auto is one GPU on a cluster with GPUs (unless the trained section runs on cpu). A trial larger than the
    cluster is a ConfigError here; Ray Tune would leave it pending for ever."""
    gpus = tune_params.gpus_per_trial
    if gpus == GPU_IF_AVAILABLE and base.accelerator == "cpu":
        gpus = 0.0
    resources = {"cpu": tune_params.cpus_per_trial, "gpu": resolve_gpus(gpus, cluster)}
    check_fits(resources, cluster, "tune: a trial (tune.cpus_per_trial, tune.gpus_per_trial)")
    return resources


def run_sweep(base: TrainParams, tune_params: TuneParams, *, shards: str, eval_dir: str, out_dir: str | os.PathLike,
              seed: int, tracking: TrackingParams, ray_params: RayParams) -> dict[str, Any]:
    """Run the sweep; write ``best_params.json``, ``trials.json`` and ``run.json`` to ``out_dir``; return the best
    entry."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from clipmill.components.common.training.data import scan_shards

    out_dir = Path(out_dir)
    check_stage_dir(out_dir, "a sweep's output", OUTPUT_FILES)
    shard_set = scan_shards(shards)  # bad input fails here, before Ray starts
    reports = tune_params.steps_per_trial // tune_params.report_every_n_steps
    uri = tracking_uri(tracking)
    with stage_run("tune", tracking, tune_params, shard_set.paths) as run:
        with ray_session(ray_params, env_vars={"RAY_CHDIR_TO_TRIAL_DIR": "0", "MLFLOW_TRACKING_URI": uri},
                         object_store_mb=tune_params.object_store_mb):
            resources = trial_resources(tune_params, base, ray.cluster_resources())
            trainable = tune.with_resources(
                tune.with_parameters(
                    run_trial, base=base.model_dump(mode="json"), tune_params=tune_params.model_dump(mode="json"),
                    shards=str(Path(shards).resolve()), eval_dir=str(Path(eval_dir).resolve()), seed=seed,
                    tracking={**tracking.model_dump(), "tracking_uri": uri},
                    parent_run_id=run.info.run_id if run else None, cwd=os.getcwd()),
                resources)
            with tempfile.TemporaryDirectory(prefix="clipmill-tune-") as storage:
                tuner = tune.Tuner(
                    trainable, param_space=search_space(tune_params.search_space),
                    tune_config=tune.TuneConfig(
                        metric=tune_params.metric, mode=tune_params.mode, num_samples=tune_params.trials,
                        scheduler=ASHAScheduler(max_t=reports, grace_period=min(tune_params.grace_period, reports),
                                                reduction_factor=tune_params.reduction_factor),
                        # the generator itself limits the trials at once: Ray ignores TuneConfig's
                        # max_concurrent_trials when the search algorithm is a generator (it only warns)
                        search_alg=BasicVariantGenerator(random_state=seed,
                                                         max_concurrent=tune_params.max_concurrent_trials or 0)),
                    run_config=tune.RunConfig(name="tune", storage_path=storage, verbose=0))
                results = tuner.fit()
                trials = sorted((_trial_entry(r, tune_params.metric) for r in results), key=lambda t: t["trial"])
        if run is not None:
            end_open_runs(uri, results, tune_params.steps_per_trial)
        best = _best(trials, tune_params)
        best["config_key"] = tune_params.config_key
        names = [{k: t.pop(k) for k in RUN_KEYS} | {"trial": t["trial"]} for t in trials]
        write_json({"best_trial": best.pop("trial_id"), "best_mlflow_run_id": best.pop("mlflow_run_id"),
                    "trials": names}, out_dir / "run.json")
        write_json(trials, out_dir / "trials.json")
        write_json(best, out_dir / "best_params.json")
        if run is not None:
            import mlflow

            mlflow.log_metric(f"best/{tune_params.metric}", best["value"])
            mlflow.log_params({f"best.{k}": v for k, v in best["overrides"].items()})
            for name in ("best_params.json", "trials.json", "run.json"):
                mlflow.log_artifact(str(out_dir / name))
    log.info("best of %d trials: %s=%.4f with %s", len(trials), tune_params.metric, best["value"], best["overrides"])
    return best


# What names a trial in this run only (Ray's trial id has a random prefix; MLflow run ids are new every run).
RUN_KEYS = ("trial_id", "mlflow_run_id")


def _trial_entry(result: Any, metric: str) -> dict[str, Any]:
    last = result.metrics or {}
    value = last.get(metric)
    trial_id = last.get("trial_id") or Path(result.path).name
    return {
        "trial": int(trial_id.rsplit("_", 1)[-1]),  # the trial's number in the search (Ray's id adds a run prefix)
        "trial_id": trial_id,
        "overrides": {k: result.config[k] for k in TUNED_KEYS},
        "metric": metric,
        "value": value if isinstance(value, (int, float)) and math.isfinite(value) else None,
        "reports": last.get("training_iteration", 0),
        "step": last.get("step"),
        "mlflow_run_id": last.get("mlflow_run_id"),
        "error": str(result.error).splitlines()[0] if result.error else None,
    }


def end_open_runs(uri: str, results: Any, steps_per_trial: int) -> list[str]:
    """Mend the MLflow runs of the trials that ended without an error but whose run says otherwise: Ray does not
    wait for a stopped trial's thread, so its run may still be RUNNING (or FAILED, as Lightning marks it when Ray
    stops the thread) when its process goes. Each is ended at its last report (``end_trial_run``); returns their
    run ids."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    mended = []
    for result in results:
        last = result.metrics or {}
        run_id = last.get("mlflow_run_id")
        if not run_id or result.error:
            continue
        info = client.get_run(run_id).info
        stopped = (last.get("step") or 0) < steps_per_trial
        if info.status == ("KILLED" if stopped else "FINISHED") and info.end_time:
            continue
        stamp = last.get("timestamp")  # the last report's time, in whole seconds (not before the run's start)
        end = max(int(stamp * 1000), info.start_time or 0) if isinstance(stamp, (int, float)) else None
        end_trial_run(client, run_id, last.get("step") or 0, steps_per_trial, end_time=info.end_time or end)
        mended.append(run_id)
    if mended:
        log.info("tune: %d trial run(s) ended in MLflow after their trials", len(mended))
    return mended


def _best(trials: list[dict[str, Any]], tune_params: TuneParams) -> dict[str, Any]:
    """The trial with the best last report (the ASHA survivors ran longest, so they are compared at the end)."""
    scored = [t for t in trials if t["value"] is not None]
    if not scored:
        errors = "; ".join(sorted({t["error"] for t in trials if t["error"]})) or "no trial reported"
        raise ClipmillError(f"tune: no trial reported {tune_params.metric}: {errors}")
    sign = 1 if tune_params.mode == "max" else -1
    best = max(scored, key=lambda t: (t["reports"], sign * t["value"]))
    return {k: best[k] for k in ("overrides", "metric", "value", "trial", *RUN_KEYS)}
