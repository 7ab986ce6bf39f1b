"""prefect.yaml's deployments served by infra/prefect/worker.sh: a process work pool and worker on a Prefect
server started with infra/prefect/start.sh, a deployment run through them on a throwaway project; and the shipped
manifests and server scripts are safe by default (authentication on, nothing exposed beyond loopback).

(The flow through real MLflow and Prefect servers and the rule filter on a Ray head are in test_servers.py.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import REPO
from tests.registry_fixtures import free_port, prefect_filter, running_server
from tests.test_pipeline_flow import make_flow_project

BIN = Path(sys.executable).parent


def test_a_deployment_of_prefect_yaml_runs_on_the_process_worker(tmp_path, mlflow_uri):
    api_port, health_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}/api"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_WORKER_QUERY_SECONDS": "2"}
    env.pop("CLIPMILL_ROOT", None)  # worker.sh's default: flow runs work in this checkout
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    server_env.update(PORT=str(api_port),
                      # prefect.yaml's cron schedules must not start runs of the real checkout during the test
                      PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false")
    # the worker's own health endpoint answers once worker.sh has created the pool and deployed prefect.yaml
    worker_env = {**env, "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
                  "PREFECT_WORKER_WEBSERVER_PORT": str(health_port)}
    project = make_flow_project(tmp_path / "proj", mlflow_uri)

    with running_server([str(REPO / "infra/prefect/start.sh")], f"{api}/health", server_env,
                        tmp_path / "prefect.log", timeout_s=120), \
            running_server([str(REPO / "infra/prefect/worker.sh"), "--with-healthcheck"],
                           f"http://127.0.0.1:{health_port}/health", worker_env, tmp_path / "worker.log",
                           timeout_s=180):
        deployments = {d["name"]: d for d in prefect_filter(api, "deployments")}
        assert {"weekly-full", "daily-curate"} <= set(deployments)
        curate = deployments["daily-curate"]
        assert curate["work_pool_name"] == "clipmill" and curate["entrypoint"] == "pipelines/flows.py:pipeline"
        assert [s["schedule"]["cron"] for s in curate["schedules"]] == ["0 2 * * *"]
        assert curate["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]

        # the daily deployment, pointed at the throwaway project, as an operator would trigger it
        params = json.dumps({"flow_name": "full", "root": str(project)})
        done = subprocess.run([str(BIN / "prefect"), "deployment", "run", "clipmill/daily-curate", "--params",
                               params, "--watch", "--watch-timeout", "600"], env=env, capture_output=True,
                              text=True, timeout=660)
        worker_log = (tmp_path / "worker.log").read_text()[-3000:]
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + worker_log

        [flow_run] = prefect_filter(api, "flow_runs")
        assert flow_run["state_type"] == "COMPLETED" and flow_run["name"] == "full"
        assert flow_run["deployment_id"] == curate["id"] and flow_run["work_pool_name"] == "clipmill"

    # the worker's flow run ran the project's stages and recorded them under one MLflow parent run
    assert (project / "c.txt").read_text() == "seed+a+b+c"
    assert (project / "reports" / "run_summary.md").is_file()
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("clipmill").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("clipmill.flow") == "full"]
    assert parent.data.tags["prefect.flow_run_id"] == flow_run["id"]
    children = sorted(r.data.tags["clipmill.dvc_stage"] for r in runs
                      if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert children == ["a", "b", "c"]


def test_raycluster_manifest_has_token_auth_a_loopback_dashboard_and_a_network_policy():
    docs = list(yaml.safe_load_all((REPO / "infra/ray/raycluster.yaml").read_text()))
    [cluster] = [d for d in docs if d["kind"] == "RayCluster"]
    [policy] = [d for d in docs if d["kind"] == "NetworkPolicy"]
    spec = cluster["spec"]
    assert spec["authOptions"] == {"mode": "token"}
    assert tuple(int(x) for x in spec["rayVersion"].split(".")[:2]) >= (2, 52)  # token auth exists from Ray 2.52
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("dashboard-host") == "127.0.0.1" \
        or head["rayStartParams"].get("include-dashboard") == "false"
    groups = [head] + spec["workerGroupSpecs"]
    ports = [p["containerPort"] for g in groups for c in g["template"]["spec"]["containers"]
             for p in c.get("ports", [])]
    assert 8265 not in ports  # the dashboard and its job API are never published
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            assert not any(e["name"] == "RAY_AUTH_MODE" and e.get("value") != "token" for e in container.get("env", []))
    assert not [d for d in docs if d["kind"] in ("Service", "Ingress")]
    assert policy["spec"]["podSelector"] == {"matchLabels": {"ray.io/cluster": "clipmill"}}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    sources = [rule["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"][0]["from"]]
    assert sources == [{"ray.io/cluster": "clipmill"}, {"clipmill.io/ray-client": "true"}]


@pytest.mark.parametrize("script", ["infra/mlflow/start.sh", "infra/prefect/start.sh", "infra/ray/start-head.sh"])
def test_server_scripts_bind_loopback_by_default(script):
    text = (REPO / script).read_text()
    assert 'HOST=${HOST:-127.0.0.1}' in text and "0.0.0.0" not in text


@pytest.mark.parametrize("script, unsafe", [
    ("infra/mlflow/start.sh", {}),
    ("infra/prefect/start.sh", {}),
    ("infra/ray/start-head.sh", {"RAY_AUTH_MODE": "disabled"}),
])
def test_a_server_script_asked_to_listen_beyond_loopback_without_auth_refuses(script, unsafe, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("APP_NAME", "PREFECT_SERVER_API_AUTH_STRING",
                                                            "ALLOW_UNAUTHENTICATED", "RAY_AUTH_MODE")}
    env.update(HOST="0.0.0.0", PORT=str(free_port()), MLFLOW_SERVER_DIR=str(tmp_path / "mlflow"),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **unsafe)
    done = subprocess.run(["bash", str(REPO / script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(script) and "HOST=0.0.0.0" in line and "infra/README.md" in line
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written
