"""Great Expectations suites for the curation boundaries: ``curate`` (scores, balance, entry counts),
``rewrites`` and ``curated``.

Each boundary builder reads its stage outputs and returns ``TableCheck``s: a pandas frame, and the suite name and
expectations it must pass (GX builds a suite only inside an active data context, so the runner makes it). Derived columns make set-level facts checkable row by row (``in_shards``: the curated sample
is in the shard its manifest row names; ``rewrite``: one row per rewrite).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import great_expectations as gx
import pandas as pd

from components.common.io import read_parquet
from components.common.shards import index_shard


@dataclass
class TableCheck:
    name: str
    frame: pd.DataFrame
    suite_name: str
    expectations: list

    def suite(self) -> gx.ExpectationSuite:
        """The expectation suite (call with a GX data context active)."""
        suite = gx.ExpectationSuite(name=self.suite_name)
        for expectation in self.expectations:
            suite.add_expectation(expectation)
        return suite


def _uid_key(column: str = "uid") -> list:
    return [gx.expectations.ExpectColumnValuesToNotBeNull(column=column),
            gx.expectations.ExpectColumnValuesToBeUnique(column=column)]


def head_entry_floor(t: int) -> int:
    """Fewest texts a head entry may keep: each of its texts is kept with probability >= t / count, so the kept
    count has mean >= t; four standard deviations (at most sqrt(t)) below it is a failure, not chance."""
    return max(0, math.floor(t - 4 * math.sqrt(t)))


def curate_checks(scores_path: str | os.PathLike, balance_path: str | os.PathLike,
                  entry_counts_path: str | os.PathLike, t: int) -> list[TableCheck]:
    """Scores within [-1, 1]; no null or duplicate uids; balanced head entries (count >= t) keep about t texts."""
    scores = read_parquet(scores_path, ["uid", "clip_score", "keep"])
    balance = read_parquet(balance_path, ["uid", "keep"])
    counts = read_parquet(entry_counts_path, ["entry", "count_before", "count_after"])
    head = counts[counts["count_before"] >= t]
    return [
        TableCheck("scores", scores, "curate.scores", _uid_key() + [
            gx.expectations.ExpectColumnValuesToNotBeNull(column="clip_score"),
            gx.expectations.ExpectColumnValuesToBeBetween(column="clip_score", min_value=-1.0, max_value=1.0),
            gx.expectations.ExpectColumnValuesToBeInSet(column="keep", value_set=[True, False]),
        ]),
        TableCheck("balance", balance, "curate.balance", _uid_key()),
        TableCheck("entry_counts", counts, "curate.entry_counts", [
            gx.expectations.ExpectColumnValuesToBeUnique(column="entry"),
            gx.expectations.ExpectColumnPairValuesAToBeGreaterThanB(column_A="count_before", column_B="count_after",
                                                                   or_equal=True),
        ]),
        TableCheck("head_entries", head, "curate.head_entries", [
            gx.expectations.ExpectColumnValuesToBeBetween(column="count_after", min_value=head_entry_floor(t)),
        ]),
    ]


def rewrites_checks(rewrites_path: str | os.PathLike) -> list[TableCheck]:
    """One row per uid without nulls or duplicates; every rewrite a non-empty, non-blank string."""
    table = read_parquet(rewrites_path, ["uid", "rewrites"])
    exploded = table.explode("rewrites").dropna(subset=["rewrites"]).rename(columns={"rewrites": "rewrite"})
    return [
        TableCheck("rewrites", table[["uid"]], "rewrites.rows", _uid_key()),
        TableCheck("rewrite_texts", exploded.reset_index(drop=True), "rewrites.texts", [
            gx.expectations.ExpectColumnValueLengthsToBeBetween(column="rewrite", min_value=1),
            gx.expectations.ExpectColumnValuesToNotMatchRegex(column="rewrite", regex=r"^\s*$"),
        ]),
    ]


def curated_checks(curated_dir: str | os.PathLike) -> list[TableCheck]:
    """Curated manifest uids unique, not null, and each present in the shard its row names."""
    curated_dir = Path(curated_dir)
    manifest = read_parquet(curated_dir / "manifest.parquet", ["uid", "shard", "key"])
    members = {shard: index_shard(curated_dir / "shards" / shard) for shard in manifest["shard"].dropna().unique()}
    in_shards = [isinstance(shard, str) and "jpg" in members[shard].get(key, {})
                 for shard, key in zip(manifest["shard"], manifest["key"])]
    frame = manifest.assign(in_shards=in_shards)
    return [TableCheck("curated_manifest", frame, "curated.manifest", _uid_key() + [
        gx.expectations.ExpectColumnValuesToBeInSet(column="in_shards", value_set=[True]),
    ])]
