"""The evaluate stage end to end on a tiny open_clip model and a tiny versioned suite."""
from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from clipmill.cli import main
from components.common.evalsets import evaluate_clip, load_eval_suite
from components.common.evaluation import EvaluationRecord, model_hash
from components.common.model import load_clip
from tests.conftest import REPO
from tests.registry_fixtures import tiny_model, write_eval_suite

PARAMS = str(REPO / "params.yaml")
EXPECTED = {"zeroshot/acc1", "zeroshot/acc5", "zeroshot/mean_per_class_recall", "retrieval/modality_gap",
            *(f"retrieval/{d}_recall_at_{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lineage tags read dvc.lock from the working directory
    return write_eval_suite(tmp_path / "eval"), tiny_model(tmp_path / "model")


def _run(tmp_path, eval_dir, model):
    return main(["stage", "evaluate", "--params", PARAMS, "--model", str(model), "--eval-dir", str(eval_dir),
                 "--out", str(tmp_path / "evaluate"), "--reports", str(tmp_path / "reports")])


def test_evaluate_writes_versioned_metrics_plots_and_mlflow_run(tmp_path, mlflow_uri, setup):
    eval_dir, model = setup
    assert _run(tmp_path, eval_dir, model) == 0

    record = EvaluationRecord.read(tmp_path / "evaluate" / "metrics.json")
    assert record.suite_version == "test-1"
    assert record.model_hash == model_hash(model)
    assert set(record.metrics) == EXPECTED
    # the numbers are those of the shared evaluation function, not a second implementation
    assert record.metrics == pytest.approx(evaluate_clip(load_clip(str(model)), load_eval_suite(eval_dir), 64))

    per_class = pd.read_csv(tmp_path / "evaluate" / "per_class.csv")
    assert per_class["support"].tolist() == [5, 5, 5, 5]
    assert per_class["recall"].mean() == pytest.approx(record.metrics["zeroshot/mean_per_class_recall"])
    for name in ("per_class_accuracy.png", "confusion_matrix.png", "retrieval_examples.png"):
        assert (tmp_path / "reports" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    mlflow.set_tracking_uri(mlflow_uri)
    (run,) = mlflow.search_runs(experiment_names=["clipmill"], output_format="list")
    assert run.data.tags["clipmill.stage"] == "evaluate"
    assert run.data.tags["clipmill.suite_version"] == "test-1"
    assert run.data.metrics["zeroshot/acc1"] == pytest.approx(record.metrics["zeroshot/acc1"])
    logged = {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/confusion_matrix.png", "evaluation/per_class.csv"} <= logged


def test_a_suite_without_a_version_is_refused_before_anything_is_written(tmp_path, mlflow_uri, setup, capsys):
    eval_dir, model = setup
    (eval_dir / "suite.json").unlink()
    assert _run(tmp_path, eval_dir, model) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "suite.json" in err and "version" in err
    assert not (tmp_path / "evaluate").exists()


def test_metrics_of_another_file_layout_are_rejected_with_the_field(tmp_path):
    (tmp_path / "metrics.json").write_text('{"suite_version": "s", "model_hash": "h", "metrics": {"a": "high"}}')
    with pytest.raises(Exception, match="metrics.a"):
        EvaluationRecord.read(tmp_path / "metrics.json")
