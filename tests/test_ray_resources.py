"""What score tasks and tune trials ask a Ray cluster for, and requests larger than the cluster failing at once."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from clipmill.cli import main as clipmill_main
from clipmill.components.common.engine import ray_init_args, ray_options, ray_session, shipped_code
from clipmill.components.common.errors import ConfigError
from clipmill.components.common.params import RayParams
from clipmill.components.common.steps import StepContext
from clipmill.components.common.training.params import TrainParams
from clipmill.components.curate.executor import Executor, UnitTask
from clipmill.components.score.params import ScoreParams
from clipmill.components.score.step import ScoreStep
from clipmill.components.tune.params import TuneParams
from clipmill.components.tune.tune import trial_resources
from tests.test_train_shapes import write_shape_shards

GPU_NODE = {"CPU": 16.0, "GPU": 1.0, "memory": 1e11}
CPU_NODE = {"CPU": 2.0, "memory": 1e10}


def score_options(device: str, cluster: dict) -> dict:
    return ray_options(ScoreStep.resources(ScoreParams(device=device)), cluster, "curate: step score")


def test_score_tasks_on_ray_ask_for_a_gpu_when_the_device_resolves_to_cuda():
    assert score_options("auto", GPU_NODE) == {"num_cpus": 1, "num_gpus": 1}
    assert score_options("cuda", GPU_NODE) == {"num_cpus": 1, "num_gpus": 1}
    assert score_options("auto", CPU_NODE) == {"num_cpus": 1}  # auto on a CPU cluster: no GPU asked, none waited for
    assert score_options("cpu", GPU_NODE) == {"num_cpus": 1}


def test_score_on_cuda_with_a_cluster_without_gpus_is_an_error_not_a_hang():
    with pytest.raises(ConfigError, match=r"curate: step score: one task asks for num_gpus=1 but the Ray cluster "
                                          r"has GPU=0"):
        score_options("cuda", CPU_NODE)
    with pytest.raises(ConfigError, match="num_cpus=4 .* CPU=2"):
        ray_options({"num_cpus": 4}, CPU_NODE, "curate: step dedup")


def test_tune_trials_ask_for_a_gpu_when_the_cluster_has_one():
    auto = TuneParams()
    assert auto.gpus_per_trial == "auto"
    assert trial_resources(auto, TrainParams(), GPU_NODE) == {"cpu": 1.0, "gpu": 1.0}
    assert trial_resources(auto, TrainParams(), CPU_NODE) == {"cpu": 1.0, "gpu": 0.0}
    assert trial_resources(auto, TrainParams(accelerator="cpu"), GPU_NODE) == {"cpu": 1.0, "gpu": 0.0}
    assert trial_resources(TuneParams(gpus_per_trial=0.5), TrainParams(), GPU_NODE) == {"cpu": 1.0, "gpu": 0.5}
    with pytest.raises(ValueError, match="gpus_per_trial"):
        TuneParams(gpus_per_trial=-1)


@pytest.mark.parametrize("oversized", [{"cpus_per_trial": 4.0}, {"gpus_per_trial": 1.0}],
                         ids=["cpus_per_trial_above_num_cpus", "gpus_per_trial_without_gpus"])
def test_tune_with_a_trial_larger_than_the_cluster_exits_2_at_once_instead_of_hanging(
        oversized, tmp_path, default_params, capsys):
    write_shape_shards(tmp_path / "shards", shards=1, per_shard=8)
    params = default_params.model_dump(mode="json")
    params["ray"].update(address=None, num_cpus=2)
    params["tracking"]["enabled"] = False
    params["tune"].update(oversized)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    started = time.perf_counter()
    rc = clipmill_main(["stage", "tune", "--params", str(tmp_path / "params.yaml"), "--shards",
                        str(tmp_path / "shards"), "--eval-dir", str(tmp_path / "eval"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and time.perf_counter() - started < 60
    assert err[-1].startswith("clipmill: error: tune: a trial (tune.cpus_per_trial, tune.gpus_per_trial): one task "
                              "asks for ") and "but the Ray cluster has" in err[-1]
    assert not (tmp_path / "out").exists()


def test_a_curate_step_larger_than_the_ray_cluster_fails_before_submitting_instead_of_hanging(tmp_path):
    task = UnitTask(str(tmp_path), "score", ScoreParams(device="cpu"), StepContext(shards_dir=str(tmp_path)),
                    "00000", "map", "fingerprint", ())
    started = time.perf_counter()
    with Executor("ray", 0, RayParams(num_cpus=1)) as executor:
        with pytest.raises(ConfigError, match=r"^curate: step score: one task asks for num_cpus=2 but the Ray "
                                              r"cluster has CPU=1 in all"):
            executor.run([task], {"num_cpus": 2})
        with pytest.raises(ConfigError, match="num_gpus=1 but the Ray cluster has GPU=0"):
            executor.run([task], ScoreStep.resources(ScoreParams(device="cuda")))
    assert time.perf_counter() - started < 60 and not any(tmp_path.iterdir())


def test_one_ray_start_up_serves_the_sweep_the_executor_and_the_download():
    sweep = ray_init_args(RayParams(address=None, num_cpus=3), env_vars={"A": "1"}, object_store_mb=100)
    assert sweep == {"num_cpus": 3, "include_dashboard": False, "object_store_memory": 100 * 2**20,
                     "runtime_env": {"env_vars": {"A": "1"}}, "log_to_driver": False}
    remote = ray_init_args(RayParams(address="ray://head:10001"), env_vars={"A": "1"}, object_store_mb=100)
    assert remote == {"address": "ray://head:10001", "log_to_driver": False,
                      "runtime_env": {"env_vars": {"A": "1"}, "py_modules": [shipped_code()]}}
    shipped = Path(shipped_code())  # the package as installed: clipmill/components, clipmill/pipelines
    assert shipped.name == "clipmill" and (shipped / "components" / "common" / "engine.py").is_file()
    assert (shipped / "pipelines" / "flows.py").is_file() and (shipped / "cli.py").is_file()
    download = ray_init_args(RayParams(address="ray://head:10001"), ship_code=False, worker_logs=True)
    assert download == {"address": "ray://head:10001", "log_to_driver": True}


def test_a_ray_session_inside_a_running_ray_leaves_it_running():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with ray_session(RayParams(address="ray://unreachable:1")):  # not connected to: Ray is up already
            assert ray.is_initialized()
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    with ray_session(RayParams(address=None, num_cpus=1)):
        assert ray.cluster_resources()["CPU"] == 1
    assert not ray.is_initialized()
