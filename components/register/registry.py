"""The MLflow model registry as clipmill uses it: versions, aliases, recorded metrics and the champion history.

Conventions (all on the registered model named in ``register.model_name``):
- alias ``challenger``: the latest registered model; alias ``champion``: the model in service.
- version tag ``clipmill.model_hash``: content hash of the local-dir export (one version per distinct model).
- version tag ``clipmill.eval.<suite version>``: JSON of the metrics on that suite; ``clipmill.suite_version`` and
  ``metric.<name>`` hold the metrics it was registered with.
- model tag ``clipmill.champion_history``: JSON list of the versions that held ``champion``, oldest first.

Only RESOURCE_DOES_NOT_EXIST means "absent": any other registry error (permission, outage, a locked store) is a
``RegistryError`` naming the store, so that no caller mistakes an unreadable registry for an empty one.
Every change of ``champion`` and its history happens under ``registry_lock`` (see there for its scope).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from clipmill.components.common.errors import ClipmillError
from clipmill.components.common.evaluation import EvaluationRecord

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_MODEL_HASH = "clipmill.model_hash"
TAG_SUITE = "clipmill.suite_version"
TAG_EVAL_PREFIX = "clipmill.eval."
TAG_METRIC_PREFIX = "metric."
TAG_HISTORY = "clipmill.champion_history"
HISTORY_LIMIT = 200  # keeps the tag under MLflow's value-length limit
LOCK_TIMEOUT_S = 120.0  # how long a champion move waits for another one to finish
LOCK_DIR_ENV = "CLIPMILL_REGISTRY_LOCK_DIR"  # where the lock of a remote registry lives (default ~/.cache/clipmill)

T = TypeVar("T")


class RegistryError(ClipmillError):
    """The registry answered with an error other than "does not exist" (or did not answer)."""


def _absent(e: MlflowException) -> bool:
    return e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def registry_call(client: MlflowClient, what: str, call: Callable[[], T]) -> T:
    """``call()``; a RegistryError (store, what, reason) for any MlflowException, absence included."""
    try:
        return call()
    except MlflowException as e:
        raise RegistryError(f"the registry ({client.tracking_uri}) failed to {what}: "
                            f"{e.error_code}: {str(e.message).splitlines()[0][:300]}") from None


def get_or_absent(client: MlflowClient, what: str, call: Callable[[], T]) -> T | None:
    """``call()``, None when the registry says RESOURCE_DOES_NOT_EXIST, a RegistryError for any other error."""
    try:
        return call()
    except MlflowException as e:
        if _absent(e):
            return None
        raise RegistryError(f"the registry ({client.tracking_uri}) failed to {what}: "
                            f"{e.error_code}: {str(e.message).splitlines()[0][:300]}") from None


def require_model(client: MlflowClient, name: str) -> None:
    """A ClipmillError when ``name`` is not a registered model."""
    if get_or_absent(client, f"read model '{name}'", lambda: client.get_registered_model(name)) is None:
        raise ClipmillError(f"the registry ({client.tracking_uri}) has no model named '{name}': "
                            f"register one with `clipmill stage register`")


def _search_versions(client: MlflowClient, query: str) -> list[ModelVersion]:
    return registry_call(client, "search model versions", lambda: client.search_model_versions(query))


def get_version(client: MlflowClient, name: str, version: str | int) -> ModelVersion:
    """Version ``version`` of ``name``; a ClipmillError naming the known versions when it does not exist."""
    require_model(client, name)
    found = get_or_absent(client, f"read version {version} of '{name}'",
                          lambda: client.get_model_version(name, str(version)))
    if found is None:
        known = sorted(int(v.version) for v in _search_versions(client, f"name='{name}'"))
        raise ClipmillError(f"model '{name}' has no version {version} "
                            f"(versions: {', '.join(map(str, known)) or 'none'})")
    return found


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding ``alias``; None when the model is not registered or no version holds the alias.

    Read from the model's alias map, so that absence never depends on an error code (a store answers a missing
    alias with INVALID_PARAMETER_VALUE); a RegistryError when the registry cannot be read.
    """
    model = get_or_absent(client, f"read model '{name}'", lambda: client.get_registered_model(name))
    if model is None or alias not in model.aliases:
        return None
    version = str(model.aliases[alias])
    return registry_call(client, f"read version {version} of '{name}' (@{alias})",
                         lambda: client.get_model_version(name, version))


def all_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of ``name``, oldest first; a ClipmillError when the model is not registered."""
    require_model(client, name)
    return sorted(_search_versions(client, f"name='{name}'"), key=lambda v: int(v.version))


def find_by_hash(client: MlflowClient, name: str, model_hash: str) -> ModelVersion | None:
    """The oldest version of ``name`` holding the model with this content hash (None: not registered yet)."""
    if get_or_absent(client, f"read model '{name}'", lambda: client.get_registered_model(name)) is None:
        return None
    found = _search_versions(client, f"name='{name}' and tags.`{TAG_MODEL_HASH}` = '{model_hash}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def lock_path(tracking_uri: str, name: str) -> Path:
    """The lock file of model ``name``: beside a local store (SQLite database, file store), else per machine."""
    safe = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///"):]).resolve().parent / f".clipmill-registry-{safe}.lock"
    if tracking_uri.startswith("file:") or ("://" not in tracking_uri and not tracking_uri.startswith("databricks")):
        local = tracking_uri[len("file://"):] if tracking_uri.startswith("file://") else tracking_uri
        return Path(local or "mlruns").resolve() / f".clipmill-registry-{safe}.lock"
    digest = hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]
    base = Path(os.environ.get(LOCK_DIR_ENV) or Path.home() / ".cache" / "clipmill")
    return base / f"registry-{digest}-{safe}.lock"


@contextmanager
def registry_lock(client: MlflowClient, name: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the champion lock of ``name``: one move of ``champion`` and its history at a time.

    An exclusive ``flock`` on ``lock_path``: the kernel releases it when its holder dies (no stale lock after a
    kill). It serialises every process of one machine that uses the same store, and processes on several machines
    when the SQLite file sits on a file system with working ``flock``; it does not serialise machines that share a
    remote tracking server (there each move still re-reads the alias right before setting it).
    """
    path = lock_path(client.tracking_uri, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(f"{path}: another process has held the champion lock of '{name}' for more "
                                        f"than {timeout_s:.0f} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def eval_tag(suite_version: str) -> str:
    return TAG_EVAL_PREFIX + re.sub(r"[^A-Za-z0-9_.\-]", "_", suite_version)


def recorded_metrics(version: ModelVersion, suite_version: str) -> dict[str, float] | None:
    """The metrics recorded for ``version`` on ``suite_version``, or None when it was not measured on it."""
    raw = version.tags.get(eval_tag(suite_version))
    return {k: float(v) for k, v in json.loads(raw).items()} if raw else None


def record_metrics(client: MlflowClient, version: ModelVersion, record: EvaluationRecord) -> None:
    client.set_model_version_tag(version.name, version.version, eval_tag(record.suite_version),
                                 json.dumps(record.metrics, sort_keys=True))


def champion_history(client: MlflowClient, name: str) -> list[str]:
    model = registry_call(client, f"read model '{name}'", lambda: client.get_registered_model(name))
    raw = model.tags.get(TAG_HISTORY)
    return json.loads(raw) if raw else []


def set_champion_history(client: MlflowClient, name: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, TAG_HISTORY, json.dumps(history[-HISTORY_LIMIT:]))
