"""Curation report: builds from tiny curation outputs, the funnel adds up, inconsistent inputs are refused."""
from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest

from components.common.errors import InputError
from components.common.params import TrackingParams
from components.report.curation_report import build_report
from components.report.funnel import NOT_IN_TABLE, curation_funnel
from components.report.params import ReportParams
from tests.curation_tables import make_curated

REWRITE_SUMMARY = {"backend": "rules", "model": "rules", "captions": 2, "rewrites_per_caption": 4, "slots": 8,
                   "kept": 5, "dropped": {"lost_entry": 1, "same_as_caption": 2}, "captions_with_rewrites": 2,
                   "failed_captions": {}}


# What the validate stage writes to data/validation/<boundary>.json (trimmed to the fields the report reads).
VALIDATION_RESULT = {"boundary": "rewrites", "success": False, "checks": [
    {"table": "rewrites", "success": True, "expectations": [
        {"expectation": "expect_column_values_to_be_unique", "column": "uid", "success": True}]},
    {"table": "rewrite_texts", "success": False, "expectations": [
        {"expectation": "expect_column_values_to_not_match_regex", "column": "rewrite", "success": False}]}]}


@pytest.fixture(scope="module")
def curation(tmp_path_factory):
    root = tmp_path_factory.mktemp("curation")
    curation = make_curated(root, n=200, per_shard=50, samples_per_shard=40)
    p = curation["paths"]
    p["rewrites_summary"] = root / "rewrites_summary.json"
    p["rewrites_summary"].write_text(json.dumps(REWRITE_SUMMARY))
    p["validation"] = root / "validation"
    p["validation"].mkdir()
    (p["validation"] / "rewrites.json").write_text(json.dumps(VALIDATION_RESULT))
    return curation


def build(curation, out, tracking=None, **paths):
    p = {**curation["paths"], **paths}
    return build_report(p["urls"], p["manifest"], p["shards"], p["rules"], p["scores"], p["balance"],
                        p["entry_counts"], p["rewrites"], p["rewrites_summary"], p["curated"], p["validation"], out,
                        ReportParams(examples_per_group=8, rewrite_examples=5), 0, 20,
                        tracking or TrackingParams(enabled=False))


def test_report_builds_with_plots_examples_and_a_funnel_that_adds_up(curation, tmp_path, mlflow_uri):
    out = tmp_path / "reports" / "curation"
    stages = build(curation, out, TrackingParams(tracking_uri=mlflow_uri))
    assert {f.name for f in out.iterdir()} == {"index.html", "funnel.json", "funnel.png", "score_histogram.png",
                                              "entry_rank_frequency.png"}
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    funnel = json.loads((out / "funnel.json").read_text())
    assert [s["stage"] for s in funnel["stages"]] == ["URL list", "download", "rules", "score", "balance", "curated"]
    for before, stage in zip(funnel["stages"], funnel["stages"][1:]):
        assert stage["input"] == before["kept"]
        assert stage["kept"] + sum(stage["dropped"].values()) == stage["input"]
    assert funnel["curated"] + funnel["dropped"] == funnel["stages"][0]["input"] == 200
    rules, scores, balance = curation["rules"], curation["scores"], curation["balance"]
    by_stage = {s["stage"]: s for s in funnel["stages"]}
    assert by_stage["download"]["dropped"] == {"http_404": int((curation["manifest"]["status"] != "success").sum())}
    assert by_stage["score"]["dropped"] == {"low_clip_score": int((~scores["keep"]).sum())}
    assert by_stage["balance"]["dropped"] == balance["reason"].value_counts().to_dict()
    assert by_stage["curated"]["kept"] == int(balance["keep"].sum()) == len(pd.read_parquet(curation["paths"]["curated"] / "manifest.parquet"))
    assert by_stage["rules"]["kept"] == int(rules["keep"].sum())
    assert [s.as_dict() for s in stages] == funnel["stages"]

    html = (out / "index.html").read_text()
    assert html.count('class="card kept"') == 8 and html.count('class="card dropped"') == 8
    for reason in ("http_404", "min_words", "low_clip_score", "balance_subsampled"):
        assert f"{reason}</span>" in html
    assert html.count("data:image/jpeg;base64,") >= 8 + 6  # download failures have no thumbnail
    assert "a picture of a " in html and "same_as_caption" in html
    assert "rewrite_texts: expect_column_values_to_not_match_regex(rewrite)" in html
    assert html.count("not run") == 3  # download, curate and curated were not validated here
    assert all(f'src="{name}"' in html for name in ("funnel.png", "score_histogram.png", "entry_rank_frequency.png"))

    run = mlflow.search_runs(experiment_names=["clipmill"]).iloc[0]
    assert run["metrics.funnel.curated.kept"] == by_stage["curated"]["kept"]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run["run_id"], "curation_report")}
    assert "curation_report/index.html" in logged and "curation_report/funnel.png" in logged


def test_captions_are_escaped_in_the_page(curation, tmp_path):
    manifest = pd.read_parquet(curation["paths"]["manifest"])
    manifest["caption"] = manifest["caption"] + " <script>alert(1)</script>"
    path = tmp_path / "manifest.parquet"
    manifest.to_parquet(path, index=False)
    build(curation, tmp_path / "report", manifest=path)
    html = (tmp_path / "report" / "index.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_every_uid_has_one_fate_and_missing_rows_are_counted(curation, tmp_path):
    p = curation["paths"]
    scores = curation["scores"]
    scores = scores.drop(scores.index[~scores["keep"]][:3])  # three uids the score stage never wrote
    scores.to_parquet(tmp_path / "scores.parquet", index=False)
    urls = pd.read_parquet(p["urls"])
    stages, fate = curation_funnel(urls, curation["manifest"], p["rules"], tmp_path / "scores.parquet", p["balance"],
                                   p["curated"] / "manifest.parquet")
    score = next(s for s in stages if s.stage == "score")
    assert score.dropped[NOT_IN_TABLE] == 3
    assert sorted(fate["uid"]) == sorted(urls["uid"])
    assert stages[-1].kept == int(fate["reason"].isna().sum())

    # URLs a later appended list repeated: listed, counted, not fetched twice
    stages, _ = curation_funnel(urls, curation["manifest"], p["rules"], tmp_path / "scores.parquet", p["balance"],
                                p["curated"] / "manifest.parquet", duplicates=4)
    assert stages[0].as_dict() == {"stage": "URL list", "input": len(urls) + 4, "kept": len(urls),
                                   "dropped": {"duplicate_url": 4}}


def test_inconsistent_inputs_are_refused_with_the_file_and_field(curation, tmp_path):
    p = curation["paths"]
    balance = curation["balance"].copy()
    balance.loc[balance.index[0], ["keep", "reason"]] = [False, None]
    balance.to_parquet(tmp_path / "balance.parquet", index=False)
    with pytest.raises(InputError, match=r"balance.parquet: field 'reason': uid '\w+' is dropped without a reason"):
        build(curation, tmp_path / "report", balance=tmp_path / "balance.parquet")

    curated = tmp_path / "curated"
    curated.mkdir()
    (curated / "content_hash.txt").write_text("x\n")
    dropped_uid = curation["balance"].loc[~curation["balance"]["keep"], "uid"].iloc[0]
    pd.DataFrame({"uid": [dropped_uid], "shard": ["00000.tar"], "key": [dropped_uid]}).to_parquet(
        curated / "manifest.parquet", index=False)
    with pytest.raises(InputError, match="manifest.parquet: field 'uid': 1 curated uids were not kept by balancing"):
        build(curation, tmp_path / "report", curated=curated)
    assert not (tmp_path / "report").exists()
