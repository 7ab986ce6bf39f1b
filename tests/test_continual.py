"""Continual runs: new URL lists join the crawl as DVC data versions, the champion becomes the warm start,
and a warm-started training run uses the continual schedule."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from clipmill.cli import main
from clipmill.components.common.errors import InputError
from clipmill.components.common.model import WEIGHTS_FILE
from clipmill.components.common.training.params import TrainParams
from clipmill.components.train import cli as train_cli
from clipmill.components.train.params import ContinualParams
from clipmill.components.train.warm_start import (
    WarmStart,
    continual_section,
    read_warm_start,
    warm_start_weights,
    weights_sha256,
    write_warm_start,
)
from clipmill.params import load_params
from clipmill.pipelines import continual as cont
from tests.conftest import REPO
from tests.registry_fixtures import policy_metrics, tiny_model, write_eval_suite, write_record
from tests.test_train_shapes import run_stage, write_shape_evalsets, write_shape_shards

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
DVC = str(Path(sys.executable).parent / "dvc")


def _url_list(path: Path, n: int, start: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"url": [f"https://img.example.com/{i}.jpg" for i in range(start, start + n)],
                  "caption": [f"a red circle number {i}" for i in range(start, start + n)]}).to_parquet(path)
    return path


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git + DVC checkout with the project's .gitignore, params.yaml and an empty additions directory."""
    root = tmp_path / "proj"
    (root / "data" / "crawl_additions").mkdir(parents=True)
    (root / "data" / "crawl_additions" / "README.md").write_text("appended lists\n")
    for name in (".gitignore", "params.yaml"):
        (root / name).write_text((REPO / name).read_text())
    env = {**os.environ, **GIT_ENV}
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=root, check=True, env=env)
    return root


def test_new_url_lists_become_dvc_data_versions_and_an_inbox_appends_only_new_ones(repo, tmp_path):
    params = load_params(repo / "params.yaml")
    first = _url_list(tmp_path / "week1.parquet", 5)
    [added] = cont.append_new_urls(repo, params, first)
    additions = repo / "data" / "crawl_additions"
    assert (additions / f"{added}.dvc").is_file() and (additions / added / "urls.parquet").is_file()
    assert yaml.safe_load((additions / f"{added}.dvc").read_text())["outs"][0]["path"] == added
    ignored = subprocess.run(["git", "check-ignore", "-q", str(additions / added / "urls.parquet")], cwd=repo)
    assert ignored.returncode == 0  # the list itself lives in DVC's cache, its .dvc file in git
    with pytest.raises(InputError, match="appended to the crawl before"):
        cont.append_new_urls(repo, params, first)

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "week1.parquet").write_bytes(first.read_bytes())  # appended before: skipped
    _url_list(inbox / "week2" / "urls.parquet", 4, start=100)
    [second] = cont.append_new_urls(repo, params, inbox)
    assert cont.append_new_urls(repo, params, inbox) == []
    assert sorted(p.name for p in additions.glob("*.dvc")) == sorted([f"{added}.dvc", f"{second}.dvc"])
    with pytest.raises(InputError, match="missing required column"):
        pd.DataFrame({"url": ["https://x.example/1.jpg"]}).to_parquet(tmp_path / "bad.parquet")
        cont.append_new_urls(repo, params, tmp_path / "bad.parquet")


def _register(tmp_path: Path, seed: int = 3) -> Path:
    """A tiny model registered (and, as the first one, promoted to champion) through the register stage."""
    write_eval_suite(tmp_path / "eval")
    model = tiny_model(tmp_path / f"model{seed}", seed=seed)
    write_record(model, tmp_path / "metrics.json", policy_metrics(0.3))
    assert main(["stage", "register", "--params", str(REPO / "params.yaml"), "--model", str(model), "--metrics",
                 str(tmp_path / "metrics.json"), "--eval-dir", str(tmp_path / "eval"), "--out",
                 str(tmp_path / "register"), "--reports", str(tmp_path / "reports")]) == 0
    return model


def test_the_champion_becomes_a_fixed_warm_start_with_a_dvc_tracked_copy(repo, tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(REPO / "params.yaml")
    warm = cont.write_champion_warm_start(repo, params)
    assert warm.init_from is None and "no models:/clipmill@champion yet" in warm.reason

    model = _register(tmp_path)
    warm = cont.write_champion_warm_start(repo, params)
    assert warm.init_from == "models:/clipmill/1" and warm.loss == "clip"  # the loss from the weights
    assert warm.weights == "warm_start/clipmill-v1" and warm.sha256 == weights_sha256(model)
    assert read_warm_start(repo / "warm_start.yaml") == warm
    copy = repo / "warm_start" / "clipmill-v1"
    assert yaml.safe_load((repo / "warm_start" / "clipmill-v1.dvc").read_text())["outs"][0]["path"] == "clipmill-v1"
    assert subprocess.run(["git", "check-ignore", "-q", str(copy / WEIGHTS_FILE)], cwd=repo).returncode == 0

    shutil.rmtree(copy)  # the registry still holds the very bytes: used for this run, with a warning
    with warm_start_weights(warm, repo / "warm_start.yaml", mlflow_uri) as source:
        assert source.startswith("local-dir:") and not source.startswith(f"local-dir:{repo}")
        assert weights_sha256(source[len("local-dir:"):]) == warm.sha256
    assert cont.write_scratch_warm_start(repo).init_from is None
    assert not list((repo / "warm_start").glob("*.dvc"))  # the from-scratch file names no copy: it is dropped


def test_a_continual_warm_start_reproduces_without_the_registry_and_refuses_other_bytes(repo, tmp_path, mlflow_uri,
                                                                                         monkeypatch, default_params):
    monkeypatch.chdir(tmp_path)
    params = load_params(REPO / "params.yaml")
    model = _register(tmp_path, seed=5)
    warm = cont.write_champion_warm_start(repo, params)
    assert cont.commit_run(repo, params, "continual run") is not None
    committed = subprocess.run(["git", "show", "--name-only", "--format=", "HEAD"], cwd=repo, capture_output=True,
                               text=True).stdout.split()
    assert {"warm_start.yaml", "warm_start/clipmill-v1.dvc", "warm_start/.gitignore"} <= set(committed)
    subprocess.run([DVC, "remote", "add", "-d", "store", str(tmp_path / "remote")], cwd=repo, check=True)
    cont.push_data(repo)

    # The registry, the local copy and DVC's cache are gone: only the DVC remote holds the weights.
    (tmp_path / "mlflow.db").unlink()
    for gone in (tmp_path / "mlruns", tmp_path / "mlartifacts", repo / warm.weights, repo / ".dvc" / "cache"):
        shutil.rmtree(gone, ignore_errors=True)
    empty = f"sqlite:///{tmp_path / 'new.db'}"  # a new tracking store: no such model in its registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty)
    with pytest.raises(InputError, match=r"field 'weights'.*run `dvc pull`"):
        with warm_start_weights(warm, repo / "warm_start.yaml", empty):
            pass
    subprocess.run([DVC, "pull", "-q"], cwd=repo, check=True)

    shards = tmp_path / "shards"
    write_shape_shards(shards, shards=1, per_shard=32)
    doc = default_params.model_dump(mode="json")
    doc["train"].update(batch_size=16, samples_per_epoch=16, num_workers=0, shuffle_buffer=16, cpu_threads=1,
                        checkpoint_every_n_steps=0, val_every_n_steps=0)
    doc["continual"].update(epochs=1, warmup_steps=0, cooldown_steps=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    evalsets = write_shape_evalsets(tmp_path / "shape_eval", per_class=2, retrieval_size=8)
    argv = ["--shards", str(shards), "--eval-dir", str(evalsets), "--out", str(tmp_path / "train"),
            "--warm-start", str(repo / "warm_start.yaml")]
    assert run_stage(train_cli, tmp_path / "params.yaml", argv) == 0
    assert json.loads((tmp_path / "train" / "run.json").read_text())["init_from"] == "models:/clipmill/1"
    assert weights_sha256(repo / warm.weights) == weights_sha256(model)

    weights = repo / warm.weights / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.chmod(0o644)
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"warm_start.yaml: field 'sha256': .*not the warm-start weights"):
        run_stage(train_cli, tmp_path / "params.yaml", argv)


def test_a_warm_start_file_is_checked_and_applies_the_continual_schedule(tmp_path):
    path = tmp_path / "warm_start.yaml"
    path.write_text("init_from: models:/clipmill/2\nloss: hinge\n")
    with pytest.raises(InputError, match="loss"):
        read_warm_start(path)
    with pytest.raises(InputError, match="no such file"):
        read_warm_start(tmp_path / "missing.yaml")
    path.write_text("init_from: models:/clipmill/2\nweights: warm_start/clipmill-v2\n")
    with pytest.raises(InputError, match="field 'sha256': weights and sha256 go together"):
        read_warm_start(path)
    path.write_text("init_from: models:/clipmill/2\nweights: warm_start/clipmill-v2\nsha256: abc\n")
    with pytest.raises(InputError, match="field 'sha256'"):
        read_warm_start(path)
    section = continual_section(TrainParams(lr=1e-3, schedule="cosine", epochs=4), ContinualParams(),
                                WarmStart(init_from="models:/clipmill/2", loss="siglip"))
    assert (section.init_from, section.loss, section.schedule, section.lr, section.epochs) == \
        ("models:/clipmill/2", "siglip", "constant_cooldown", 3e-4, 2)


def test_a_warm_started_run_starts_from_the_model_and_ignores_tuned_values(tmp_path, mlflow_uri, default_params):
    shards = tmp_path / "shards"
    write_shape_shards(shards, shards=2, per_shard=32)
    evalsets = write_shape_evalsets(tmp_path / "eval", per_class=2, retrieval_size=8)
    model = tiny_model(tmp_path / "warm", seed=4)
    params = default_params.model_dump(mode="json")
    params["train"].update(batch_size=16, samples_per_epoch=32, num_workers=0, shuffle_buffer=16, cpu_threads=1,
                           checkpoint_every_n_steps=0, val_every_n_steps=0)
    params["continual"].update(epochs=2, warmup_steps=1, cooldown_steps=2, lr=2e-4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_warm_start(WarmStart(init_from=f"local-dir:{model}", loss="clip", reason="test"), tmp_path / "warm.yaml")
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"config_key": "train", "overrides": {"lr": 5e-3}}))
    out = tmp_path / "train"
    assert run_stage(train_cli, tmp_path / "params.yaml", ["--shards", str(shards), "--eval-dir", str(evalsets),
                                                            "--out", str(out), "--best-params", str(best),
                                                            "--warm-start", str(tmp_path / "warm.yaml")]) == 0
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["init_from"] == f"local-dir:{model}" and run_info["steps"] == 4
    logged = MlflowClient(mlflow_uri).get_run(run_info["run_id"]).data.params
    assert (logged["schedule"], logged["lr"], logged["epochs"]) == ("constant_cooldown", "0.0002", "2")
