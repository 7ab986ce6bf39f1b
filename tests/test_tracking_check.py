"""An unusable tracking store stops a stage in one line before its work starts, not with a traceback after it."""
from __future__ import annotations

import pytest

from clipmill.cli import main
from clipmill.components.common.errors import ClipmillError
from clipmill.components.common.params import TrackingParams
from clipmill.components.common.tracking import check_tracking
from tests.conftest import REPO
from tests.registry_fixtures import free_port


def register_stage(tmp_path) -> list[str]:
    return ["stage", "register", "--params", str(REPO / "params.yaml"), "--model", str(tmp_path / "model"),
            "--metrics", str(tmp_path / "metrics.json"), "--eval-dir", str(tmp_path / "eval"),
            "--out", str(tmp_path / "register"), "--reports", str(tmp_path / "reports")]


def test_an_unreachable_tracking_server_fails_the_stage_before_its_work_in_one_line(tmp_path, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # a closed loopback port
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(register_stage(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"clipmill: error: tracking.tracking_uri {uri}: not reachable: ")
    assert "Connection refused" in err[0]
    assert not (tmp_path / "register").exists() and not (tmp_path / "reports").exists()  # no work was done


def test_a_tracking_store_that_cannot_be_written_is_named_with_its_reason(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/afile/mlflow.db")
    with pytest.raises(ClipmillError, match=r"the SQLite database .*afile/mlflow.db cannot be created: .*afile is "
                                            r"not a writable directory"):
        check_tracking(TrackingParams())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/afile")
    with pytest.raises(ClipmillError, match="the file store .*afile is not a directory"):
        check_tracking(TrackingParams())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/new/dir/mlflow.db")
    check_tracking(TrackingParams())  # a database MLflow will create in a writable place is fine
    check_tracking(TrackingParams(enabled=False, tracking_uri="http://127.0.0.1:1"))  # tracking off: not checked


def test_an_unreachable_tracking_server_stops_a_flow_before_any_server_or_stage_starts(tmp_path, monkeypatch,
                                                                                      capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "params.yaml").write_text("tracking: {experiment: clipmill}\n")
    assert main(["run", "full", "--root", str(tmp_path), "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"clipmill: error: tracking.tracking_uri {uri}: not reachable")
    assert not (tmp_path / ".clipmill").exists()  # not even the run lock was taken


def test_a_flow_outside_the_project_or_with_a_missing_url_list_stops_before_any_server(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("tracking: {enabled: false}\n")
    assert main(["run", "full", "--root", str(tmp_path), "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"clipmill: error: {tmp_path / 'dvc.yaml'}: no such file (run from the project root, or pass "
                   "--root)"]
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://a/b.jpg,a cat\n")
    for new_urls, reason in ((tmp_path / "nope.parquet", "no such file"),
                             (tmp_path / "urls.csv", "not a readable parquet")):
        assert main(["run", "full", "--root", str(tmp_path), "--params", str(tmp_path / "params.yaml"),
                     "--new-urls", str(new_urls)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"clipmill: error: {new_urls}: {reason}")
    assert not (tmp_path / ".clipmill").exists()  # not even the run lock was taken
