"""Shared fixtures: real MLflow on a temporary SQLite store, tiny params, one Prefect server per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["tests.object_store"]  # the `s3` fixture: a moto S3 server on loopback


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CLIPMILL_PARENT_RUN_ID", raising=False)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A real MLflow tracking store (SQLite + local artifacts) private to the test."""
    import mlflow.tracking._tracking_service.utils
    import mlflow.tracking.fluent

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # The store and experiment an earlier test activated are another test's: forget them.
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return uri


@pytest.fixture
def default_params():
    """The committed params.yaml, parsed (tests shrink sections from it instead of inventing configs)."""
    from clipmill.params import load_params

    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="session")
def prefect_server() -> str:
    """One real Prefect server (temporary SQLite database) shared by the session; yields its API URL.

    Flows run in their own processes (as `clipmill run` does) with PREFECT_API_URL pointing here, so no Prefect
    client state is left in the test process (forked workers of later tests inherit it badly).
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


# --- the golden-lock reproduction (tests/test_golden_lock.py) runs beside the rest of the session ----------------

_GOLDEN = "tests/test_golden_lock.py::test_demo_reproduces_the_golden_lock"
_golden_run: dict = {}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """The golden reproduction's test runs last, so the other tests run while it reproduces the demo."""
    items.sort(key=lambda item: item.nodeid == _GOLDEN)


def pytest_collection_finish(session):
    if any(item.nodeid == _GOLDEN for item in session.items) and not session.config.option.collectonly:
        from tests.golden import start_reproduction

        _golden_run["run"] = start_reproduction()


@pytest.fixture(scope="session")
def golden_reproduction():
    """(process, clone, log) of the background `dvc repro` started when the session was collected."""
    return _golden_run["run"]


def pytest_sessionfinish(session, exitstatus):
    run = _golden_run.get("run")
    if run and run[0].poll() is None:  # the session ended before the reproduction did
        import signal

        os.killpg(run[0].pid, signal.SIGTERM)
