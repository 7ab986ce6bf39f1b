"""`mlflow models serve` on the registered champion answers image and text embedding requests over HTTP."""
from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request

import pytest
import torch

from clipmill.cli import main
from components.common.model import embed_images, embed_texts, load_clip
from tests.conftest import REPO
from tests.registry_fixtures import free_port, png, policy_metrics, running_server, tiny_model, write_eval_suite, write_record


def invocation(port: int, body: dict) -> urllib.request.Request:
    return urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})


def test_served_champion_answers_embedding_requests(tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.chdir(tmp_path)
    model = tiny_model(tmp_path / "model", seed=4)
    write_record(model, tmp_path / "metrics.json", policy_metrics(0.4))
    write_eval_suite(tmp_path / "eval")
    assert main(["stage", "register", "--params", str(REPO / "params.yaml"), "--model", str(model),
                 "--metrics", str(tmp_path / "metrics.json"), "--eval-dir", str(tmp_path / "eval"),
                 "--out", str(tmp_path / "register"), "--reports", str(tmp_path / "reports")]) == 0

    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/clipmill@champion",
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    # the scoring server runs `uvicorn` from PATH: the venv's, as with an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri,
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    image = png((30, 60, 220), seed=3)
    body = {"dataframe_records": [{"text": "a blue square"}, {"image": base64.b64encode(image).decode()}]}
    with running_server(cmd, f"http://127.0.0.1:{port}/ping", env, tmp_path / "serve.log"):
        with urllib.request.urlopen(invocation(port, body), timeout=60) as response:
            predictions = json.load(response)["predictions"]
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(invocation(port, {"dataframe_records": [{"image": "not an image!"}]}), timeout=60)
        assert bad.value.code == 400 and "not base64" in bad.value.read().decode()

    source = load_clip(str(model))
    assert predictions[0]["image_embedding"] is None and predictions[1]["text_embedding"] is None
    assert torch.tensor(predictions[0]["text_embedding"]) == pytest.approx(embed_texts(source, ["a blue square"])[0], abs=1e-5)
    assert torch.tensor(predictions[1]["image_embedding"]) == pytest.approx(embed_images(source, [image])[0], abs=1e-5)
