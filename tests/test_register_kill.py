"""A register stage SIGKILLed at a seeded random point, then rerun: no duplicate version, the champion unmoved."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from clipmill.cli import main
from clipmill.components.common.evaluation import model_hash
from clipmill.components.register.registry import TAG_HISTORY, TAG_MODEL_HASH
from tests.conftest import REPO
from tests.registry_fixtures import policy_metrics, tiny_model, write_eval_suite, write_record

SEED = int(os.environ.get("CLIPMILL_FAULT_SEED", "15"))


def register_args(ws: Path, tag: str) -> list[str]:
    return ["stage", "register", "--params", str(REPO / "params.yaml"), "--model", str(ws / f"model-{tag}"),
            "--metrics", str(ws / f"metrics-{tag}.json"), "--train-run", str(ws / "none.json"),
            "--curated", str(ws / "none"), "--eval-dir", str(ws / "eval"), "--out", str(ws / "register"),
            "--reports", str(ws / "reports")]


@pytest.mark.slow
def test_a_killed_registration_reruns_without_a_duplicate_version_or_a_moved_champion(tmp_path, monkeypatch,
                                                                                       mlflow_uri):
    monkeypatch.chdir(tmp_path)
    write_eval_suite(tmp_path / "eval")
    for tag, acc, seed in (("champ", 0.40, 1), ("worse", 0.38, 2)):
        tiny_model(tmp_path / f"model-{tag}", seed=seed)
        write_record(tmp_path / f"model-{tag}", tmp_path / f"metrics-{tag}.json", policy_metrics(acc))
    assert main(register_args(tmp_path, "champ")) == 0
    client = MlflowClient(mlflow_uri)
    before = client.get_registered_model("clipmill")

    # Kill the registration of a worse model at a seeded random point of its work (its MLflow run is open:
    # exporting, creating the version, tagging, deciding).
    runs = lambda: len(mlflow.search_runs(search_all_experiments=True, output_format="list"))  # noqa: E731
    opened = runs()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "clipmill"), *register_args(tmp_path, "worse")],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while runs() == opened and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        delay = random.Random(SEED).uniform(0.0, 4.0)
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    print(f"seed {SEED}: register killed {delay:.2f} s into its work (rc {proc.returncode})")

    assert main(register_args(tmp_path, "worse")) == 0  # the rerun completes the registration
    digest = model_hash(tmp_path / "model-worse")
    versions = client.search_model_versions(f"name='clipmill' and tags.`{TAG_MODEL_HASH}` = '{digest}'")
    assert len(versions) == 1, [v.version for v in versions]  # no duplicate version
    after = client.get_registered_model("clipmill")
    assert after.aliases["champion"] == before.aliases["champion"] == 1  # a worse model never moves it
    assert after.aliases["challenger"] == int(versions[0].version)
    assert json.loads(after.tags[TAG_HISTORY]) == json.loads(before.tags[TAG_HISTORY]) == ["1"]
    assert len(client.search_model_versions("name='clipmill'")) == 2
