"""A real `mlflow server` on loopback (SQLite backend, proxied artifacts) as the tracking URI for register."""
from __future__ import annotations

import os
import sys

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from clipmill.cli import main
from clipmill.components.common.model import embed_texts, load_clip
from tests.conftest import REPO
from tests.registry_fixtures import (
    free_port,
    policy_metrics,
    running_server,
    tiny_model,
    write_eval_suite,
    write_record,
)

PARAMS = str(REPO / "params.yaml")


def test_register_and_load_back_through_a_tracking_server(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    with running_server(cmd, f"{uri}/health", env, tmp_path / "server.log"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        write_eval_suite(tmp_path / "eval")
        model = tiny_model(tmp_path / "model", seed=5)
        write_record(model, tmp_path / "metrics.json", policy_metrics(0.3))
        assert main(["stage", "register", "--params", PARAMS, "--model", str(model), "--metrics",
                     str(tmp_path / "metrics.json"), "--eval-dir", str(tmp_path / "eval"), "--out",
                     str(tmp_path / "register"), "--reports", str(tmp_path / "reports")]) == 0

        champion = MlflowClient(uri).get_model_version_by_alias("clipmill", "champion")
        assert str(champion.version) == "1" and champion.tags["metric.zeroshot/acc1"] == "0.3"
        served = mlflow.pyfunc.load_model("models:/clipmill@champion").predict(
            pd.DataFrame({"text": ["a green square"]}))
        want = embed_texts(load_clip(str(model)), ["a green square"])[0]
        assert torch.tensor(served["text_embedding"][0]) == pytest.approx(want, abs=1e-5)
        capsys.readouterr()
        assert main(["models", "list", "--params", PARAMS]) == 0
        assert "challenger,champion" in capsys.readouterr().out
    assert any((tmp_path / "server-artifacts").rglob("open_clip_model.safetensors"))  # stored by the server
