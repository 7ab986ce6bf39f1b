"""The Prefect flow runs dvc.yaml's stages through DVC: order, skipping, lineage runs, failures."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from clipmill.components.common.errors import ClipmillError
from clipmill.pipelines.dag import load_dag, select

from .conftest import REPO

STAGE_SCRIPT = textwrap.dedent('''
    import os, sys, pathlib, time
    from clipmill.params import load_params
    from clipmill.components.common.tracking import stage_run
    from clipmill.components.common.errors import ClipmillError
    name, src, dst = sys.argv[1:4]
    params = load_params()
    if pathlib.Path("fail_" + name).exists():
        raise SystemExit(2)
    if pathlib.Path("sleep_" + name).exists():  # a long stage, to be interrupted
        pathlib.Path("pid_" + name).write_text(str(os.getpid()))
        time.sleep(300)
    with stage_run(name, params.tracking, params.project, [src] if src != "-" else []):
        import mlflow
        text = pathlib.Path(src).read_text() if src != "-" else "seed"
        pathlib.Path(dst).write_text(text + "+" + name)
        mlflow.log_metrics({"samples_in": len(text), "samples_out": len(text) + 1})
''')


def make_flow_project(root: Path, tracking_uri: str) -> Path:
    """A throwaway git + DVC project at ``root`` with three chained stages that record MLflow runs."""
    root.mkdir()
    (root / "stage.py").write_text(STAGE_SCRIPT)
    py = sys.executable
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "a": {"cmd": f"{py} stage.py a - a.txt", "deps": ["stage.py"], "outs": ["a.txt"]},
        "b": {"cmd": f"{py} stage.py b a.txt b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
        "c": {"cmd": f"{py} stage.py c b.txt c.txt", "deps": ["b.txt"], "outs": ["c.txt"]},
    }}))
    (root / "params.yaml").write_text(yaml.safe_dump({"tracking": {"tracking_uri": tracking_uri}}))
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], [str(Path(py).parent / "dvc"), "init", "-q"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=root, check=True, env=env)
    return root


@pytest.fixture
def project(tmp_path, mlflow_uri) -> Path:
    return make_flow_project(tmp_path / "proj", mlflow_uri)


def test_dag_reads_the_repo_pipeline():
    dag = load_dag(REPO)
    assert list(dag)[0] == "demo_corpus"
    assert select(dag, ("validate_download",))[-1] == "validate_download"
    with pytest.raises(ClipmillError, match="no stage named 'nope'"):
        select(dag, ("nope",))


def run_flow(project: Path, api_url: str, *extra: str) -> subprocess.CompletedProcess:
    """`clipmill run full` in its own process, as a user runs it, against the test session's Prefect server."""
    env = {**os.environ, "PREFECT_API_URL": api_url}
    return subprocess.run([str(Path(sys.executable).parent / "clipmill"), "run", "full", "--root", str(project),
                           "--params", str(project / "params.yaml"), *extra], env=env, capture_output=True, text=True,
                          timeout=600)


def summary_rows(project: Path) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in (project / "reports" / "run_summary.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| stage")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_flow_runs_stages_in_order_then_skips_unchanged(project, prefect_server):
    done = run_flow(project, prefect_server)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert re.search(r"flow full: 2/3 stages, \d+ s elapsed, ETA \d+ s", log) and "flow full: 3/3 stages" in log
    assert "[b] Running stage 'b'" in log and "git add dvc.lock" not in log and "core.autostage" not in log
    rows = summary_rows(project)
    assert list(rows) == ["a", "b", "c"] and all(r[0] == "ran" for r in rows.values())
    assert (project / "c.txt").read_text() == "seed+a+b+c"
    assert rows["b"][2] == "6 → 7"
    child = mlflow.get_run(rows["b"][3])
    parent = mlflow.get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["clipmill.flow"] == "full" and parent.data.tags["prefect.flow_run_id"]
    assert child.data.tags["clipmill.dvc_stage"] == "b"
    assert child.data.tags["clipmill.data_hash"] and child.data.tags["clipmill.git_commit"] != "unknown"

    again = run_flow(project, prefect_server)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r[0] for r in summary_rows(project).values()] == ["skipped"] * 3


def test_user_error_fails_the_flow_without_retries(project, prefect_server):
    (project / "fail_b").write_text("")
    done = run_flow(project, prefect_server)
    assert done.returncode == 1
    assert "clipmill: error: stage 'b' failed (exit 2)" in done.stderr
    assert done.stderr.count("[b] Running stage 'b'") == 1  # a user error is not retried
    assert not (project / "c.txt").exists()


def test_prefect_yaml_deployments_build_with_their_schedules():
    from clipmill.pipelines.serve import build_deployments

    deployments = {d.name: d for d in build_deployments(REPO / "prefect.yaml", REPO)}
    assert {"weekly-full", "daily-curate"} <= set(deployments)
    weekly = deployments["weekly-full"]
    assert weekly.parameters["flow_name"] == "full" and weekly.parameters["root"] == str(REPO)
    assert [s.schedule.cron for s in weekly.schedules] == ["0 3 * * 1"]
    assert all(d.concurrency_limit == 1 for d in deployments.values())  # a slow run never overlaps its next one
    assert weekly.parameters["lock_wait_s"] > 0  # and waits for a daily run of the same checkout


def parent_runs(uri: str) -> list:
    return mlflow.search_runs(filter_string="tags.`clipmill.flow` = 'full'", search_all_experiments=True,
                              output_format="list")


def test_a_second_run_in_the_same_checkout_is_refused_in_one_line(project, prefect_server):
    from clipmill.pipelines.runlock import RUN_LOCKED_EXIT, run_lock

    with run_lock(project, "flow full"):  # a run in progress
        done = run_flow(project, prefect_server)
    assert done.returncode == RUN_LOCKED_EXIT, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("clipmill: error:")]
    assert len(errors) == 1 and f"another clipmill run holds this checkout (pid {os.getpid()}, flow full" in errors[0]
    assert "Traceback" not in done.stderr and not (project / "a.txt").exists()
    assert run_flow(project, prefect_server).returncode == 0  # released: the next run goes ahead


def test_dvc_lock_busy_is_a_concurrent_run_not_a_transient_failure():
    from clipmill.pipelines.flows import StageFailed, _retry_transient

    class Failed:
        def __init__(self, exc):
            self.exc = exc

        def result(self, raise_on_failure=True):
            return self.exc

    busy = StageFailed("b", 255, "ERROR: failed to reproduce 'b': '/p/.dvc/tmp/rwlock' is busy, it is being "
                                 "blocked by:\n  (PID 4242): dvc repro --single-item c")
    locked = StageFailed("b", 255, "ERROR: Unable to acquire lock. Most likely another DVC process is running")
    assert busy.busy and locked.busy and "not retried" in str(busy)
    assert not _retry_transient(None, None, Failed(busy)) and not _retry_transient(None, None, Failed(locked))
    assert _retry_transient(None, None, Failed(StageFailed("b", 1, "Killed")))  # a crash may be transient


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")  # a zombie is gone


def test_sigterm_to_clipmill_run_stops_its_stage_and_leaves_no_orphans(project, prefect_server, mlflow_uri):
    (project / "sleep_b").write_text("")
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "clipmill"), "run", "full", "--root", str(project),
                             "--params", str(project / "params.yaml")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (project / "pid_b").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (project / "pid_b").exists(), proc.communicate(timeout=60)
        stage = int((project / "pid_b").read_text())
        dvc = int(Path(f"/proc/{stage}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the stage's parent
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    assert "clipmill: terminated" in err
    deadline = time.monotonic() + 10
    while (_alive(stage) or _alive(dvc)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(stage) and not _alive(dvc), "the stage and its dvc repro run on as orphans"
    assert not (project / "b.txt").exists() and not (project / "c.txt").exists()
    [parent] = parent_runs(mlflow_uri)
    assert parent.info.status == "FAILED"  # not left RUNNING


def test_a_failed_push_neither_skips_the_commit_nor_leaves_the_parent_run_running(project, prefect_server,
                                                                                  mlflow_uri):
    done = run_flow(project, prefect_server, "--commit", "--push")  # no DVC remote: the push fails
    assert done.returncode == 2, done.stderr[-3000:]
    assert "the stages finished, but 1 step(s) after them failed: dvc push:" in done.stderr
    head = subprocess.run(["git", "log", "-1", "--format=%s"], cwd=project, capture_output=True, text=True).stdout
    assert head.startswith("clipmill run full:")  # the commit was not skipped
    summary = (project / "reports" / "run_summary.md").read_text()
    assert ("Data commit: `" in summary and "DVC push: failed" in summary
            and "Failed after the stages: dvc push" in summary)
    [parent] = parent_runs(mlflow_uri)
    assert parent.info.status == "FAILED" and parent.data.metrics["wall_seconds"] > 0


def test_a_committed_and_pushed_run_comes_back_with_dvc_pull(project, prefect_server, tmp_path):
    dvc = str(Path(sys.executable).parent / "dvc")
    remote = tmp_path / "dvc-remote"
    subprocess.run([dvc, "remote", "add", "-d", "local", str(remote)], cwd=project, check=True)
    done = run_flow(project, prefect_server, "--commit", "--push")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (project / "reports" / "run_summary.md").read_text()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert f"Data commit: `{head}`" in summary and "DVC push:" in summary
    committed = subprocess.run(["git", "show", "--name-only", "--format=%s", "HEAD"], cwd=project,
                               capture_output=True, text=True).stdout.split()
    assert committed[:3] == ["clipmill", "run", "full:"] and "dvc.lock" in committed
    assert any(remote.rglob("*")), "dvc push stored the run's outputs in the remote"

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    subprocess.run([dvc, "remote", "add", "-f", "-d", "local", str(remote)], cwd=clone, check=True)
    pulled = subprocess.run([dvc, "pull"], cwd=clone, capture_output=True, text=True)
    assert pulled.returncode == 0, pulled.stderr
    assert (clone / "c.txt").read_text() == "seed+a+b+c"  # restored, not recomputed
    status = subprocess.run([dvc, "status"], cwd=clone, capture_output=True, text=True).stdout
    assert "up to date" in status
