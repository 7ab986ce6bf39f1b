"""Prefect flows over the dvc.yaml stage graph.

Each Prefect task runs one stage with ``dvc repro --single-item <stage>``: DVC decides whether the stage's
inputs changed (unchanged stages are skipped) and records the result in dvc.lock, exactly as ``dvc repro``
would. The flow opens one MLflow parent run; every stage run is its child (``CLIPMILL_PARENT_RUN_ID``).

One run per checkout (``runlock``). Each stage's ``dvc repro`` runs in its own process group, which is terminated
when the flow is (SIGTERM, Ctrl-C, a crash), so no stage runs on unobserved. The steps after the stages (child
runs, commit, push, summary, closing the parent run) are isolated from one another: one failing neither skips the
next nor leaves the parent run RUNNING, and the run then fails naming every failed step.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.tasks import exponential_backoff

from clipmill.components.common.errors import ClipmillError
from clipmill.components.common.io import write_text
from clipmill.components.common.log import Progress, quiet_third_party
from clipmill.components.common.params import TrackingParams
from clipmill.components.common.tracking import (
    DVC_STAGE_ENV,
    DVC_STAGE_TAG,
    PARENT_RUN_ENV,
    check_tracking,
    lineage_tags,
    tracking_uri,
    use_experiment,
)

from .dag import FLOW_TARGETS, load_dag, select
from .runlock import run_lock

_EXITED = re.compile(r"exited with (\d+)")
USER_ERROR_EXIT = 2  # a ClipmillError (bad input, bad params): retrying cannot help
# DVC's answers when another DVC process holds the repository or an output: a concurrent run, not a transient fault.
_DVC_BUSY = ("Unable to acquire lock", "is busy, it is being blocked by")
# DVC's advice after each stage (git add dvc.lock, autostage, dvc push): the flow commits and pushes itself.
_DVC_HINTS = {"", "To track the changes with git, run:", "To enable auto staging, run:",
              "dvc config core.autostage true", "Use `dvc push` to send your updates to remote storage."}
TERMINATE_GRACE_S = 10.0  # SIGTERM to a stage's process group, then SIGKILL after this long
_live: set[subprocess.Popen] = set()  # the `dvc repro` processes of running stages


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: str):
        self.stage, self.returncode = stage, returncode
        self.busy = any(marker in tail for marker in _DVC_BUSY)
        note = "\n(another DVC process holds the repository: a concurrent run; not retried)" if self.busy else ""
        super().__init__(f"stage '{stage}' failed (exit {returncode}):\n{tail}{note}")


def terminate_group(proc: subprocess.Popen, grace_s: float = TERMINATE_GRACE_S) -> None:
    """SIGTERM the process group led by ``proc``, SIGKILL what is left after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; its group may not be
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)


def terminate_stages() -> None:
    """Terminate every stage process group still running (the flow is ending abnormally)."""
    for proc in list(_live):
        terminate_group(proc)
        _live.discard(proc)


@dataclass
class StageResult:
    stage: str
    status: str  # ran | skipped
    seconds: float
    mlflow_run_id: str | None = None
    metrics: dict = field(default_factory=dict)


def _stage_env(stage: str, parent_run_id: str | None, uri: str) -> dict[str, str]:
    env = dict(os.environ)
    env[DVC_STAGE_ENV] = stage
    # Stage commands call `clipmill`: make the interpreter's own environment the first on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = uri
    env.pop(PARENT_RUN_ENV, None)
    if parent_run_id:
        env[PARENT_RUN_ENV] = parent_run_id
    return env


def _retry_transient(task_, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return not (isinstance(exc, StageFailed) and (exc.returncode == USER_ERROR_EXIT or exc.busy))


@task(name="stage", task_run_name="{stage}", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=10),
      retry_condition_fn=_retry_transient)
def run_stage(stage: str, root: str, env: tuple[str | None, str]) -> StageResult:
    """Run one dvc.yaml stage through DVC, streaming its output into the flow's log.

    ``env`` is (MLflow parent run id, tracking URI) for the stage's own MLflow run."""
    logger = get_run_logger()
    start = time.perf_counter()
    # Its own process group (session): terminating the flow terminates DVC and the stage command it runs.
    proc = subprocess.Popen(["dvc", "repro", "--single-item", stage], cwd=root, env=_stage_env(stage, *env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1, start_new_session=True)
    _live.add(proc)
    tail: deque[str] = deque(maxlen=40)
    skipped = False
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            skipped |= "didn't change, skipping" in line
            if not (line.strip() in _DVC_HINTS or line.strip().startswith("git add dvc.lock")):
                logger.info("[%s] %s", stage, line)
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            logger.warning("[%s] the flow is ending: terminating the stage (process group %d)", stage, proc.pid)
            terminate_group(proc)
        _live.discard(proc)
    seconds = time.perf_counter() - start
    if rc != 0:
        # DVC exits 255 for any failed command; the stage's own exit code is in its message.
        own = [int(m) for m in _EXITED.findall("\n".join(tail))]
        raise StageFailed(stage, own[-1] if own else rc, "\n".join(tail))
    return StageResult(stage, "skipped" if skipped else "ran", seconds)


def _attach_child_runs(results: list[StageResult], parent_run_id: str) -> None:
    """Fill in each stage's MLflow child run and the counts it logged (samples_in / samples_out ...)."""
    import mlflow

    runs = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              search_all_experiments=True, output_format="list")
    by_stage = {r.data.tags.get(DVC_STAGE_TAG): r for r in runs}
    for res in results:
        run = by_stage.get(res.stage)
        if run is not None:
            res.mlflow_run_id = run.info.run_id
            res.metrics = {k: v for k, v in run.data.metrics.items() if k in ("samples_in", "samples_out")}


def summary_markdown(flow_name: str, results: list[StageResult], total_seconds: float, parent_run_id: str | None,
                     extra: dict[str, str] | None = None) -> str:
    stage_seconds = sum(r.seconds for r in results)
    lines = [f"# clipmill run: `{flow_name}`", ""]
    if parent_run_id:
        lines.append(f"- MLflow parent run: `{parent_run_id}`")
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: {v}")
    lines += ["", "| stage | status | seconds | samples in → out | MLflow run |", "|---|---|---:|---|---|"]
    for r in results:
        counts = " → ".join(f"{r.metrics[k]:g}" if k in r.metrics else "·" for k in ("samples_in", "samples_out"))
        counts = "–" if not r.metrics else counts
        lines.append(f"| {r.stage} | {r.status} | {r.seconds:.1f} | {counts} | {r.mlflow_run_id or '–'} |")
    overhead = total_seconds / stage_seconds if stage_seconds else float("nan")
    lines += ["", f"Total wall time {total_seconds:.1f} s; stages {stage_seconds:.1f} s (ratio {overhead:.3f})."]
    return "\n".join(lines) + "\n"


def _run_facts(root: Path, params, ran: set[str], warm, added: list[str]) -> dict[str, str]:
    """What the summary says beyond the stage table: the crawl, the warm start, the resulting model."""
    from clipmill.components.common.io import read_json

    facts: dict[str, str] = {}
    download = root / params.project.data_dir / "download" / "summary.json"
    if download.is_file():
        lists = read_json(download).get("url_lists") or []
        names = [e["name"] for e in lists]
        facts["Crawl"] = (f"{len(names)} URL list(s): {', '.join(names)}" if names else "one URL list")
    if added:
        facts["New URL lists"] = ", ".join(f"`{a}`" for a in added) + " (appended by this run)"
    if warm is not None:
        facts["Warm start"] = (f"`{warm.init_from}` (loss {warm.loss}; weights `{warm.weights}`, sha256 "
                               f"`{str(warm.sha256)[:12]}`)" if warm.init_from else warm.reason)
    registration = root / params.project.data_dir / "register" / "registration.json"
    if "register" in ran and registration.is_file():
        reg = read_json(registration)
        decision = (reg.get("promotion") or {}).get("decision") or {}
        facts["Model"] = (f"`{reg['model_uri']}` (challenger); promotion: {decision.get('outcome', 'off')}"
                          + (f" - {decision['reason']}" if decision.get("reason") else ""))
    return facts


def _mlflow_run_link(uri: str, parent_run_id: str, experiment_id: str) -> str | None:
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{parent_run_id}" if uri.startswith("http") else None


@flow(name="clipmill", flow_run_name="{flow_name}", log_prints=True)
def pipeline(flow_name: str = "full", root: str = ".", stages: list[str] | None = None, new_urls: str | None = None,
             continual: bool | None = None, commit: bool = False, push: bool = False,
             lock_wait_s: float = 0.0) -> list[dict]:
    """Run the stages of ``flow_name`` (or the explicit ``stages``) in dvc.yaml order, under one MLflow parent run.

    ``new_urls``: a URL list appended to the crawl first. ``continual``: True warm-starts training from the current
    champion, False trains from scratch, None keeps warm_start.yaml as committed. ``commit``: commit the run's
    data version (dvc.lock, warm_start.yaml, crawl additions) to git; ``push``: ``dvc push`` its data.
    ``lock_wait_s``: how long to wait for another run of this checkout to finish (0: refuse at once).
    """
    from clipmill.params import load_params

    quiet_third_party()
    root_path = Path(root).resolve()
    dag = load_dag(root_path)
    if flow_name not in FLOW_TARGETS and not stages:
        raise ClipmillError(f"unknown flow '{flow_name}' (flows: {', '.join(FLOW_TARGETS)})")
    order = stages or select(dag, FLOW_TARGETS[flow_name])
    params = load_params(root_path / "params.yaml")
    check_tracking(params.tracking)
    with run_lock(root_path, f"flow {flow_name}", wait_s=lock_wait_s):
        cwd = os.getcwd()
        os.chdir(root_path)  # relative tracking URIs and dvc.lock resolve against the project root
        try:
            results = _run_flow(flow_name, root_path, params, order, new_urls, continual, commit, push)
        finally:
            os.chdir(cwd)
    return [asdict(r) for r in results]


def _run_flow(flow_name: str, root_path: Path, params, order: list[str], new_urls: str | None,
              continual: bool | None, commit: bool, push: bool) -> list[StageResult]:
    import mlflow
    from prefect.artifacts import create_link_artifact
    from prefect.runtime import flow_run

    from . import continual as cont

    logger = get_run_logger()
    tracking: TrackingParams = params.tracking
    start = time.perf_counter()
    results: list[StageResult] = []
    added = cont.append_new_urls(root_path, params, new_urls) if new_urls else []
    warm = None
    if continual is True:
        warm = cont.write_champion_warm_start(root_path, params)
    elif continual is False:
        warm = cont.write_scratch_warm_start(root_path)
    uri = tracking_uri(tracking)
    parent_id = None
    if tracking.enabled:
        use_experiment(tracking)
        tags = {"clipmill.flow": flow_name, "prefect.flow_run_id": str(flow_run.id or ""),
                "clipmill.new_urls": ",".join(added) or "none",
                "clipmill.warm_start": (warm.init_from or "none") if warm else "as committed",
                **lineage_tags(params)}
        parent = mlflow.start_run(run_name=f"pipeline:{flow_name}", tags=tags)
        parent_id = parent.info.run_id
        link = _mlflow_run_link(uri, parent_id, parent.info.experiment_id)
        if link:
            create_link_artifact(link, link_text=f"MLflow parent run {parent_id}",
                                 key=f"clipmill-{flow_name.replace('_', '-')}-mlflow",
                                 description="The MLflow parent run of this flow run (one child run per stage)")
    env = (parent_id, uri)
    logger.info("flow %s: %d stages: %s", flow_name, len(order), " -> ".join(order))
    status = "FAILED"
    try:
        with Progress(f"flow {flow_name}", len(order), "stages", logger, every_s=0, bar=False) as bar:
            for stage in order:
                results.append(run_stage(stage, str(root_path), env))
                bar.update(1)
        status = "FINISHED"
    finally:
        terminate_stages()  # a stage still running here belongs to an interrupted flow
        errors = _finish(flow_name, root_path, params, results, status, time.perf_counter() - start, parent_id,
                         (warm, added, commit, push))
    if errors:
        raise ClipmillError(f"flow {flow_name}: the stages finished, but {len(errors)} step(s) after them failed: "
                            + "; ".join(errors))
    return results


def _finish(flow_name: str, root: Path, params, results: list[StageResult], status: str, total: float,
            parent_id: str | None, run: tuple) -> list[str]:
    """What follows the stages, each step isolated; returns the failed steps ("step: reason").

    ``run``: (warm start, appended URL lists, commit, push) as the flow was called."""
    from prefect.artifacts import create_markdown_artifact

    from . import continual as cont

    warm, added, commit, push = run
    logger = get_run_logger()
    errors: list[str] = []

    def step(what: str, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - one failed step must not skip the next ones
            logger.error("%s failed: %s", what, e)
            errors.append(f"{what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            return None

    if parent_id:
        step("reading the stages' MLflow runs", _attach_child_runs, results, parent_id)
    ran = {r.stage for r in results if r.status == "ran"}
    facts = step("collecting the run's facts", _run_facts, root, params, ran, warm, added) or {}
    if status == "FINISHED" and commit:
        message = f"clipmill run {flow_name}: " + "; ".join(
            f"{k.lower()} {v}" for k, v in facts.items() if k in ("New URL lists", "Model")).replace("`", "")
        failed_before = len(errors)
        sha = step("git commit of the run", cont.commit_run, root, params, message)
        facts["Data commit"] = f"`{sha}`" if sha else ("failed" if len(errors) > failed_before else "nothing changed")
        if sha and "register" in ran:
            step("tagging the model with the commit", _tag_model_with_commit, root, params, sha)
    if status == "FINISHED" and push:
        facts["DVC push"] = step("dvc push", cont.push_data, root) or "failed"
    if errors:
        facts["Failed after the stages"] = "; ".join(errors)
    text = summary_markdown(flow_name, results, total, parent_id, facts)
    summary_path = root / params.project.reports_dir / "run_summary.md"
    step("writing the run summary", write_text, text, summary_path)
    if parent_id:
        failed = status != "FINISHED" or bool(errors)
        step("closing the MLflow parent run", _close_parent_run, results, total, summary_path,
             "FAILED" if failed else "FINISHED")
    step("the Prefect summary artifact", lambda: create_markdown_artifact(
        text, key=f"clipmill-{flow_name.replace('_', '-')}-summary",
        description="Stage durations, counts, MLflow runs and the resulting model"))
    logger.info("run summary written to %s", summary_path)
    return errors


def _close_parent_run(results: list[StageResult], total: float, summary_path: Path, status: str) -> None:
    """Log the run's totals and summary, and always end the parent run (never left RUNNING)."""
    import mlflow

    try:
        mlflow.log_metric("wall_seconds", total)
        mlflow.log_metric("stage_seconds", sum(r.seconds for r in results))
        if summary_path.is_file():
            mlflow.log_artifact(str(summary_path))
    finally:
        mlflow.end_run(status=status)


def _tag_model_with_commit(root: Path, params, sha: str) -> None:
    """The registered version names the git commit that holds its data version (dvc.lock)."""
    from mlflow import MlflowClient

    from clipmill.components.common.io import read_json

    reg = read_json(root / params.project.data_dir / "register" / "registration.json")
    MlflowClient(tracking_uri(params.tracking)).set_model_version_tag(reg["name"], reg["version"],
                                                                      "clipmill.data_commit", sha)
