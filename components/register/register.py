"""The register stage: export the trained model, add it to the registry as ``challenger``, apply the policy.

In: the trained local-dir export, its evaluation record (``metrics.json``, checked to be of this very model),
the training ``run.json``, the curated data directory (hashed for lineage) and the evaluation directory (to
re-evaluate the champion when it was measured on an older suite). Out: a registered model version with lineage
and metric tags, ``registration.json`` (name, version, decision) and ``reports/promotion.md``, both also logged
to the stage's MLflow run. Registering the same model again reuses its version.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipmill.components.common.errors import ConfigError, InputError
from clipmill.components.common.evaluation import EvaluationRecord, model_hash
from clipmill.components.common.hashing import content_hash
from clipmill.components.common.io import check_stage_dir, read_json, write_json, write_text
from clipmill.components.common.log import get_logger
from clipmill.components.common.params import TrackingParams
from clipmill.components.common.tracking import lineage_tags, stage_run, tracking_uri

from .export import log_clip_model
from .params import RegisterParams
from .promotion import PromotionRecord, apply_policy, promotion_report
from .registry import (
    CHALLENGER,
    TAG_METRIC_PREFIX,
    TAG_MODEL_HASH,
    TAG_SUITE,
    find_by_hash,
    get_version,
    record_metrics,
    recorded_metrics,
)

log = get_logger("register")

REGISTRATION_FILE = "registration.json"
REPORT_FILE = "promotion.md"


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    model_uri: str
    newly_registered: bool
    promotion: PromotionRecord | None


def read_train_run(path: str | os.PathLike | None) -> dict[str, str]:
    """The MLflow run id and the warm start in training's ``run.json`` ("none" when there is no such file)."""
    if path is None or not Path(path).is_file():
        return {"run_id": "none", "init_from": "none"}
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(path, "expected an object with run_id and init_from")
    for key in ("run_id", "init_from"):
        if not isinstance(data.get(key), (str, type(None))):
            raise InputError(path, "expected a string or null", field=key)
    return {"run_id": data.get("run_id") or "none", "init_from": data.get("init_from") or "none"}


def read_url_lists(path: str | os.PathLike | None) -> str:
    """The crawl's URL lists (download summary's ``url_lists``) as "crawl,<id>,...", or "unknown"."""
    if path is None or not Path(path).is_file():
        return "unknown"
    lists = read_json(path).get("url_lists")
    if not isinstance(lists, list):
        return "unknown"
    return ",".join(str(entry.get("name")) for entry in lists)[:4000]  # under MLflow's tag value limit


def version_tags(record: EvaluationRecord, lineage: dict[str, str], curated_hash: str, train_run: dict[str, str],
                 url_lists: str = "unknown") -> dict[str, str]:
    """What a model version carries: lineage (code, params, the data it saw), training run, warm start, suite
    and metrics."""
    tags = {
        "clipmill.git_commit": lineage["clipmill.git_commit"],
        "clipmill.dvc_lock_hash": lineage["clipmill.dvc_lock_hash"],
        "clipmill.params_hash": lineage["clipmill.params_hash"],
        "clipmill.curated_data_hash": curated_hash,
        "clipmill.data.url_lists": url_lists,
        "clipmill.train_run_id": train_run["run_id"],
        "clipmill.warm_start": train_run["init_from"],
        TAG_MODEL_HASH: record.model_hash,
        TAG_SUITE: record.suite_version,
    }
    tags.update({f"{TAG_METRIC_PREFIX}{k}": f"{v:.6g}" for k, v in sorted(record.metrics.items())})
    return tags


def register(model_dir: str | os.PathLike, metrics_file: str | os.PathLike, eval_dir: str | os.PathLike,
             out_dir: str | os.PathLike, reports_dir: str | os.PathLike, *, params: RegisterParams,
             tracking: TrackingParams, pipeline_params: Any, train_run_file: str | os.PathLike | None = None,
             curated_dir: str | os.PathLike | None = None, download_summary: str | os.PathLike | None = None,
             eval_batch_size: int = 64,
             eval_device: str = "cpu") -> Registration:
    """Register the model at ``model_dir`` and (with ``params.promote``) apply the promotion policy.

    ``pipeline_params`` (the whole params.yaml) is hashed into the version's ``clipmill.params_hash``.
    """
    from mlflow import MlflowClient

    if not tracking.enabled:
        raise ConfigError("tracking.enabled is false: registering a model needs the MLflow tracking store")
    model_dir, out_dir, reports_dir = Path(model_dir), Path(out_dir), Path(reports_dir)
    check_stage_dir(out_dir, "a registration output", [REGISTRATION_FILE])
    record, digest = _checked_record(model_dir, metrics_file)
    train_run = read_train_run(train_run_file)
    url_lists = read_url_lists(download_summary)
    curated = Path(curated_dir) if curated_dir is not None else None
    curated_hash = content_hash([curated]) if curated is not None and curated.exists() else "none"
    with stage_run("register", tracking, params, [model_dir, metrics_file]) as run:
        client = MlflowClient(tracking_uri(tracking))
        version, new = _challenger(client, params, model_dir, digest)
        tags = version_tags(record, lineage_tags(pipeline_params, []), curated_hash, train_run, url_lists)
        version = _tag_challenger(client, version, tags, record)
        promotion = (apply_policy(client, version, record, params, eval_dir, eval_batch_size, eval_device)
                     if params.promote else None)
        write_text(_report(client, params, version, record, promotion), reports_dir / REPORT_FILE)
        registration = Registration(params.model_name, str(version.version),
                                    f"models:/{params.model_name}/{version.version}", new, promotion)
        summary = {"name": registration.name, "version": registration.version, "model_uri": registration.model_uri,
                   "model_hash": digest, "suite_version": record.suite_version,
                   "warm_start": train_run["init_from"], "url_lists": url_lists, "curated_data_hash": curated_hash,
                   "promotion": json.loads(promotion.to_json()) if promotion else None}
        write_json(summary, out_dir / REGISTRATION_FILE)
        if run is not None:
            _log_to_run(registration, out_dir / REGISTRATION_FILE, reports_dir / REPORT_FILE)
    return registration


def _checked_record(model_dir: Path, metrics_file: str | os.PathLike) -> tuple[EvaluationRecord, str]:
    """The evaluation record and the model's hash, refused when the record is of another model."""
    record = EvaluationRecord.read(metrics_file)
    digest = model_hash(model_dir)
    if digest != record.model_hash:
        raise InputError(metrics_file, f"these metrics are of another model ({record.model_hash[:12]}, not "
                                       f"{digest[:12]} in {model_dir}): re-run `clipmill stage evaluate`",
                         field="model_hash")
    return record, digest


def _challenger(client, params: RegisterParams, model_dir: Path, digest: str) -> tuple[Any, bool]:
    """The model's registered version, created unless one of the same hash exists; (version, newly created)."""
    import mlflow

    name = params.model_name
    existing = find_by_hash(client, name, digest)
    if existing is not None:
        log.info("model %s is already %s version %s: reusing it", digest[:12], name, existing.version)
        return existing, False
    info = log_clip_model(model_dir, model_config=params.serving.model_dump())
    # The version is created with its model hash: a run killed at any point leaves either no version or one
    # that the rerun finds and reuses, never an untagged duplicate.
    created = mlflow.register_model(info.model_uri, name, tags={TAG_MODEL_HASH: digest})
    version = get_version(client, name, created.version)
    log.info("registered %s version %s (%s)", name, version.version, info.model_uri)
    return version, True


def _tag_challenger(client, version, tags: dict[str, str], record: EvaluationRecord):
    """Lineage and metric tags on ``version`` (a reused version keeps those of its first registration), then the
    ``challenger`` alias; returns the version as it now is."""
    name = version.name
    for key, value in tags.items():
        if key not in version.tags:
            client.set_model_version_tag(name, version.version, key, value)
    if recorded_metrics(version, record.suite_version) != record.metrics:
        record_metrics(client, version, record)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return get_version(client, name, version.version)


def _report(client, params: RegisterParams, version, record: EvaluationRecord,
            promotion: PromotionRecord | None) -> str:
    """promotion.md: the policy's decision against the champion, or that the policy is off."""
    name = params.model_name
    if promotion is None:
        return (f"# Registration: {name} version {version.version}\n\n- promotion policy off "
                f"(`register.promote: false`): the version is `{CHALLENGER}`, `champion` is unchanged\n")
    champion = promotion.champion_version
    champ_metrics = (recorded_metrics(get_version(client, name, champion), record.suite_version)
                     if champion and champion != str(version.version) else None)
    return promotion_report(name, promotion, record.metrics, champ_metrics, params)


def _log_to_run(registration: Registration, registration_file: Path, report_file: Path) -> None:
    import mlflow

    mlflow.set_tags({"clipmill.registered_model": registration.name,
                     "clipmill.registered_version": registration.version})
    mlflow.log_artifact(str(registration_file))
    mlflow.log_artifact(str(report_file))
    if registration.promotion is not None:
        mlflow.set_tag("clipmill.promotion.outcome", registration.promotion.decision.outcome)
