"""The real servers of infra/, started on loopback with the project's own scripts: a flow through an MLflow
tracking server and a Prefect server, and the curate stage on a Ray cluster started with `ray start --head`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml
from mlflow import MlflowClient

from clipmill.components.common.curation import read_step_table
from tests.conftest import REPO
from tests.curation_fixtures import make_download
from tests.registry_fixtures import free_port, prefect_filter, running_server
from tests.test_pipeline_flow import make_flow_project

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_a_flow_runs_through_real_mlflow_and_prefect_servers(tmp_path, monkeypatch):
    mlflow_port, prefect_port = free_port(), free_port()
    mlflow_uri, prefect_api = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
    mlflow_env = {**ENV, "PORT": str(mlflow_port), "MLFLOW_SERVER_DIR": str(tmp_path / "mlflow-server")}
    prefect_env = {**ENV, "PORT": str(prefect_port), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    prefect_env.pop("PREFECT_API_URL", None)
    with running_server([str(REPO / "infra/mlflow/start.sh"), "--workers", "1"], f"{mlflow_uri}/health", mlflow_env,
                        tmp_path / "mlflow.log"), \
            running_server([str(REPO / "infra/prefect/start.sh")], f"{prefect_api}/health", prefect_env,
                           tmp_path / "prefect.log"):
        project = make_flow_project(tmp_path / "proj", mlflow_uri)
        done = subprocess.run([str(BIN / "clipmill"), "run", "full", "--root", str(project), "--params",
                               str(project / "params.yaml")], capture_output=True, text=True, timeout=600,
                              env={**ENV, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": mlflow_uri})
        assert done.returncode == 0, done.stderr[-3000:]

        # the Prefect server holds the completed flow run, with a link artifact to the MLflow parent run
        [flow_run] = prefect_filter(prefect_api, "flow_runs")
        assert flow_run["state_type"] == "COMPLETED" and flow_run["name"] == "full"
        artifacts = prefect_filter(prefect_api, "artifacts")
        by_key = {a["key"]: a for a in artifacts}
        link, summary = by_key["clipmill-full-mlflow"], by_key["clipmill-full-summary"]  # a link is stored as markdown
        assert link["flow_run_id"] == summary["flow_run_id"] == flow_run["id"]
        assert f"]({mlflow_uri}/#/experiments/" in link["data"]

        # the MLflow server holds the parent run (tagged with the flow run) and one child run per stage
        client = MlflowClient(mlflow_uri)
        runs = client.search_runs([client.get_experiment_by_name("clipmill").experiment_id])
        [parent] = [r for r in runs if r.data.tags.get("clipmill.flow") == "full"]
        assert parent.data.tags["prefect.flow_run_id"] == flow_run["id"]
        assert f"/runs/{parent.info.run_id})" in link["data"] and parent.info.run_id in summary["data"]
        children = sorted(r.data.tags["clipmill.dvc_stage"] for r in runs
                          if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
        assert children == ["a", "b", "c"]
        assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["run_summary.md"]
    # artifacts went through the server into its artifact store
    assert list((tmp_path / "mlflow-server" / "artifacts").rglob("run_summary.md"))


RAY_ENV = {**ENV, "RAY_AUTH_MODE": "token"}  # the head of infra/ray requires the cluster token (~/.ray/auth_token)


def _ray_ready(address: str, deadline: float) -> None:
    while True:
        status = subprocess.run([str(BIN / "ray"), "status", "--address", address], capture_output=True, text=True,
                                env=RAY_ENV)
        if status.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no Ray cluster at {address}: {status.stderr[-2000:]}")
        time.sleep(2)


def test_the_curate_stage_on_a_ray_cluster_address_equals_local(tmp_path, default_params):
    make_download(tmp_path / "download", n=120)
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = Path(f"/tmp/ray-{port}")  # short: Ray's unix socket paths have a length limit
    env = {**RAY_ENV, "PORT": str(port), "NUM_CPUS": "1", "HOST": "127.0.0.1"}
    head = subprocess.Popen([str(REPO / "infra/ray/start-head.sh"), "--temp-dir", str(temp_dir)], env=env,
                            stdout=open(tmp_path / "ray.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _ray_ready(address, time.monotonic() + 180)
        outs = {}
        for executor, ray_address in (("local", None), ("ray", address)):
            params = default_params.model_dump(mode="json")
            params["curate"].update(steps=["rules", "dedup"], executor=executor, workers=0)
            params["filter"].update(min_image_side=32)
            params["ray"]["address"] = ray_address
            params["tracking"]["enabled"] = False
            (tmp_path / f"{executor}.yaml").write_text(yaml.safe_dump(params))
            # in its own process and with relative paths, as dvc runs it: no Ray client state stays in the test
            # process, and the cluster's workers (another working directory) still find the curation directory
            done = subprocess.run([str(BIN / "clipmill"), "stage", "curate", "--params", f"{executor}.yaml",
                                   "--manifest", "download/manifest.parquet", "--shards", "download/shards",
                                   "--out", f"{executor}/curate"],
                                  capture_output=True, text=True, timeout=600, env=RAY_ENV, cwd=tmp_path)
            assert done.returncode == 0, done.stderr[-3000:]
            outs[executor] = {step: read_step_table(tmp_path / executor / "curate", step)
                              for step in ("rules", "dedup")}
        for step, local in outs["local"].items():
            pd.testing.assert_frame_equal(local, outs["ray"][step], obj=step)
        assert (~outs["ray"]["rules"]["keep"]).sum() > 0 and (~outs["ray"]["dedup"]["keep"]).sum() == 3
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        # anything of this cluster still running (found by its temp dir) goes too; other Ray instances are left
        leftover = subprocess.run(["pgrep", "-f", str(temp_dir)], capture_output=True, text=True).stdout.split()
        for pid in leftover:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not subprocess.run(["pgrep", "-f", str(temp_dir)], capture_output=True, text=True).stdout.split()
