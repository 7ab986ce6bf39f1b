"""The MLflow model registry as clipmill uses it: versions, aliases, recorded metrics and the champion history.

Conventions (all on the registered model named in ``register.model_name``):
- alias ``challenger``: the latest registered model; alias ``champion``: the model in service.
- version tag ``clipmill.model_hash``: content hash of the local-dir export (one version per distinct model).
- version tag ``clipmill.eval.<suite version>``: JSON of the metrics on that suite; ``clipmill.suite_version`` and
  ``metric.<name>`` hold the metrics it was registered with.
- model tag ``clipmill.champion_history``: JSON list of the versions that held ``champion``, oldest first.
"""
from __future__ import annotations

import json
import re

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from components.common.errors import ClipmillError
from components.common.evaluation import EvaluationRecord

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_MODEL_HASH = "clipmill.model_hash"
TAG_SUITE = "clipmill.suite_version"
TAG_EVAL_PREFIX = "clipmill.eval."
TAG_METRIC_PREFIX = "metric."
TAG_HISTORY = "clipmill.champion_history"
HISTORY_LIMIT = 200  # keeps the tag under MLflow's value-length limit


def require_model(client: MlflowClient, name: str) -> None:
    """A ClipmillError when ``name`` is not a registered model."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise ClipmillError(f"the registry ({client.tracking_uri}) has no model named '{name}': "
                            f"register one with `clipmill stage register`") from None


def get_version(client: MlflowClient, name: str, version: str | int) -> ModelVersion:
    """Version ``version`` of ``name``; a ClipmillError naming the known versions when it does not exist."""
    require_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        known = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise ClipmillError(f"model '{name}' has no version {version} "
                            f"(versions: {', '.join(map(str, known)) or 'none'})") from None


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding ``alias``, or None when no version does."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def all_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of ``name``, oldest first; a ClipmillError when the model is not registered."""
    require_model(client, name)
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def find_by_hash(client: MlflowClient, name: str, model_hash: str) -> ModelVersion | None:
    """The oldest version of ``name`` holding the model with this content hash."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        return None
    found = client.search_model_versions(f"name='{name}' and tags.`{TAG_MODEL_HASH}` = '{model_hash}'")
    return min(found, key=lambda v: int(v.version)) if found else None


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
    raw = client.get_registered_model(name).tags.get(TAG_HISTORY)
    return json.loads(raw) if raw else []


def set_champion_history(client: MlflowClient, name: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, TAG_HISTORY, json.dumps(history[-HISTORY_LIMIT:]))
