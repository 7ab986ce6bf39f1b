"""Shared fixtures: real MLflow on a temporary SQLite store, tiny params, one Prefect server per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CLIPMILL_PARENT_RUN_ID", raising=False)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A real MLflow tracking store (SQLite + local artifacts) private to the test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def default_params():
    """The committed params.yaml, parsed (tests shrink sections from it instead of inventing configs)."""
    from clipmill.params import load_params

    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect server (temporary SQLite database) shared by every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
