"""Curation report: builds from a real curation directory, the funnel adds up, inconsistent inputs are refused."""
from __future__ import annotations

import json
import shutil

import mlflow
import pandas as pd
import pytest

from clipmill.components.common.curation import output_path
from clipmill.components.common.errors import InputError
from clipmill.components.common.params import TrackingParams
from clipmill.components.report.curation_report import build_report
from clipmill.components.report.funnel import curation_funnel
from clipmill.components.report.params import ReportParams
from tests.curation_tables import make_curated, run_reshard

# What the validate stage writes to data/validation/<boundary>.json (trimmed to the fields the report reads).
VALIDATION_RESULT = {"boundary": "curate", "success": False, "checks": [
    {"table": "rules", "success": True, "expectations": [
        {"expectation": "expect_column_values_to_be_unique", "column": "uid", "success": True}]},
    {"table": "rewrite_texts", "success": False, "expectations": [
        {"expectation": "expect_column_values_to_not_match_regex", "column": "rewrite", "success": False}]}]}


@pytest.fixture(scope="module")
def curation(tmp_path_factory):
    root = tmp_path_factory.mktemp("curation")
    curation = make_curated(root, n=200, per_shard=50, samples_per_shard=40)
    p = curation["paths"]
    p["validation"] = root / "validation"
    p["validation"].mkdir()
    (p["validation"] / "curate.json").write_text(json.dumps(VALIDATION_RESULT))
    return curation


def build(curation, out, tracking=None, steps=None, **paths):
    p = {**curation["paths"], **paths}
    return build_report(p["manifest"], p["download_summary"], p["shards"], p["curate"], p["curated"],
                        p["validation"], out, ReportParams(examples_per_group=8, rewrite_examples=5), 0,
                        tracking or TrackingParams(enabled=False), curation["steps"] if steps is None else steps)


def report_files(out) -> set[str]:
    """The report's files (hidden bookkeeping files, such as an output's owner marker, left out)."""
    return {f.name for f in out.iterdir() if not f.name.startswith(".")}


def copy_curate(curation, tmp_path):
    target = tmp_path / "curate"
    shutil.copytree(curation["paths"]["curate"], target)
    return target


def test_report_builds_with_plots_examples_and_a_funnel_that_adds_up(curation, tmp_path, mlflow_uri):
    out = tmp_path / "reports" / "curation"
    stages = build(curation, out, TrackingParams(tracking_uri=mlflow_uri))
    assert report_files(out) == {"index.html", "funnel.json", "funnel.png", "score_histogram.png",
                                 "entry_rank_frequency.png"}
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    funnel = json.loads((out / "funnel.json").read_text())
    assert [s["stage"] for s in funnel["stages"]] == ["URL list", "download", *curation["steps"], "curated"]
    for before, stage in zip(funnel["stages"], funnel["stages"][1:]):
        assert stage["input"] == before["kept"]
        assert stage["kept"] + sum(stage["dropped"].values()) == stage["input"]
    assert funnel["curated"] + funnel["dropped"] == funnel["stages"][0]["input"] == 200
    by_stage = {s["stage"]: s for s in funnel["stages"]}
    assert by_stage["download"]["dropped"] == {"http_404": int((curation["manifest"]["status"] != "success").sum())}
    for step, table in curation["tables"].items():  # each step's counts are its table's
        assert by_stage[step]["input"] == len(table) and by_stage[step]["kept"] == int(table["keep"].sum())
        assert by_stage[step]["dropped"] == table["reason"].value_counts().to_dict()
    assert by_stage["curated"]["kept"] == int(curation["tables"]["rewrite"]["keep"].sum()) == \
        len(pd.read_parquet(curation["paths"]["curated"] / "manifest.parquet"))
    assert [s.as_dict() for s in stages] == funnel["stages"]

    html = (out / "index.html").read_text()
    assert html.count('class="card kept"') == 8 and html.count('class="card dropped"') == 8
    for reason in ("http_404", "min_words", "duplicate_image", "low_clip_score", "balance_subsampled"):
        assert f"{reason}</span>" in html
    assert html.count("data:image/jpeg;base64,") >= 8 + 6  # download failures have no thumbnail
    assert "CLIP-score filter" in html and "Balancing" in html and "Caption rewrites" in html
    assert html.count('<ul class="rewrites">') == 5 and "duplicate</span>" in html  # a dropped rewrite's reason
    assert "rewrite_texts: expect_column_values_to_not_match_regex(rewrite)" in html
    assert html.count("not run") == 2  # download and curated were not validated here
    assert all(f'src="{name}"' in html for name in ("funnel.png", "score_histogram.png", "entry_rank_frequency.png"))

    run = mlflow.search_runs(experiment_names=["clipmill"]).iloc[0]
    assert run["metrics.funnel.curated.kept"] == by_stage["curated"]["kept"]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run["run_id"], "curation_report")}
    assert "curation_report/index.html" in logged and "curation_report/funnel.png" in logged


def test_step_sections_show_only_for_the_listed_steps(curation, tmp_path):
    steps = ["rules", "dedup"]
    run_reshard(curation, tmp_path / "curated", 40, steps=steps)
    build(curation, tmp_path / "report", steps=steps, curated=tmp_path / "curated")
    assert report_files(tmp_path / "report") == {"index.html", "funnel.json", "funnel.png"}
    funnel = json.loads((tmp_path / "report" / "funnel.json").read_text())
    assert [s["stage"] for s in funnel["stages"]] == ["URL list", "download", "rules", "dedup", "curated"]
    assert funnel["curated"] == int(curation["tables"]["dedup"]["keep"].sum())
    html = (tmp_path / "report" / "index.html").read_text()
    assert "CLIP-score filter" not in html and "Balancing" not in html and "Caption rewrites" not in html


def test_captions_are_escaped_in_the_page(curation, tmp_path):
    manifest = pd.read_parquet(curation["paths"]["manifest"])
    manifest["caption"] = manifest["caption"] + " <script>alert(1)</script>"
    path = tmp_path / "manifest.parquet"
    manifest.to_parquet(path, index=False)
    build(curation, tmp_path / "report", manifest=path)
    html = (tmp_path / "report" / "index.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_every_uid_has_one_fate_and_listed_duplicates_are_counted(curation):
    p = curation["paths"]
    manifest = curation["manifest"]
    stages, fate = curation_funnel(manifest, p["curate"], curation["steps"], p["curated"] / "manifest.parquet")
    assert sorted(fate["uid"]) == sorted(manifest["uid"]) and fate["uid"].is_unique
    assert stages[-1].kept == int(fate["reason"].isna().sum())
    for stage in stages[1:-1]:  # a stage's fates are its drops; the curated stage's are all its input
        assert (fate["stage"] == stage.stage).sum() == stage.input - stage.kept
    assert (fate["stage"] == "curated").sum() == stages[-1].input

    # URLs a later appended list repeated: listed, counted, not fetched twice
    stages, _ = curation_funnel(manifest, p["curate"], curation["steps"], p["curated"] / "manifest.parquet",
                                duplicates=4)
    assert stages[0].as_dict() == {"stage": "URL list", "input": len(manifest) + 4, "kept": len(manifest),
                                   "dropped": {"duplicate_url": 4}}


def test_inconsistent_inputs_are_refused_with_the_file_and_field(curation, tmp_path):
    curate = copy_curate(curation, tmp_path)
    balance = output_path(curate, "balance", "00001")
    table = pd.read_parquet(balance)
    table.loc[table.index[0], ["keep", "reason"]] = [False, None]
    table.to_parquet(balance, index=False)
    with pytest.raises(InputError, match=r"steps/balance/00001.parquet: field 'reason': uid '\w+' is dropped "
                                         r"without a reason"):
        build(curation, tmp_path / "report", curate=curate)

    shutil.copy(output_path(curation["paths"]["curate"], "balance", "00001"), balance)
    score = output_path(curate, "score", "00002")
    pd.read_parquet(score).iloc[:-1].to_parquet(score, index=False)  # a uid the score step never wrote
    with pytest.raises(InputError, match=r"steps/score/00002.parquet: field 'uid': 1 uids that reached step "
                                         r"'score' have no row"):
        build(curation, tmp_path / "report", curate=curate)

    (tmp_path / "summary.json").write_text(json.dumps({"urls": 200}))
    with pytest.raises(InputError, match=r"summary.json: field 'duplicates'"):
        build(curation, tmp_path / "report", download_summary=tmp_path / "summary.json")

    curated = tmp_path / "curated"
    curated.mkdir()
    (curated / "content_hash.txt").write_text("x\n")
    balance_table = curation["tables"]["balance"]
    dropped_uid = balance_table.loc[~balance_table["keep"], "uid"].iloc[0]
    pd.DataFrame({"uid": [dropped_uid], "shard": ["00000.tar"], "key": [dropped_uid]}).to_parquet(
        curated / "manifest.parquet", index=False)
    with pytest.raises(InputError, match="manifest.parquet: field 'uid': 1 curated uids were not kept by every "
                                         "curation step"):
        build(curation, tmp_path / "report", curated=curated)
    assert not (tmp_path / "report").exists()


def fixture_ground_truth(curation, path):
    """The fixture crawl's planted defects as the demo's ground truth table holds them (curation_fixtures: a
    caption is mismatched when i % 7 == 6 unless another defect replaced it; an exact copy repeats an earlier
    sample's bytes)."""
    manifest = curation["manifest"].reset_index(drop=True)
    first = manifest.dropna(subset=["sha256"]).drop_duplicates("sha256").set_index("sha256")["uid"]
    source = manifest["sha256"].map(first)
    copy = source.notna() & (source != manifest["uid"])
    replaced = manifest["caption"].str.startswith("IMG_") | ~manifest["caption"].str.contains(" ")
    pd.DataFrame({
        "uid": manifest["uid"], "mismatched": (manifest.index % 7 == 6) & ~replaced,
        "exact_duplicate": copy, "near_duplicate": False, "duplicate_of": source.where(copy, None),
        "caption_noise": [["foreign"] if i % 11 == 0 else [] for i in manifest.index],
    }).to_parquet(path, index=False)
    return path


def test_report_scores_each_filter_against_the_planted_defects(curation, tmp_path):
    truth = fixture_ground_truth(curation, tmp_path / "ground_truth.parquet")
    p = curation["paths"]
    build_report(p["manifest"], p["download_summary"], p["shards"], p["curate"], p["curated"], p["validation"],
                 tmp_path / "report", ReportParams(examples_per_group=2, rewrite_examples=2), 0,
                 TrackingParams(enabled=False), curation["steps"], ground_truth=truth)
    rows = {r["step"]: r for r in json.loads((tmp_path / "report" / "defects.json").read_text())["steps"]}
    assert [r for r in rows] == [s for s in curation["steps"] if s in ("langid", "dedup", "neardup", "score")]
    copies = int((~curation["tables"]["dedup"]["keep"]).sum())  # every copy whose source reached dedup
    assert copies >= 4 and rows["dedup"] == {
        "step": "dedup", "defect": "exact-duplicate images", "reached": len(curation["tables"]["dedup"]),
        "planted": copies, "dropped": copies, "dropped_planted": copies, "precision": 1.0, "recall": 1.0,
        "not_in_ground_truth": 0}
    score = curation["tables"]["score"]
    mismatched = score["uid"].isin(pd.read_parquet(truth).query("mismatched")["uid"]).to_numpy()
    dropped = ~score["keep"].to_numpy()
    assert rows["score"]["planted"] == mismatched.sum() > 0 and rows["score"]["dropped"] == dropped.sum() > 0
    assert rows["score"]["precision"] == pytest.approx((mismatched & dropped).sum() / dropped.sum())
    assert rows["score"]["recall"] == pytest.approx((mismatched & dropped).sum() / mismatched.sum())
    assert rows["langid"]["planted"] > 0 and rows["langid"]["dropped"] == 0 and rows["langid"]["precision"] is None
    html = (tmp_path / "report" / "index.html").read_text()
    assert "Filters against the planted defects" in html and "mismatched captions" in html

    pd.read_parquet(truth).drop(columns="duplicate_of").to_parquet(tmp_path / "bad.parquet", index=False)
    with pytest.raises(InputError, match=r"bad.parquet: field 'duplicate_of'"):
        build_report(p["manifest"], p["download_summary"], p["shards"], p["curate"], p["curated"],
                     p["validation"], tmp_path / "report2", ReportParams(), 0, TrackingParams(enabled=False),
                     curation["steps"], ground_truth=tmp_path / "bad.parquet")
