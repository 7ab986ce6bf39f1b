"""Registration: the pyfunc and local-dir exports, lineage tags, registry round trip, and `clipmill models`."""
from __future__ import annotations

import base64
import io
import json

import mlflow
import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from clipmill.cli import main
from clipmill.components.common.hashing import content_hash
from clipmill.components.common.model import create_clip, embed_images, embed_texts, load_clip, resolve_model_source
from tests.conftest import REPO
from tests.registry_fixtures import png, policy_metrics, tiny_model, write_eval_suite, write_record

PARAMS = str(REPO / "params.yaml")


@pytest.fixture
def workspace(tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.chdir(tmp_path)  # lineage tags read dvc.lock and git from the working directory
    write_eval_suite(tmp_path / "eval")
    (tmp_path / "curated").mkdir()
    (tmp_path / "curated" / "00000.tar").write_bytes(b"shard bytes")
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "train-run-42", "steps": 3}))
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    return tmp_path


def register_cli(ws, model, metrics, *extra: str) -> int:
    return main(["stage", "register", "--params", PARAMS, "--model", str(model), "--metrics", str(metrics),
                 "--train-run", str(ws / "run.json"), "--curated", str(ws / "curated"), "--eval-dir",
                 str(ws / "eval"), "--out", str(ws / "register"), "--reports", str(ws / "reports"), *extra])


def test_registered_model_round_trips_through_both_exports(workspace, mlflow_uri):
    ws = workspace
    model = tiny_model(ws / "model", seed=1)
    write_record(model, ws / "metrics.json", policy_metrics(0.4))
    assert register_cli(ws, model, ws / "metrics.json") == 0

    client = MlflowClient(mlflow_uri)
    champion = client.get_model_version_by_alias("clipmill", "champion")
    assert str(champion.version) == str(client.get_model_version_by_alias("clipmill", "challenger").version) == "1"
    tags = champion.tags
    assert tags["clipmill.train_run_id"] == "train-run-42" and tags["clipmill.warm_start"] == "none"
    assert tags["clipmill.data.url_lists"] == "unknown"  # no download summary given
    assert tags["clipmill.curated_data_hash"] == content_hash([ws / "curated"])
    assert len(tags["clipmill.dvc_lock_hash"]) == 64 and len(tags["clipmill.params_hash"]) == 64
    assert tags["clipmill.git_commit"]
    assert tags["clipmill.suite_version"] == "test-1" and float(tags["metric.zeroshot/acc1"]) == 0.4
    assert json.loads((ws / "register" / "registration.json").read_text())["version"] == "1"

    source = load_clip(str(model))
    image = png((200, 30, 30), seed=7)
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    want_image = embed_images(source, [image])[0]
    want_text = embed_texts(source, ["a red square"])[0]

    # 1. the pyfunc: bytes, base64 strings and pixel arrays give the source model's embeddings
    pyfunc = mlflow.pyfunc.load_model("models:/clipmill@champion")
    out = pyfunc.predict(pd.DataFrame({"image": [image, base64.b64encode(image).decode(), pixels, None],
                                       "text": [None, None, None, "a red square"]}))
    for row in range(3):
        assert torch.tensor(out["image_embedding"][row]) == pytest.approx(want_image, abs=1e-5)
    assert out["text_embedding"][0] is None and out["image_embedding"][3] is None
    assert torch.tensor(out["text_embedding"][3]) == pytest.approx(want_text, abs=1e-5)

    # 2. the open_clip local-dir export inside the registered model, loaded by open_clip itself
    with resolve_model_source("models:/clipmill@champion") as local_dir:
        assert sorted(p.name for p in local_dir.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
        model_oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{local_dir}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{local_dir}")
        model_oc.eval()
        with torch.no_grad():
            img = model_oc.encode_image(preprocess(Image.open(io.BytesIO(image))).unsqueeze(0), normalize=True)[0]
            txt = model_oc.encode_text(tokenizer(["a red square"]), normalize=True)[0]
        assert img == pytest.approx(want_image, abs=1e-5) and txt == pytest.approx(want_text, abs=1e-5)
        model_files = {p.name for p in local_dir.parents[1].rglob("*") if p.is_file()}
        assert not {f for f in model_files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".bin"))}

    # 3. models:/ URIs as a model source: loading for scoring, warm-starting training
    assert embed_texts(load_clip("models:/clipmill@champion"), ["a red square"])[0] == pytest.approx(
        want_text, abs=1e-5)
    warm = create_clip("clipmill-tiny", init_from="models:/clipmill/1").model.state_dict()
    assert all(torch.equal(v, warm[k]) for k, v in source.model.state_dict().items())

    # registering the same model again reuses its version and changes nothing
    before = client.get_model_version("clipmill", "1").tags
    assert register_cli(ws, model, ws / "metrics.json") == 0
    assert [str(v.version) for v in client.search_model_versions("name='clipmill'")] == ["1"]
    assert client.get_model_version("clipmill", "1").tags == before


def test_metrics_of_another_model_are_refused(workspace, capsys):
    ws = workspace
    write_record(tiny_model(ws / "other", seed=2), ws / "metrics.json", policy_metrics(0.4))
    assert register_cli(ws, tiny_model(ws / "model", seed=1), ws / "metrics.json") == 2
    err = capsys.readouterr().err
    assert "metrics.json: field 'model_hash'" in err and "re-run `clipmill stage evaluate`" in err


def test_models_cli_lists_compares_and_names_unknown_versions(workspace, capsys):
    ws = workspace
    assert main(["models", "list", "--params", PARAMS]) == 2
    assert "has no model named 'clipmill'" in capsys.readouterr().err
    for seed, acc in ((1, 0.30), (2, 0.45)):
        model = tiny_model(ws / f"model{seed}", seed=seed)
        write_record(model, ws / f"metrics{seed}.json", policy_metrics(acc))
        assert register_cli(ws, model, ws / f"metrics{seed}.json") == 0
    capsys.readouterr()

    assert main(["models", "list", "--params", PARAMS]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:7] == ["version", "aliases", "created", "from", "lists", "suite", "zeroshot/acc1"]
    rows = {line.split()[0]: line for line in table[3:]}
    assert "challenger,champion" in rows["2"] and "0.4500" in rows["2"] and "promoted" in rows["2"]
    assert "0.3000" in rows["1"] and rows["1"].split()[4:6] == ["scratch", "-"]  # trained from scratch, lists unknown

    assert main(["models", "compare", "1", "2", "--params", PARAMS, "--eval-dir", str(ws / "no-suite")]) == 0
    out = capsys.readouterr().out
    assert "on suite test-1" in out
    assert any(line.split() == ["zeroshot/acc1", "0.3000", "0.4500", "+0.1500"] for line in out.splitlines())

    assert main(["models", "promote", "9", "--params", PARAMS]) == 2
    assert "has no version 9 (versions: 1, 2)" in capsys.readouterr().err
