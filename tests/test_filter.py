"""Rule filter: reasons, precedence, switches, duplicate images, bad input, MLflow record and CLI."""
from __future__ import annotations

import json
import re

import mlflow
import pandas as pd
import pytest
import yaml

from clipmill.cli import main
from components.common.errors import InputError
from components.common.params import RayParams, TrackingParams
from components.filter.params import FilterParams
from components.filter.rules import filter_manifest, rule_reasons
from tests.curation_fixtures import make_download

SMALL = dict(min_image_side=32, max_aspect_ratio=3.0)


def expected_reason(i: int) -> str | None:
    """The reason the fixture's sample i must get, by the fixture's injection rules and the check order."""
    if i % 15 == 14:
        return "download:http_404"
    if i % 19 == 5:
        return "min_words"
    if i % 17 == 3:
        return "min_words"  # "IMG_1003.jpg" is one word: the word rule comes before boilerplate
    if i % 23 == 9:
        return "min_image_side"
    if i % 29 == 11:
        return "max_aspect_ratio"
    return None


@pytest.fixture
def download(tmp_path):
    return make_download(tmp_path / "download", n=120)


def run_filter(download, tmp_path, **overrides):
    params = FilterParams(**{**SMALL, **overrides})
    summary = filter_manifest(download["manifest"], tmp_path, params, RayParams(), TrackingParams(enabled=False))
    return pd.read_parquet(tmp_path / "rules.parquet"), summary


def test_reasons_and_counts_add_up(download, tmp_path):
    rules, summary = run_filter(download, tmp_path)
    manifest = download["table"]
    assert list(rules.columns) == ["uid", "keep", "reason"]
    assert rules["uid"].tolist() == manifest["uid"].tolist()
    assert (rules["keep"] == rules["reason"].isna()).all()

    expected = [expected_reason(i) for i in range(len(manifest))]
    # The fixture copies the previous written image into every sample with i % 31 == 30.
    got = rules["reason"].where(rules["reason"] != "duplicate_image", None).tolist()
    assert got == expected

    duplicates = rules[rules["reason"] == "duplicate_image"]
    assert len(duplicates) == 3  # i = 30, 61, 92 each repeat a kept image
    for uid in duplicates["uid"]:
        sha = manifest.loc[manifest["uid"] == uid, "sha256"].item()
        twins = manifest[manifest["sha256"] == sha]
        kept_twin = rules[rules["uid"].isin(twins["uid"]) & rules["keep"]]
        assert kept_twin["uid"].tolist() == [min(twins["uid"])]

    assert summary["input"] == 120
    assert summary["kept"] + sum(summary["dropped"].values()) == 120
    assert summary["dropped"]["download:http_404"] == 8
    assert summary["dropped"]["duplicate_image"] == 3
    assert summary == json.loads((tmp_path / "rules_summary.json").read_text())


def test_each_rule_can_be_switched_off(download, tmp_path):
    rules, summary = run_filter(download, tmp_path, min_words=None, min_chars=None, min_image_side=None,
                                max_aspect_ratio=None, boilerplate_patterns=[], dedup_images=False)
    assert set(summary["dropped"]) == {"download:http_404"}
    assert summary["kept"] == 112


def test_rule_precedence_and_boilerplate_defaults():
    batch = pd.DataFrame({
        "uid": list("abcdefgh"),
        "status": ["success"] * 7 + ["failed_to_download"],
        "error_reason": [None] * 7 + [None],
        "caption": ["a red circle on white", "IMG_0042 a red circle", "Click to enlarge this photo",
                    "photo.JPG", "red circle", "a blue square shape", "  a wide   banner  ", None],
        "original_width": [300, 300, 300, 300, 300, 100, 1000, None],
        "original_height": [300, 300, 300, 300, 300, 300, 200, None],
    })
    reasons = rule_reasons(batch, FilterParams(min_words=3, min_chars=6, min_image_side=200)).set_index("uid")["reason"]
    assert reasons.to_dict() == {
        "a": None, "b": None, "c": "boilerplate", "d": "min_words",
        "e": "min_words", "f": "min_image_side", "g": "max_aspect_ratio",
        "h": "download:unknown",
    }
    one_word = rule_reasons(batch, FilterParams(min_words=1, min_chars=1)).set_index("uid")["reason"]
    assert one_word["d"] == "boilerplate"  # a bare file name
    no_patterns = rule_reasons(batch, FilterParams(boilerplate_patterns=[], min_words=1)).set_index("uid")["reason"]
    assert no_patterns["c"] is None and no_patterns["d"] is None


@pytest.mark.parametrize("caption", ["untitled-1.png", "DSC00042.JPG", "Screenshot_000042.png", "download (3).jpg",
                                     "click image to view full size", "Picture 1", "HD wallpaper", "no image"])
def test_default_patterns_catch_boilerplate_only_captions(caption):
    assert any(re.search(p, caption) for p in FilterParams().boilerplate_patterns)


@pytest.mark.parametrize("caption", ["a red circle, click to enlarge", "IMG_0042.jpg a blue star",
                                     "an image of two hearts DSC864067.JPG",
                                     "click beetle on a leaf", "photo of a green ring", "red star - stock photo"])
def test_default_patterns_keep_honest_captions_with_boilerplate_around(caption):
    assert not any(re.search(p, caption) for p in FilterParams().boilerplate_patterns)


def test_bad_patterns_are_config_errors():
    with pytest.raises(ValueError, match="not a valid regex"):
        FilterParams(boilerplate_patterns=["(unclosed"])


def test_bad_manifest_names_file_and_field(download, tmp_path):
    table = download["table"]
    table.drop(columns=["sha256"]).to_parquet(tmp_path / "no_sha.parquet", index=False)
    with pytest.raises(InputError, match=r"no_sha\.parquet: field 'sha256': missing column"):
        filter_manifest(tmp_path / "no_sha.parquet", tmp_path / "out",
                        FilterParams(), RayParams(), TrackingParams(enabled=False))
    pd.concat([table, table.head(1)]).to_parquet(tmp_path / "dup.parquet", index=False)
    with pytest.raises(InputError, match="field 'uid'.*more than once"):
        filter_manifest(tmp_path / "dup.parquet", tmp_path / "out",
                        FilterParams(), RayParams(), TrackingParams(enabled=False))
    broken = table.copy()
    broken.loc[0, "original_width"] = None
    broken.to_parquet(tmp_path / "no_width.parquet", index=False)
    with pytest.raises(InputError, match="field 'original_width'"):
        filter_manifest(tmp_path / "no_width.parquet", tmp_path / "out",
                        FilterParams(), RayParams(), TrackingParams(enabled=False))
    assert not (tmp_path / "out").exists()


def test_cli_records_an_mlflow_run(download, tmp_path, mlflow_uri, default_params):
    params = default_params.model_dump(mode="json")
    params["filter"].update(SMALL)
    params["tracking"]["tracking_uri"] = mlflow_uri
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "curate"
    rc = main(["stage", "filter", "--params", str(tmp_path / "params.yaml"), "--manifest", str(download["manifest"]),
               "--out-dir", str(out)])
    assert rc == 0
    summary = json.loads((out / "rules_summary.json").read_text())
    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=[params["tracking"]["experiment"]], output_format="list")
    assert [r.data.tags["clipmill.stage"] for r in runs] == ["filter"]
    assert runs[0].data.metrics["kept"] == summary["kept"]
    assert runs[0].data.metrics["dropped.download.http_404"] == 8
