"""Great Expectations suites of the curation boundaries, run by a real GX context on a real tiny curation."""
from __future__ import annotations

import shutil

import great_expectations as gx
import pandas as pd
import pytest

from clipmill.components.balance.step import BalanceStep
from clipmill.components.common.curation import output_path, step_dir
from clipmill.components.validate.stage import ValidationFailed, validate
from clipmill.components.validate.suites_curation import curate_checks, curated_checks
from tests.curation_tables import make_curated

CURATE_TABLES = ["rules", "spam", "langid", "foreign_languages", "dedup", "neardup", "score", "clip_scores", "balance",
                 "entry_counts", "head_entries", "rewrite", "rewrite_texts"]


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


def edit(path, change) -> None:
    """Replace the table at ``path`` by ``change(table)`` (its completion marker stays)."""
    table = pd.read_parquet(path)
    change(table)
    table.to_parquet(path, index=False)


def broken_curation(curation, tmp_path):
    """A copy of the curation directory with one defect per step table (see the test)."""
    curate = tmp_path / "curate"
    shutil.copytree(curation["paths"]["curate"], curate)

    def rules(t):
        rows = t.index[~t["keep"]]
        t.loc[rows[0], "reason"] = "min_words:two words"  # a declared reason with a detail is fine
        t.loc[rows[1], "reason"] = "made_up"
    edit(output_path(curate, "rules", "00000"), rules)

    def dedup(t):
        t.loc[t.index[t["keep"]][0], "keep"] = False  # dropped without a reason
    edit(output_path(curate, "dedup", "00001"), dedup)

    def score(t):
        t.loc[0, "clip_score"] = 1.5
        t.loc[1, "uid"] = t.loc[2, "uid"]
    edit(output_path(curate, "score", "00000"), score)

    def entry_counts(t):
        t.loc[0, "count_after"] = 0  # the most frequent (head) entry balanced away
        t.loc[len(t) - 1, "count_after"] = t.loc[len(t) - 1, "count_before"] + 1  # balancing added a text
    edit(step_dir(curate, "balance") / "entry_counts.parquet", entry_counts)

    def rewrite(t):
        t.at[0, "rewrites"] = ["fine", "   "]
        t.at[1, "rewrites"] = [""]
    edit(output_path(curate, "rewrite", "00000"), rewrite)
    return curate


def test_good_curation_outputs_pass_every_boundary(curation):
    p = curation["paths"]
    checks = curate_checks(p["curate"], curation["steps"], curation["params"]) + curated_checks(p["curated"])
    assert [c.name for c in checks] == CURATE_TABLES + ["curated_manifest"]
    assert failures(checks) == {}
    # Only the listed steps are checked
    assert [c.name for c in curate_checks(p["curate"], ["rules", "score"], curation["params"])] == \
        ["rules", "score", "clip_scores"]


def test_bad_outputs_fail_the_expectation_that_names_the_defect(curation, tmp_path):
    p = curation["paths"]
    curate = broken_curation(curation, tmp_path)
    params = curation["params"].model_copy(deep=True)
    params.balance.t = 20  # head entries (>= 20 texts) must keep at least 2; the broken one keeps none
    assert failures(curate_checks(curate, curation["steps"], params)) == {
        "rules": ["expect_column_values_to_match_regex"],
        "dedup": ["expect_column_values_to_not_be_null"],
        "score": ["expect_column_values_to_be_unique"],
        "clip_scores": ["expect_column_values_to_be_between"],
        "entry_counts": ["expect_column_pair_values_a_to_be_greater_than_b"],
        "head_entries": ["expect_column_values_to_be_between"],
        "rewrite_texts": ["expect_column_value_lengths_to_be_between", "expect_column_values_to_not_match_regex"],
    }

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


def test_the_curate_boundary_runs_and_fails_with_one_line_naming_each_defect(curation, tmp_path):
    results = validate("curate", {"curate": curation["paths"]["curate"]}, curation["params"], tmp_path / "validation",
                       tmp_path / "reports")
    assert results["success"] and [c["table"] for c in results["checks"]] == CURATE_TABLES
    assert (tmp_path / "validation" / "curate.json").exists()
    assert (tmp_path / "reports" / "curate" / "index.html").exists()

    with pytest.raises(ValidationFailed) as err:
        validate("curate", {"curate": broken_curation(curation, tmp_path)}, curation["params"],
                 tmp_path / "validation", tmp_path / "reports")
    message = str(err.value)
    assert "\n" not in message and message.startswith("validation of 'curate' failed (")
    for expected in ("rules: expect_column_values_to_match_regex(reason) [reasons declared by step 'rules']: "
                     "1 unexpected",
                     "dedup: expect_column_values_to_not_be_null(reason) [every drop has a reason]",
                     "score: expect_column_values_to_be_unique(uid)",
                     "clip_scores: expect_column_values_to_be_between(clip_score)",
                     "rewrite_texts: expect_column_values_to_not_match_regex(rewrite)"):
        assert expected in message


def test_head_entry_floor_is_four_sigma_below_t():
    assert BalanceStep.head_entry_floor(100) == 60
    assert BalanceStep.head_entry_floor(20_000) == 19_434
    assert BalanceStep.head_entry_floor(4) == 0
