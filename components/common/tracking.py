"""MLflow runs for stages, with the lineage tags every run carries.

Every stage run is tagged with the git commit, the dvc.lock hash, the params hash and the content hash
of the data it read. Under a pipeline run (``CLIPMILL_PARENT_RUN_ID`` set) stage runs are its children.
``check_tracking`` tells an unusable tracking store in one line before any work starts.
"""
from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ClipmillError
from .hashing import bytes_hashed, content_hash, file_sha256, hash_obj, params_dump
from .params import TrackingParams

PARENT_RUN_ENV = "CLIPMILL_PARENT_RUN_ID"
DVC_STAGE_ENV = "CLIPMILL_DVC_STAGE"  # set by the flow: which dvc.yaml stage this process runs
DVC_STAGE_TAG = "clipmill.dvc_stage"
CHECK_TIMEOUT_ENV = "CLIPMILL_TRACKING_CHECK_TIMEOUT_S"  # seconds the reachability check waits (default 10)


def tracking_uri(params: TrackingParams) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking_uri


def _unusable_reason(uri: str) -> str | None:
    """Why the store at ``uri`` cannot be used, or None: an HTTP(S) server must answer, a SQLite database or
    a file store must be writable. Other schemes (databricks, postgresql ...) are left to MLflow."""
    if uri.startswith(("http://", "https://")):
        timeout = float(os.environ.get(CHECK_TIMEOUT_ENV) or 10)
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
                return None
        except urllib.error.HTTPError as e:  # it answered: reachable, unless a gateway says the server is not
            return f"HTTP {e.code} from {uri}" if e.code in (502, 503, 504) else None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            return f"not reachable: {reason}"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        return None if str(path) == ":memory:" else _unwritable(path, "the SQLite database")
    if uri.startswith("file:") or (":" not in uri and not uri.startswith("databricks")):
        return _unwritable(Path(uri[len("file://"):] if uri.startswith("file://") else uri.removeprefix("file:")),
                           "the file store", directory=True)
    return None


def _unwritable(path: Path, what: str, directory: bool = False) -> str | None:
    if path.exists():
        if directory != path.is_dir():
            return f"{what} {path} is {'not ' if directory else ''}a directory"
        return None if os.access(path, os.W_OK) else f"{what} {path} is not writable"
    parent = path.parent
    while not parent.exists():  # a store MLflow would create: its nearest existing folder must be writable
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        return f"{what} {path} cannot be created: {parent} is not a writable directory"
    return None


_USABLE_STORES: set[str] = set()  # stores this process found usable: the CLI, the flow and stage_run check once


def check_tracking(tracking: TrackingParams) -> None:
    """A ClipmillError (uri, reason) when tracking is on and its store cannot be used; nothing otherwise."""
    if not tracking.enabled:
        return
    uri = tracking_uri(tracking)
    if uri in _USABLE_STORES:
        return
    reason = _unusable_reason(uri)
    if reason:
        raise ClipmillError(f"tracking.tracking_uri {uri}: {reason} (start the tracking server, fix the URI or "
                            f"MLFLOW_TRACKING_URI, or set tracking.enabled: false)")
    _USABLE_STORES.add(uri)


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
    lock = Path("dvc.lock")
    return {
        "clipmill.git_commit": git_commit(),
        "clipmill.dvc_lock_hash": file_sha256(lock) if lock.exists() else "none",
        "clipmill.params_hash": hash_obj(params_dump(params_section)),
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

    check_tracking(tracking)
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
