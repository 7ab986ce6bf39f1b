"""Great Expectations suites for the curation boundaries: ``curate`` (every listed step's decisions and the
steps' own tables) and ``curated``.

Each boundary builder reads its stage outputs and returns ``TableCheck``s: a pandas frame, and the suite name and
expectations it must pass (GX builds a suite only inside an active data context, so the runner makes it). Derived
columns make set-level facts checkable row by row (``in_shards``: the curated sample is in the shard its manifest
row names).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import great_expectations as gx
import pandas as pd
from great_expectations.expectations.row_conditions import Column

from clipmill.components.common.curation import read_step_table, step_classes, step_dir, step_params, units_of
from clipmill.components.common.errors import InputError
from clipmill.components.common.io import read_parquet
from clipmill.components.common.shards import index_shard
from clipmill.components.common.steps import DECISION_COLUMNS, Step


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


def reason_pattern(reasons: tuple[str, ...]) -> str:
    """A regex matching a declared reason, alone or as ``<reason>:<detail>`` (nothing when none is declared)."""
    if not reasons:
        return r"^(?!)"
    return "^(?:" + "|".join(re.escape(r) for r in reasons) + ")(?::.*)?$"


def decision_expectations(step: type[Step]) -> list:
    """What every step's decisions must satisfy: unique non-null uids, a boolean keep, and a declared reason for
    every drop."""
    return _uid_key() + [
        gx.expectations.ExpectColumnValuesToBeInSet(column="keep", value_set=[True, False]),
        gx.expectations.ExpectColumnValuesToNotBeNull(column="reason", description="every drop has a reason",
                                                      row_condition=Column("keep") == False),  # noqa: E712
        gx.expectations.ExpectColumnValuesToMatchRegex(column="reason", regex=reason_pattern(step.reasons),
                                                       description=f"reasons declared by step {step.name!r}"),
    ]


def step_checks(curate_dir: Path, step: type[Step], params) -> list[TableCheck]:
    """One step's decisions (every shard) against ``decision_expectations``, then the step's own checks."""
    table = read_step_table(curate_dir, step.name)
    checks = [TableCheck(step.name, table[DECISION_COLUMNS], f"curate.{step.name}", decision_expectations(step))]
    own = step.expectations(step_params(step, params), table, str(step_dir(curate_dir, step.name)))
    return checks + [TableCheck(name, frame, f"curate.{name}", expectations) for name, frame, expectations in own]


def curate_checks(curate_dir: str | os.PathLike, steps: list[str], params) -> list[TableCheck]:
    """The curation directory, the listed steps and the whole params in; every listed step's checks out."""
    curate_dir = Path(curate_dir)
    if not units_of(curate_dir):
        raise InputError(curate_dir / "units", "no curated download shards (run the curate stage first)")
    return [check for step in step_classes(steps) for check in step_checks(curate_dir, step, params)]


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
