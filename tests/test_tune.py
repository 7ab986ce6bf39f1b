"""Sweep stage: a 2-trial Ray Tune sweep of tiny training runs, tracked as MLflow child runs."""
from __future__ import annotations

import json

import pytest
import yaml

from clipmill.components.common.errors import InputError
from clipmill.components.train.cli import apply_best_params
from clipmill.components.tune import cli as tune_cli
from tests.test_train_shapes import run_stage, write_shape_evalsets, write_shape_shards


def test_two_trial_sweep_writes_the_best_config(tmp_path, mlflow_uri, default_params):
    import mlflow

    shards = tmp_path / "shards"
    write_shape_shards(shards, shards=2, per_shard=64)
    evalsets = write_shape_evalsets(tmp_path / "eval", per_class=2, retrieval_size=12)
    params = default_params.model_dump(mode="json")
    params["ray"].update(address=None, num_cpus=2)
    params["train"].update(samples_per_epoch=128, shuffle_buffer=32, cpu_threads=1)
    params["tune"].update(trials=2, steps_per_trial=10, report_every_n_steps=5, cpus_per_trial=1.0,
                          max_concurrent_trials=1,  # as the demo: ASHA then decides the same way in every run
                          search_space={"lr": [1e-3, 3e-3], "weight_decay": [0.01, 0.1], "warmup_steps": [2],
                                        "batch_size": [16, 32], "loss": ["clip", "siglip"]})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "tune"
    rc = run_stage(tune_cli, tmp_path / "params.yaml", ["--shards", str(shards), "--eval-dir", str(evalsets),
                                                        "--out", str(out)])
    assert rc == 0

    trials = json.loads((out / "trials.json").read_text())
    best = json.loads((out / "best_params.json").read_text())
    assert len(trials) == 2 and all(t["error"] is None and t["value"] is not None for t in trials)
    assert best["config_key"] == "train" and best["metric"] == "val/zeroshot/acc1"
    assert set(best["overrides"]) == {"lr", "weight_decay", "warmup_steps", "batch_size", "loss"}
    assert best["value"] == max(t["value"] for t in trials if t["reports"] == max(u["reports"] for u in trials))
    tuned = apply_best_params(default_params.train, str(out / "best_params.json"), "train")
    assert {k: getattr(tuned, k) for k in best["overrides"]} == best["overrides"]

    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name(default_params.tracking.experiment).experiment_id])
    parent = next(r for r in runs if r.data.tags.get("clipmill.stage") == "tune")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and {c.data.tags["clipmill.stage"] for c in children} == {"tune-trial"}
    names = json.loads((out / "run.json").read_text())
    # every trial's run is ended: one the scheduler stopped (fewer reports) as KILLED, at its last report
    stopped = {n["mlflow_run_id"] for n, t in zip(names["trials"], trials)
               if t["reports"] < max(u["reports"] for u in trials)}
    for child in children:
        assert child.info.end_time is not None, child.info.run_id
        assert child.info.status == ("KILLED" if child.info.run_id in stopped else "FINISHED"), child.info
        assert ("clipmill.stopped_by_scheduler" in child.data.tags) == (child.info.run_id in stopped)
    first, second = sorted(children, key=lambda c: c.info.start_time)
    assert first.info.end_time <= second.info.start_time  # one trial at a time, though 2 CPUs hold two
    assert [n["trial"] for n in names["trials"]] == [t["trial"] for t in trials]
    assert not {"trial_id", "mlflow_run_id"} & (best.keys() | {k for t in trials for k in t})
    assert {c.info.run_id for c in children} >= {n["mlflow_run_id"] for n in names["trials"]}
    assert names["best_mlflow_run_id"] in {n["mlflow_run_id"] for n in names["trials"]}
    assert all(c.data.tags["clipmill.git_commit"] != "unknown" for c in children)  # trials run in the repository
    assert parent.data.metrics["best/val/zeroshot/acc1"] == best["value"]


def test_tuned_values_are_applied_only_to_the_section_they_were_tuned_for_and_never_silently_dropped(
        tmp_path, default_params, caplog):
    best = tmp_path / "best_params.json"
    best.write_text(json.dumps({"overrides": {"lr": 0.5}}))  # no config_key: not a file tune wrote
    with pytest.raises(InputError, match="field 'config_key': missing"):
        apply_best_params(default_params.train, str(best), "train")
    best.write_text(json.dumps({"config_key": "score.bootstrap", "overrides": {"lr": 0.5}}))
    assert apply_best_params(default_params.train, str(best), "train") == default_params.train
    assert "tuned for score.bootstrap, not applied to train" in caplog.text
    best.write_text(json.dumps({"config_key": "train", "overrides": {"lr": "fast"}}))
    with pytest.raises(InputError, match="field 'overrides.lr'"):
        apply_best_params(default_params.train, str(best), "train")
    assert apply_best_params(default_params.train, str(tmp_path / "none.json"), "train") == default_params.train


def test_trial_runs_left_open_or_failed_by_a_stop_are_ended_as_what_they_were(mlflow_uri):
    """Ray stops a trial's thread inside its report (at its last step, or early for the scheduler) without waiting
    for it: a run still RUNNING, or marked FAILED by Lightning on the way out, is ended after the sweep as FINISHED
    (it reached its last step) or KILLED and tagged (stopped early), at its last report; a trial that failed, and a
    run already ended right, are left as they are."""
    from types import SimpleNamespace

    import mlflow

    from clipmill.components.tune.tune import STOPPED_TAG, end_open_runs

    client = mlflow.MlflowClient(mlflow_uri)
    experiment = client.create_experiment("trials")
    runs = {name: client.create_run(experiment).info for name in ("open", "failed", "early", "error", "done")}
    client.set_terminated(runs["failed"].run_id, "FAILED")
    client.set_terminated(runs["error"].run_id, "FAILED")
    client.set_terminated(runs["done"].run_id, "FINISHED")
    stamp = runs["open"].start_time // 1000 + 5

    def result(name, step, error=None):
        return SimpleNamespace(metrics={"mlflow_run_id": runs[name].run_id, "step": step, "timestamp": stamp},
                               error=error)

    results = [result("open", 10), result("failed", 10), result("early", 5), result("error", 5, "boom"),
               result("done", 10)]
    mended = end_open_runs(mlflow_uri, results, steps_per_trial=10)
    assert sorted(mended) == sorted(runs[n].run_id for n in ("open", "failed", "early"))
    status = {name: client.get_run(info.run_id) for name, info in runs.items()}
    assert {n: r.info.status for n, r in status.items()} == {
        "open": "FINISHED", "failed": "FINISHED", "early": "KILLED", "error": "FAILED", "done": "FINISHED"}
    assert status["open"].info.end_time == stamp * 1000  # its last report, not the time of the mending
    assert [n for n, r in status.items() if STOPPED_TAG in r.data.tags] == ["early"]
