"""The evaluate stage end to end on a tiny open_clip model and a tiny versioned suite."""
from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from clipmill.cli import main
from clipmill.components.common.errors import InputError
from clipmill.components.common.evalsets import (
    concept_counts,
    evaluate_clip,
    frequency_buckets,
    load_eval_suite,
    load_image_folder,
)
from clipmill.components.common.evaluation import EvaluationRecord, model_hash
from clipmill.components.common.model import load_clip
from tests.conftest import REPO
from tests.registry_fixtures import COLORS, png, tiny_model, write_eval_suite

EXPECTED = {"zeroshot/acc1", "zeroshot/acc5", "zeroshot/mean_per_class_recall", "retrieval/modality_gap",
            *(f"retrieval/{d}_recall_at_{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))}
BUCKETED = {"zeroshot/recall_head", "zeroshot/recall_mid", "zeroshot/recall_tail"}
# How often each class of the suite occurs in the "training crawl" (the demo's ground truth has a concepts column).
CRAWL = {"red": 40, "green": 3, "blue": 12, "yellow": 1}


def write_ground_truth(path):
    rows = [{"uid": f"{name}{i}", "concepts": [name, name] if i % 2 else [name]}
            for name, n in CRAWL.items() for i in range(n)]
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def write_params(tmp_path, **evaluate) -> str:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["evaluate"].update(evaluate)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lineage tags read dvc.lock from the working directory
    return write_eval_suite(tmp_path / "eval"), tiny_model(tmp_path / "model")


def _run(tmp_path, eval_dir, model, **evaluate):
    truth = write_ground_truth(tmp_path / "ground_truth.parquet")
    params = write_params(tmp_path, **{"concept_counts": str(truth), **evaluate})
    return main(["stage", "evaluate", "--params", params, "--model", str(model), "--eval-dir", str(eval_dir),
                 "--out", str(tmp_path / "evaluate"), "--reports", str(tmp_path / "reports")])


def test_evaluate_writes_versioned_metrics_plots_and_mlflow_run(tmp_path, mlflow_uri, setup):
    eval_dir, model = setup
    assert _run(tmp_path, eval_dir, model) == 0

    record = EvaluationRecord.read(tmp_path / "evaluate" / "metrics.json")
    assert record.suite_version == "test-1"
    assert record.model_hash == model_hash(model)
    assert set(record.metrics) == EXPECTED | BUCKETED
    # the numbers are those of the shared evaluation function, not a second implementation
    suite = load_eval_suite(eval_dir, tmp_path / "ground_truth.parquet")
    assert record.metrics == pytest.approx(evaluate_clip(load_clip(str(model)), suite, 64))

    per_class = pd.read_csv(tmp_path / "evaluate" / "per_class.csv")
    assert per_class["support"].tolist() == [5, 5, 5, 5]
    assert per_class["recall"].mean() == pytest.approx(record.metrics["zeroshot/mean_per_class_recall"])
    assert dict(zip(per_class["class_name"], per_class["crawl_count"])) == CRAWL  # a pair counts once per concept
    assert dict(zip(per_class["class_name"], per_class["bucket"])) == {"red": "head", "blue": "head", "green": "mid",
                                                                       "yellow": "tail"}
    assert record.metrics["zeroshot/recall_tail"] == per_class.set_index("class_name").at["yellow", "recall"]

    bench = json.loads((tmp_path / "evaluate" / "clip_benchmark" / "clipmill_zeroshot_zeroshot_classification.json")
                       .read_text())
    assert bench["task"] == "zeroshot_classification" and bench["pretrained"] == record.model_hash
    assert bench["metrics"]["acc1"] == record.metrics["zeroshot/acc1"]
    retrieval = json.loads((tmp_path / "evaluate" / "clip_benchmark" / "clipmill_retrieval_zeroshot_retrieval.json")
                           .read_text())
    assert retrieval["metrics"]["image_retrieval_recall@5"] == record.metrics["retrieval/text_to_image_recall_at_5"]
    assert retrieval["metrics"]["text_retrieval_recall@5"] == record.metrics["retrieval/image_to_text_recall_at_5"]
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
    assert err.count("\n") == 0 and "suite.json: no such file" in err and "version" in err
    assert not (tmp_path / "evaluate").exists()
    for content, reason in ((b"[1]", "expected a JSON object, got list"), (b'{"version": "caf\xe9"}', "not UTF-8"),
                            (b"{version", "not valid JSON")):
        (eval_dir / "suite.json").write_bytes(content)
        assert _run(tmp_path, eval_dir, model) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"suite.json: {reason}" in err, err


def test_metrics_of_another_file_layout_are_rejected_with_the_field(tmp_path):
    (tmp_path / "metrics.json").write_text('{"suite_version": "s", "model_hash": "h", "metrics": {"a": "high"}}')
    with pytest.raises(Exception, match="metrics.a"):
        EvaluationRecord.read(tmp_path / "metrics.json")


def write_clip_benchmark_dir(root, classes=("red", "blue"), per_class: int = 3):
    """A CLIP_benchmark-style dataset: a folder of images per class, classnames.txt, templates with {c}."""
    for i, name in enumerate(classes):
        (root / f"{i:03d}").mkdir(parents=True)
        for k in range(per_class):
            (root / f"{i:03d}" / f"{k}.png").write_bytes(png(COLORS[name], 500 + 10 * i + k))
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c} square.\na {c} tile.\n")
    return root


def test_the_fast_path_draws_no_plots_and_a_clip_benchmark_directory_is_one_more_task(tmp_path, mlflow_uri, setup):
    eval_dir, model = setup
    extra = write_clip_benchmark_dir(tmp_path / "tiles")
    assert _run(tmp_path, eval_dir, model, plots=False, extra_zeroshot=[str(extra)]) == 0
    assert not (tmp_path / "reports").exists()
    metrics = EvaluationRecord.read(tmp_path / "evaluate" / "metrics.json").metrics
    assert {"zeroshot_tiles/acc1", "zeroshot_tiles/acc5", "zeroshot_tiles/mean_per_class_recall"} <= set(metrics)
    bench = json.loads((tmp_path / "evaluate" / "clip_benchmark" / "tiles_zeroshot_classification.json").read_text())
    assert bench["dataset"] == "tiles" and bench["metrics"]["acc1"] == metrics["zeroshot_tiles/acc1"]
    suite = load_eval_suite(eval_dir, extra_zeroshot=[str(extra)])
    assert suite.extra_zeroshot["tiles"].templates == ["a photo of a {} square.", "a {} tile."]
    assert suite.extra_zeroshot["tiles"].labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_a_clip_benchmark_directory_with_more_folders_than_names_is_one_clear_error(tmp_path, mlflow_uri, setup,
                                                                                     capsys):
    eval_dir, model = setup
    extra = write_clip_benchmark_dir(tmp_path / "tiles")
    (extra / "classnames.txt").write_text("red\n")
    assert _run(tmp_path, eval_dir, model, extra_zeroshot=[str(extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tiles" in err and "2 class folders but 1 names" in err
    assert not (tmp_path / "evaluate").exists()


@pytest.mark.parametrize("damage, where, reason", [
    (lambda d: (d / "classnames.txt").write_bytes("caf\xe9\nred\n".encode("latin-1")), "classnames.txt",
     "not UTF-8 text (byte 0xe9 at offset 3)"),
    (lambda d: (d / "zeroshot_classification_templates.txt").write_text("a {c} and a {c}\n"),
     "zeroshot_classification_templates.txt", "each with exactly one '{c}' or '{}'"),
    (lambda d: (d / "zeroshot_classification_templates.txt").write_text("a {c} of {size}\n"),
     "zeroshot_classification_templates.txt", "each with exactly one '{c}' or '{}'"),
    (lambda d: (d / "001" / "9.png").write_bytes(b"not an image"), "001/9.png", "not an image the evaluation can read"),
])
def test_a_clip_benchmark_directory_with_bad_text_templates_or_images_is_one_input_error(tmp_path, damage, where,
                                                                                         reason):
    extra = write_clip_benchmark_dir(tmp_path / "tiles")
    damage(extra)
    with pytest.raises(InputError) as err:
        load_image_folder(extra)
    assert err.value.file == str(extra / where) and reason in err.value.reason


def test_captions_count_a_class_only_where_its_name_stands_as_words(tmp_path):
    urls = tmp_path / "urls.parquet"
    pd.DataFrame({"caption": ["A Red Circle, on white", "redcircle.jpg", "red circles", "a red circle and a blue star",
                              None]}).to_parquet(urls, index=False)
    assert concept_counts(urls, ["red circle", "blue star", "green ring"]).tolist() == [2, 1, 0]
    # thirds by count, most frequent first; ties keep the class order
    assert frequency_buckets(np.array([5, 9, 0, 5, 1, 7])).tolist() == ["mid", "head", "tail", "mid", "tail", "head"]


def test_class_attributes_score_the_part_of_a_class_the_top1_gets_right(tmp_path):
    """acc1_<name>: the share of images whose top-1 class has their class's value. One value per class is acc1,
    one value for all classes is 1, and a coarser grouping lies between (a right class has a right value)."""
    eval_dir = write_eval_suite(tmp_path / "eval")
    spec = json.loads((eval_dir / "zeroshot_classes.json").read_text())
    warmth = {"red": "warm", "yellow": "warm", "green": "cool", "blue": "cool"}
    spec["attributes"] = {"name": list(spec["classes"]), "any": ["x"] * len(spec["classes"]),
                          "warmth": [warmth[c] for c in spec["classes"]]}
    (eval_dir / "zeroshot_classes.json").write_text(json.dumps(spec))
    scores = evaluate_clip(load_clip(str(tiny_model(tmp_path / "model"))), load_eval_suite(eval_dir), 64)
    assert scores["zeroshot/acc1_name"] == scores["zeroshot/acc1"]
    assert scores["zeroshot/acc1_any"] == 1.0
    assert scores["zeroshot/acc1"] <= scores["zeroshot/acc1_warmth"] <= 1.0

    spec["attributes"] = {"warmth": ["warm", "cool"]}  # not one value per class
    (eval_dir / "zeroshot_classes.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match="attribute") as caught:
        load_eval_suite(eval_dir)
    assert caught.value.field == "attributes" and "zeroshot_classes.json" in str(caught.value)
