"""Evaluation records: which model, on which suite version, scored what.

The evaluation stage writes one (``data/evaluate/metrics.json``); registration reads it and, when the champion
was measured on an older suite, re-evaluates the champion with ``evaluate_source``. A metric is only ever
compared with a metric from the same suite version.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import InputError
from .hashing import content_hash
from .io import read_json, write_json

SUITE_FILE = "suite.json"  # {"version": "...", "sets": {...}} beside the evaluation sets


@dataclass(frozen=True)
class EvaluationRecord:
    """Metrics (``zeroshot/acc1``, ``retrieval/..._recall_at_5``, ...) of the model with ``model_hash``."""

    suite_version: str
    model_hash: str
    metrics: dict[str, float]

    def write(self, path: str | os.PathLike) -> Path:
        return write_json(asdict(self), path)

    @classmethod
    def read(cls, path: str | os.PathLike) -> EvaluationRecord:
        path = Path(path)
        data = read_json(path, missing="evaluation metrics file does not exist (run `clipmill stage evaluate` first)")
        if not isinstance(data, dict):
            raise InputError(path, "expected a JSON object")
        for key in ("suite_version", "model_hash"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise InputError(path, "missing or not a non-empty string", field=key)
        metrics = data.get("metrics")
        if not isinstance(metrics, dict) or not metrics:
            raise InputError(path, "missing or empty", field="metrics")
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(path, f"not a finite number: {value!r}", field=f"metrics.{name}")
        return cls(data["suite_version"], data["model_hash"], {k: float(v) for k, v in metrics.items()})


def read_suite_version(eval_dir: str | os.PathLike) -> str:
    """The version of the evaluation suite in ``eval_dir`` (``suite.json``'s ``version``)."""
    path = Path(eval_dir) / SUITE_FILE
    data = read_json(path, missing="no such file: an evaluation suite is a directory whose suite.json names its "
                                   "version (the demo_corpus stage writes data/eval; --eval-dir points elsewhere)")
    if not isinstance(data, dict):
        raise InputError(path, f"expected a JSON object, got {type(data).__name__}")
    version = data.get("version")
    if not isinstance(version, str) or not version:
        raise InputError(path, "missing or not a non-empty string", field="version")
    return version


def model_hash(local_dir: str | os.PathLike) -> str:
    """Content hash of an open_clip local-dir export (config + weights), independent of the directory's name."""
    from .model import CONFIG_FILE, WEIGHTS_FILE

    local_dir = Path(local_dir)
    files = [local_dir / CONFIG_FILE, local_dir / WEIGHTS_FILE]
    for f in files:
        if not f.is_file():
            raise InputError(local_dir, f"not an open_clip export: {f.name} is missing")
    return content_hash(files)


def evaluate_source(source: str, eval_dir: str | os.PathLike, *, batch_size: int = 64, device: str = "cpu",
                    tracking_uri: str | None = None) -> EvaluationRecord:
    """Evaluate the model at ``source`` (local-dir export or MLflow URI) on the suite in ``eval_dir``."""
    from .evalsets import evaluate_clip, load_eval_suite
    from .model import load_clip, resolve_model_source

    suite_version = read_suite_version(eval_dir)
    suite = load_eval_suite(eval_dir)
    with resolve_model_source(source, tracking_uri) as path:
        digest = model_hash(path)
        clip = load_clip(str(path), device=device)
    return EvaluationRecord(suite_version, digest, evaluate_clip(clip, suite, batch_size))


# CLIP_benchmark's result files: {"dataset", "model", "pretrained", "task", "metrics", "language"} per task.
_CLIP_BENCHMARK_RETRIEVAL = {"text_to_image": "image_retrieval", "image_to_text": "text_retrieval"}


def clip_benchmark_results(metrics: dict[str, float], model: str, pretrained: str,
                           suite: str = "clipmill") -> dict[str, dict]:
    """``metrics`` (``evaluate_clip``'s keys) as CLIP_benchmark result JSONs, keyed by file name: one
    zeroshot_classification result per zero-shot task (``zeroshot`` is the dataset ``<suite>_zeroshot``,
    ``zeroshot_<name>`` the dataset ``<name>``) and one zeroshot_retrieval result (``<suite>_retrieval``)."""
    tasks: dict[tuple[str, str], dict[str, float]] = {}
    for key, value in metrics.items():
        group, _, name = key.partition("/")
        if group == "zeroshot" or group.startswith("zeroshot_"):
            dataset = f"{suite}_zeroshot" if group == "zeroshot" else group[len("zeroshot_"):]
            tasks.setdefault((dataset, "zeroshot_classification"), {})[name] = value
        elif group == "retrieval" and "_recall_at_" in name:
            direction, _, k = name.partition("_recall_at_")
            tasks.setdefault((f"{suite}_retrieval", "zeroshot_retrieval"), {})[
                f"{_CLIP_BENCHMARK_RETRIEVAL[direction]}_recall@{k}"] = value
    return {f"{dataset}_{task}.json": {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task,
                                       "metrics": values, "language": "en"}
            for (dataset, task), values in sorted(tasks.items())}
