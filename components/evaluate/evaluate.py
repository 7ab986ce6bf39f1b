"""The evaluation stage: score a trained model on the versioned held-out suite and draw what the scores hide.

In: a model (local-dir export or MLflow URI) and the evaluation directory (``zeroshot.parquet``,
``zeroshot_classes.json``, ``retrieval.parquet``, ``suite.json``), plus what ``evaluate.concept_counts`` and
``evaluate.extra_zeroshot`` name. Out: ``metrics.json`` (suite version, model hash, metrics), ``per_class.csv``
(with each class's crawl count and head/mid/tail third) and ``clip_benchmark/*.json`` (the same numbers in
CLIP_benchmark's result format) in the output directory; PNG plots in the reports directory (unless
``evaluate.plots`` is false); all of it in an MLflow stage run. The numbers come from
``clipmill.components.common.evalsets.evaluate_clip``, the same function training's in-loop validation uses.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from clipmill.components.common.evalsets import EvalResult, EvalSuite, evaluate_details, load_eval_suite
from clipmill.components.common.evaluation import (
    EvaluationRecord,
    clip_benchmark_results,
    model_hash,
    read_suite_version,
)
from clipmill.components.common.io import atomic_path, write_json
from clipmill.components.common.log import get_logger
from clipmill.components.common.model import ClipModel, embed_texts, load_clip, resolve_model_source
from clipmill.components.common.params import TrackingParams
from clipmill.components.common.tracking import stage_run, tracking_uri

from . import plots
from .params import EvaluateParams

log = get_logger("evaluate")

METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class.csv"
CLIP_BENCHMARK_DIR = "clip_benchmark"
EXAMPLES_TOP_K = 5


def retrieval_ranking(clip: ClipModel, suite: EvalSuite, images: torch.Tensor, queries: int, batch_size: int):
    """Text-to-image top-k for the first caption of ``queries`` evenly spaced retrieval images (``images``: the
    retrieval images' embeddings).

    Returns (query texts, ranked image indices [Q, k], index of each query's own image [Q]).
    """
    rt = suite.retrieval
    own = np.unique(np.linspace(0, len(rt.images) - 1, num=min(queries, len(rt.images))).astype(int))
    texts = [rt.captions[i][0] for i in own]
    scores = embed_texts(clip, texts, batch_size) @ images.T
    k = min(EXAMPLES_TOP_K, len(rt.images))
    ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k].numpy()
    return texts, ranked, own


def draw_plots(clip: ClipModel, suite: EvalSuite, result: EvalResult, suite_version: str, params: EvaluateParams,
               reports_dir: Path) -> list[Path]:
    """The PNG plots in ``reports_dir``, from the evaluation's ``result`` (its predictions and embeddings)."""
    paths = []
    if suite.zeroshot is not None:
        zs, details = suite.zeroshot, result.zeroshot
        table = result.per_class
        paths.append(plots.per_class_accuracy(
            table["class_name"].tolist(), table["recall"].to_numpy(), table["support"].to_numpy(),
            f"Zero-shot top-1 recall per class (suite {suite_version})", reports_dir / "per_class_accuracy.png"))
        paths.append(plots.confusion_matrix(
            zs.classes, details.labels, details.predictions, params.confusion_max_classes,
            f"Zero-shot confusion matrix (suite {suite_version})", reports_dir / "confusion_matrix.png"))
    if suite.retrieval is not None:
        texts, ranked, own = retrieval_ranking(clip, suite, result.retrieval_images, params.example_queries,
                                               params.batch_size)
        paths.append(plots.retrieval_examples(
            texts, ranked, own, suite.retrieval.images,
            f"Text-to-image retrieval: top {ranked.shape[1]} (green: the caption's own image)",
            reports_dir / "retrieval_examples.png"))
    return paths


def evaluate(model: str | Path, eval_dir: str | Path, out_dir: str | Path, reports_dir: str | Path,
             params: EvaluateParams, tracking: TrackingParams) -> EvaluationRecord:
    """Evaluate ``model`` on the suite in ``eval_dir``; writes metrics.json, per_class.csv and the plots."""
    eval_dir, out_dir, reports_dir = Path(eval_dir), Path(out_dir), Path(reports_dir)
    suite_version = read_suite_version(eval_dir)
    suite = load_eval_suite(eval_dir, params.concept_counts, params.extra_zeroshot)
    with resolve_model_source(str(model), tracking_uri(tracking)) as model_path:
        digest = model_hash(model_path)
        clip = load_clip(str(model_path), device=params.device)
        data_paths = [model_path, eval_dir]
        with stage_run("evaluate", tracking, params, data_paths) as run:
            started = time.perf_counter()
            result = evaluate_details(clip, suite, params.batch_size)
            scores, table = result.metrics, result.per_class
            seconds = time.perf_counter() - started
            n_images = sum(len(s.images) for s in (suite.zeroshot, suite.retrieval, *suite.extra_zeroshot.values())
                           if s is not None)
            log.info("suite %s: %d images scored in %.1fs (%.0f images/s): %s", suite_version, n_images, seconds,
                     n_images / max(seconds, 1e-9), ", ".join(f"{k}={v:.4f}" for k, v in sorted(scores.items())))
            record = EvaluationRecord(suite_version, digest, scores)
            plot_paths = draw_plots(clip, suite, result, suite_version, params, reports_dir) if params.plots else []
            with atomic_path(out_dir, owner="evaluate") as tmp:
                tmp.mkdir()
                record.write(tmp / METRICS_FILE)
                if table is not None:
                    table.to_csv(tmp / PER_CLASS_FILE, index=False)
                for name, result_json in clip_benchmark_results(scores, str(model), digest).items():
                    write_json(result_json, tmp / CLIP_BENCHMARK_DIR / name)
            if run is not None:
                import mlflow

                mlflow.log_metrics(scores)
                mlflow.log_metric("evaluate/images_per_second", n_images / max(seconds, 1e-9))
                mlflow.set_tags({"clipmill.suite_version": suite_version, "clipmill.model_hash": digest,
                                 "clipmill.model_source": str(model)})
                for path in [out_dir / METRICS_FILE, *plot_paths]:
                    mlflow.log_artifact(str(path), artifact_path="evaluation")
                if table is not None:
                    mlflow.log_artifact(str(out_dir / PER_CLASS_FILE), artifact_path="evaluation")
                mlflow.log_artifacts(str(out_dir / CLIP_BENCHMARK_DIR),
                                     artifact_path=f"evaluation/{CLIP_BENCHMARK_DIR}")
    return record
