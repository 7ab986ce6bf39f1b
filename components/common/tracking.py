"""MLflow runs for stages, with the lineage tags every run carries.

Every stage run is tagged with the git commit, the dvc.lock hash, the params hash and the content hash
of the data it read. Under a pipeline run (``CLIPMILL_PARENT_RUN_ID`` set) stage runs are its children.
"""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from .hashing import bytes_hashed, content_hash, file_sha256, hash_obj
from .params import TrackingParams

PARENT_RUN_ENV = "CLIPMILL_PARENT_RUN_ID"
DVC_STAGE_ENV = "CLIPMILL_DVC_STAGE"  # set by the flow: which dvc.yaml stage this process runs
DVC_STAGE_TAG = "clipmill.dvc_stage"


def tracking_uri(params: TrackingParams) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking_uri


def artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database file (``mlartifacts/``), not in the cwd."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def use_experiment(tracking: TrackingParams) -> str:
    """Point mlflow at the tracking store and the experiment (created with its artifact root); returns its id."""
    import mlflow

    uri = tracking_uri(tracking)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(tracking.experiment)
    if exp is None:
        try:
            exp_id = mlflow.create_experiment(tracking.experiment, artifact_location=artifact_root(uri))
        except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent stage
            exp_id = mlflow.get_experiment_by_name(tracking.experiment).experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit(cwd: str | os.PathLike = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def lineage_tags(params_section: Any, data_paths: Iterable[str | os.PathLike] = ()) -> dict[str, str]:
    """Tags naming exactly what produced a run: code, pipeline lock, params and input data."""
    params_dump = params_section.model_dump(mode="json") if hasattr(params_section, "model_dump") else params_section
    lock = Path("dvc.lock")
    return {
        "clipmill.git_commit": git_commit(),
        "clipmill.dvc_lock_hash": file_sha256(lock) if lock.exists() else "none",
        "clipmill.params_hash": hash_obj(params_dump),
        "clipmill.data_hash": content_hash(data_paths),
    }


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextmanager
def stage_run(stage: str, tracking: TrackingParams, params_section: Any,
              data_paths: Iterable[str | os.PathLike] = ()) -> Iterator[Any]:
    """An MLflow run for one stage (a child of the pipeline run when there is one).

    Yields the active ``mlflow.ActiveRun``, or ``None`` when tracking is disabled.
    """
    if not tracking.enabled:
        yield None
        return
    import mlflow

    use_experiment(tracking)
    parent = os.environ.get(PARENT_RUN_ENV)
    tags = {"clipmill.stage": stage, DVC_STAGE_TAG: os.environ.get(DVC_STAGE_ENV, stage),
            **lineage_tags(params_section, data_paths)}
    if parent:
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        dump = params_section.model_dump(mode="json") if hasattr(params_section, "model_dump") else dict(params_section)
        flat = {k: ("null" if v is None else v) for k, v in _flatten(dump).items()}
        for chunk in range(0, len(flat), 100):
            mlflow.log_params(dict(list(flat.items())[chunk:chunk + 100]))
        yield run
        # What this stage read to hash its inputs (cached hashes read nothing): lineage costs about one read per run.
        mlflow.log_metric("lineage.bytes_hashed", bytes_hashed())
