"""The validate stage: Great Expectations on the download manifest (a real file GX context, data docs, MLflow)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from clipmill.components.common.errors import ClipmillError
from clipmill.components.download.stage import MANIFEST_COLUMNS, build_manifest
from clipmill.components.validate.boundaries import BOUNDARIES
from clipmill.components.validate.params import DownloadBoundaryParams
from clipmill.components.validate.stage import ValidationFailed, validate
from clipmill.components.validate.suites_download import MANIFEST_COLUMNS as EXPECTED_COLUMNS
from clipmill.params import Params


def make_manifest(n: int = 200, failures: int = 30, refused: int = 5) -> pd.DataFrame:
    """A manifest as the download stage builds it: n URLs, ``failures`` 404s, ``refused`` private hosts."""
    uids = [f"{i:032x}" for i in range(n)]
    requests = pd.DataFrame({"uid": uids, "url": [f"http://crawl.test/{i}.jpg" for i in range(n)],
                             "caption": [f"a red circle {i}" for i in range(n)],
                             "url_list": "crawl", "refusal": [None] * (n - refused) + ["private_host"] * refused})
    fetched = n - refused
    ok = np.arange(fetched) >= failures
    results = pd.DataFrame({
        "uid": uids[:fetched], "key": [f"{i // 100:05d}{i % 100:04d}" for i in range(fetched)],
        "shard": [f"{i // 100:05d}.tar" for i in range(fetched)],
        "status": np.where(ok, "success", "failed_to_download"),
        "error_message": np.where(ok, None, "HTTP Error 404: Not Found"),
        "width": np.where(ok, 64, np.nan), "height": np.where(ok, 64, np.nan),
        "original_width": np.where(ok, 128, np.nan), "original_height": np.where(ok, 96, np.nan),
        "sha256": np.where(ok, "0" * 64, None),
    })
    return build_manifest(requests, results, "crawl")


@pytest.fixture
def params(mlflow_uri) -> Params:
    return Params.model_validate({"tracking": {"experiment": "validate-test"}})


def _run(manifest: pd.DataFrame, tmp_path, params: Params) -> dict:
    manifest.to_parquet(tmp_path / "manifest.parquet", index=False)
    return validate("download", {"manifest": tmp_path / "manifest.parquet"}, params, tmp_path / "validation",
                    tmp_path / "reports")


def test_a_good_manifest_passes_with_results_docs_and_an_mlflow_run(tmp_path, params, mlflow_uri):
    import mlflow

    assert EXPECTED_COLUMNS == MANIFEST_COLUMNS  # the suite checks the columns the stage writes
    results = _run(make_manifest(), tmp_path, params)
    assert results["success"] is True
    assert results == json.loads((tmp_path / "validation" / "download.json").read_text())
    [check] = results["checks"]
    assert check["table"] == "manifest" and check["rows"] == 200
    names = {r["expectation"] for r in check["expectations"]}
    assert {"expect_table_columns_to_match_set", "expect_column_values_to_be_unique",
            "expect_column_values_to_not_be_null", "expect_column_values_to_be_in_set",
            "expect_column_values_to_be_between", "expect_column_values_to_be_of_type"} <= names
    index = tmp_path / "reports" / "download" / "index.html"
    assert index.exists() and "download.manifest" in index.read_text()

    client = mlflow.MlflowClient(mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("validate-test").experiment_id])
    assert run.data.tags["clipmill.stage"] == "validate_download" and run.data.tags["clipmill.boundary"] == "download"
    assert run.data.metrics["success"] == 1.0 and run.data.metrics["failed_expectations"] == 0
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["download.json"]


def test_a_broken_manifest_fails_naming_each_expectation(tmp_path, params):
    manifest = make_manifest()
    manifest.loc[10, "uid"] = manifest.loc[11, "uid"]       # duplicate uid
    manifest.loc[12, "uid"] = None                          # null uid
    manifest.loc[100, "width"] = 5000                       # a success wider than max_width
    manifest.loc[5, "status"] = "downloaded"                # not a known status
    manifest["extra"] = 1                                   # not a manifest column
    with pytest.raises(ValidationFailed) as err:
        _run(manifest, tmp_path, params)
    message = str(err.value)
    assert "\n" not in message
    for expected in ("expect_table_columns_to_match_set: columns {'unexpected': ['extra']}",
                     "expect_column_values_to_be_unique(uid): 2 unexpected",
                     "expect_column_values_to_not_be_null(uid): 1 unexpected",
                     "expect_column_values_to_be_between(width): 1 unexpected",
                     "expect_column_values_to_be_in_set(status): 1 unexpected"):
        assert expected in message
    results = json.loads((tmp_path / "validation" / "download.json").read_text())
    assert results["success"] is False
    failed = [r for r in results["checks"][0]["expectations"] if not r["success"]]
    assert len(failed) == 5 == int(message.split("failed (")[1].split(" of")[0])


def test_success_rate_bounds_and_missing_columns(tmp_path, params):
    params.validation.download = DownloadBoundaryParams(min_success_rate=0.9, max_success_rate=0.95)
    with pytest.raises(ValidationFailed, match=r"\[success rate at least 0.9\]: 35 unexpected \(17.5%\)"):
        _run(make_manifest(failures=30), tmp_path, params)
    with pytest.raises(ValidationFailed, match=r"\[success rate at most 0.95\]"):
        _run(make_manifest(failures=0, refused=0), tmp_path, params)

    params.validation.download = DownloadBoundaryParams()
    with pytest.raises(ValidationFailed) as err:
        _run(make_manifest().drop(columns=["width", "caption"]), tmp_path, params)
    assert "columns {'missing': ['caption', 'width']}" in str(err.value)
    assert "expect_column_values_to_be_between(width): error: " in str(err.value)


def test_the_cli_exits_non_zero_with_one_line(tmp_path, capsys, mlflow_uri):
    from clipmill.cli import main

    manifest = make_manifest()
    manifest.loc[3, "uid"] = manifest.loc[4, "uid"]
    manifest.to_parquet(tmp_path / "manifest.parquet", index=False)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"tracking": {"enabled": False}}))
    args = ["stage", "validate", "download", "--manifest", str(tmp_path / "manifest.parquet"),
            "--out", str(tmp_path / "validation"), "--reports", str(tmp_path / "reports"), "--params", str(params_file)]
    assert main(args) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("clipmill: error: validation of 'download' failed (1 of ")
    assert "expect_column_values_to_be_unique(uid)" in line
    assert (tmp_path / "reports" / "download" / "index.html").exists()

    assert main(["stage", "validate", "download", "--manifest", str(tmp_path / "missing.parquet"),
                 "--out", str(tmp_path / "validation"), "--params", str(params_file)]) == 2
    assert "missing.parquet: no such file" in capsys.readouterr().err
    assert not (tmp_path / "validation" / "download.json").exists()  # no stale results from the earlier run


def test_boundaries_declare_inputs_and_a_check_builder():
    assert set(BOUNDARIES) == {"download", "curate", "curated"}
    for spec in BOUNDARIES.values():
        assert spec.inputs and callable(spec.checks)
    with pytest.raises(ClipmillError):
        validate("download", {"manifest": "/nonexistent/manifest.parquet"}, Params(), "/nonexistent/out",
                 "/nonexistent/reports")
