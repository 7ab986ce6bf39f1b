"""CLIP-score filter: thresholds, equality with bare open_clip, scorer sources, records and CLI."""
from __future__ import annotations

import io
import json
import tarfile

import mlflow
import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from clipmill.cli import main
from components.common.errors import ClipmillError, ConfigError, InputError
from components.common.model import create_clip, export_local_dir
from components.common.params import RayParams, TrackingParams
from components.score.params import ScoreParams
from components.common.shards import shard_file_name
from components.score.scoring import score_survivors, score_threshold
from tests.curation_fixtures import make_download

NO_TRACKING = TrackingParams(enabled=False)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    torch.manual_seed(0)
    return export_local_dir(create_clip("clipmill-tiny"), tmp_path_factory.mktemp("scorer") / "model")


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    root = tmp_path_factory.mktemp("download")
    found = make_download(root, n=60, per_shard=25)
    table = found["table"]
    ok = table["status"] == "success"
    rules = pd.DataFrame({"uid": table["uid"], "keep": ok, "reason": np.where(ok, None, "download:http_404")})
    rules.to_parquet(root / "rules.parquet", index=False)
    return {**found, "rules": root / "rules.parquet", "kept": table[ok]}


def bare_open_clip_scores(export_dir, images: list[bytes], captions: list[str]) -> np.ndarray:
    """The reference: open_clip's own loader, transforms and tokenizer, cosine of normalized features."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export_dir}")
    model.eval()
    pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    with torch.no_grad():
        image_features = model.encode_image(pixels)
        text_features = model.encode_text(tokenizer(captions))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return (image_features * text_features).sum(-1).numpy()


def read_images(download, rows: pd.DataFrame) -> list[bytes]:
    out = []
    for shard, key in zip(rows["shard"], rows["key"]):
        with tarfile.open(download["shards"] / shard_file_name(shard)) as tar:
            out.append(tar.extractfile(f"{key}.jpg").read())
    return out


def test_top_fraction_threshold_keeps_ties():
    scores = np.array([0.1, 0.8, 0.9, 0.8, 0.8, 0.3], dtype=np.float32)
    # n = 6, f = 0.34: rank floor(2.04) = 2 of [0.9, 0.8, 0.8, 0.8, 0.3, 0.1] -> 0.8; all three 0.8 kept
    assert score_threshold(scores, 0.34, None) == pytest.approx(0.8)
    assert (scores >= score_threshold(scores, 0.34, None)).sum() == 4
    assert score_threshold(scores, 0.1, None) == pytest.approx(0.9)  # rank 0: the best score only
    assert score_threshold(scores, 0.5, None) == pytest.approx(0.8)  # rank 3, still a tie
    assert score_threshold(scores, 0.7, None) == pytest.approx(0.3)  # rank 4
    assert score_threshold(scores, 1.0, None) == pytest.approx(0.1)  # rank n: keep everything
    assert score_threshold(np.array([], dtype=np.float32), 0.5, None) is None


def test_absolute_threshold_and_both():
    scores = np.array([0.1, 0.24, 0.25, 0.3], dtype=np.float32)
    assert score_threshold(scores, None, 0.25) == 0.25
    assert (scores >= 0.25).sum() == 2
    assert score_threshold(scores, 0.75, 0.2) == pytest.approx(0.2)  # rank 3 -> 0.1, below the absolute 0.2
    assert score_threshold(scores, 0.25, 0.2) == pytest.approx(0.25)  # rank 1 -> 0.25 > 0.2
    assert score_threshold(scores, None, None) is None


def test_scores_equal_bare_open_clip_cosine(download, tiny_export, tmp_path):
    params = ScoreParams(scorer=f"local-dir:{tiny_export}", top_fraction=0.5, batch_size=16, device="cpu")
    summary = score_survivors(download["manifest"], download["rules"], download["shards"], tmp_path, params,
                              RayParams(), NO_TRACKING)
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    kept = download["kept"]
    assert list(scores.columns) == ["uid", "clip_score", "keep", "reason", "threshold"]
    assert scores["uid"].tolist() == kept["uid"].tolist()

    reference = bare_open_clip_scores(tiny_export, read_images(download, kept), kept["caption"].tolist())
    np.testing.assert_allclose(scores["clip_score"], reference, atol=1e-5)

    n = len(scores)
    threshold = np.sort(reference)[::-1][n // 2]
    assert scores["threshold"].iloc[0] == pytest.approx(threshold, abs=1e-5)
    assert scores["keep"].sum() == (scores["clip_score"] >= scores["threshold"]).sum() >= n // 2 + 1
    assert set(scores.loc[~scores["keep"], "reason"]) == {"low_clip_score"}
    assert scores.loc[scores["keep"], "reason"].isna().all()
    assert summary["input"] == n and summary["kept"] + summary["dropped"]["low_clip_score"] == n
    assert json.loads((tmp_path / "scores_summary.json").read_text())["threshold"] == pytest.approx(threshold, abs=1e-5)


def test_config_name_with_checkpoint_equals_export(download, tiny_export, tmp_path):
    params = ScoreParams(scorer="clipmill-tiny", checkpoint=str(tiny_export / "open_clip_model.safetensors"),
                         top_fraction=None, min_score=0.0, device="cpu")
    score_survivors(download["manifest"], download["rules"], download["shards"], tmp_path / "a", params,
                    RayParams(), NO_TRACKING)
    params = ScoreParams(scorer="bootstrap", top_fraction=None, min_score=0.0, device="cpu")
    score_survivors(download["manifest"], download["rules"], download["shards"], tmp_path / "b", params,
                    RayParams(), NO_TRACKING, bootstrap_model=tiny_export)
    a, b = (pd.read_parquet(tmp_path / d / "scores.parquet") for d in "ab")
    np.testing.assert_allclose(a["clip_score"], b["clip_score"], atol=1e-6)
    assert (a["keep"] == (a["clip_score"] >= 0.0)).all()


def test_config_name_without_checkpoint_is_a_config_error(download, tmp_path):
    with pytest.raises(ConfigError, match="score.checkpoint must name its weights"):
        score_survivors(download["manifest"], download["rules"], download["shards"], tmp_path,
                        ScoreParams(scorer="clipmill-tiny"), RayParams(), NO_TRACKING)
    with pytest.raises(ValueError, match="checkpoint is only used"):
        ScoreParams(scorer="bootstrap", checkpoint="weights.safetensors")


def test_missing_bootstrap_model_names_the_path(download, tmp_path):
    with pytest.raises(InputError, match="absent/model: model source does not exist"):
        score_survivors(download["manifest"], download["rules"], download["shards"], tmp_path, ScoreParams(),
                        RayParams(), NO_TRACKING, bootstrap_model=tmp_path / "absent" / "model")
    assert not (tmp_path / "scores.parquet").exists()


class _ExportHolder(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


def test_registry_uri_absent_is_a_clear_error_and_present_resolves(download, tiny_export, tmp_path, mlflow_uri):
    champion = ScoreParams(scorer="models:/clipmill@champion", top_fraction=None, device="cpu")
    with pytest.raises(ClipmillError, match="models:/clipmill@champion"):
        score_survivors(download["manifest"], download["rules"], download["shards"], tmp_path / "absent", champion,
                        RayParams(), TrackingParams(tracking_uri=mlflow_uri))
    assert not (tmp_path / "absent").exists()

    mlflow.set_tracking_uri(mlflow_uri)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=_ExportHolder(),
                                       artifacts={"open_clip": str(tiny_export)}, pip_requirements=["mlflow"])
    version = mlflow.register_model(info.model_uri, "clipmill")
    mlflow.MlflowClient().set_registered_model_alias("clipmill", "champion", version.version)

    score_survivors(download["manifest"], download["rules"], download["shards"], tmp_path / "registry", champion,
                    RayParams(), TrackingParams(tracking_uri=mlflow_uri, enabled=False))
    params = ScoreParams(scorer=f"local-dir:{tiny_export}", top_fraction=None, device="cpu")
    score_survivors(download["manifest"], download["rules"], download["shards"], tmp_path / "local", params,
                    RayParams(), NO_TRACKING)
    registry, local = (pd.read_parquet(tmp_path / d / "scores.parquet") for d in ("registry", "local"))
    np.testing.assert_allclose(registry["clip_score"], local["clip_score"], atol=1e-6)
    assert registry["keep"].all() and registry["threshold"].isna().all()


def test_cli_bootstrap_scorer_records_histogram(download, tiny_export, tmp_path, mlflow_uri, default_params):
    params = default_params.model_dump(mode="json")
    params["score"].update(scorer="bootstrap", top_fraction=0.8, device="cpu")
    params["tracking"]["tracking_uri"] = mlflow_uri
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rc = main(["stage", "score", "--params", str(tmp_path / "params.yaml"), "--manifest", str(download["manifest"]),
               "--rules", str(download["rules"]), "--shards", str(download["shards"]),
               "--bootstrap-model", str(tiny_export), "--out-dir", str(tmp_path / "out")])
    assert rc == 0
    summary = json.loads((tmp_path / "out" / "scores_summary.json").read_text())
    mlflow.set_tracking_uri(mlflow_uri)
    (run,) = mlflow.search_runs(experiment_names=[params["tracking"]["experiment"]], output_format="list")
    assert run.data.tags["clipmill.stage"] == "score"
    assert run.data.metrics["kept"] == summary["kept"]
    assert run.data.metrics["images_per_s"] > 0
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"scores_summary.json", "score_histogram.png"} <= artifacts
