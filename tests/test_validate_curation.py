"""Great Expectations suites of the curation boundaries, run by a real (ephemeral) GX context on tiny outputs."""
from __future__ import annotations

import great_expectations as gx
import pandas as pd
import pytest

from components.validate.suites_curation import curate_checks, curated_checks, head_entry_floor, rewrites_checks
from tests.curation_tables import make_curated


@pytest.fixture(scope="module")
def curation(tmp_path_factory):
    return make_curated(tmp_path_factory.mktemp("curation"), n=160, per_shard=50, samples_per_shard=30)


def failures(checks) -> dict[str, list[str]]:
    """Table name -> the expectation types it failed (empty lists left out)."""
    context = gx.get_context(mode="ephemeral")
    asset = context.data_sources.add_pandas("curation").add_dataframe_asset("tables")
    batches = asset.add_batch_definition_whole_dataframe("whole")
    out = {}
    for check in checks:
        result = batches.get_batch(batch_parameters={"dataframe": check.frame}).validate(check.suite())
        failed = [r.expectation_config.type for r in result.results if not r.success]
        if failed:
            out[check.name] = failed
    return out


def test_good_curation_outputs_pass_every_boundary(curation):
    p = curation["paths"]
    checks = (curate_checks(p["scores"], p["balance"], p["entry_counts"], t=20) + rewrites_checks(p["rewrites"])
              + curated_checks(p["curated"]))
    assert [c.name for c in checks] == ["scores", "balance", "entry_counts", "head_entries", "rewrites",
                                        "rewrite_texts", "curated_manifest"]
    assert failures(checks) == {}


def test_bad_outputs_fail_the_expectation_that_names_the_defect(curation, tmp_path):
    p = curation["paths"]
    scores = curation["scores"].copy()
    scores.loc[0, "clip_score"] = 1.5
    scores.loc[1, "uid"] = scores.loc[2, "uid"]
    scores.to_parquet(tmp_path / "scores.parquet", index=False)
    counts = curation["entry_counts"].copy()
    counts.loc[0, "count_after"] = 0  # a head entry balanced far below t (floor for t = 20: 2)
    counts.to_parquet(tmp_path / "entry_counts.parquet", index=False)
    assert failures(curate_checks(tmp_path / "scores.parquet", p["balance"], tmp_path / "entry_counts.parquet", t=20)) == {
        "scores": ["expect_column_values_to_be_unique", "expect_column_values_to_be_between"],
        "head_entries": ["expect_column_values_to_be_between"],
    }

    rewrites = curation["rewrites"].copy()
    rewrites.at[rewrites.index[0], "rewrites"] = ["fine", "   "]
    rewrites.at[rewrites.index[1], "rewrites"] = [""]
    rewrites.to_parquet(tmp_path / "rewrites.parquet", index=False)
    assert failures(rewrites_checks(tmp_path / "rewrites.parquet")) == {
        "rewrite_texts": ["expect_column_value_lengths_to_be_between", "expect_column_values_to_not_match_regex"]}

    curated = tmp_path / "curated"
    (curated / "shards").mkdir(parents=True)
    for f in (p["curated"] / "shards").glob("*.tar"):
        (curated / "shards" / f.name).write_bytes(f.read_bytes())
    manifest = pd.read_parquet(p["curated"] / "manifest.parquet")
    manifest.loc[0, "shard"] = "00001.tar" if manifest.loc[0, "shard"] != "00001.tar" else "00000.tar"
    manifest = pd.concat([manifest, manifest.iloc[[3]]], ignore_index=True)
    manifest.to_parquet(curated / "manifest.parquet", index=False)
    assert failures(curated_checks(curated)) == {
        "curated_manifest": ["expect_column_values_to_be_unique", "expect_column_values_to_be_in_set"]}


def test_head_entry_floor_is_four_sigma_below_t():
    assert head_entry_floor(100) == 60
    assert head_entry_floor(20_000) == 19_434
    assert head_entry_floor(4) == 0
