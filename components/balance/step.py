"""MetaCLIP balancing as a pool step: matches per shard, entry counts over the whole pool, draws per shard.

Map: the metadata entries each caption matches (Aho-Corasick, MetaCLIP's spacing). Partial: count_e per shard.
Combine: count_e over the pool. Decide: keep with probability 1 - prod(1 - t / max(count_e, t)), drawn from
(seed, uid). An incremental run re-decides earlier shards from their stored matches, never re-matching them.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from clipmill.components.common.hashing import file_sha256
from clipmill.components.common.steps import PoolStep, decisions
from clipmill.components.common.storage import location, read_frame, write_table

from .balancing import NO_MATCH_REASON, SUBSAMPLED_REASON, keep_probabilities, tail_share, uid_uniform
from .matching import EntryMatcher, read_metadata
from .params import BalanceParams


class BalanceStep(PoolStep):
    name = "balance"
    section = "balance"
    columns = {"matched_entries": pa.list_(pa.string()), "keep_probability": pa.float64()}
    map_columns = {"matched_entries": pa.list_(pa.string())}
    reasons = (NO_MATCH_REASON, SUBSAMPLED_REASON)
    needs = ("caption",)
    _counts: tuple[dict, pd.Series] | None = None

    def __init__(self, params: BalanceParams, context):
        super().__init__(params, context)
        self.matcher = EntryMatcher(read_metadata(params.metadata))

    @classmethod
    def fingerprint(cls, params, context, phase="apply"):
        if phase == "decide":
            return super().fingerprint({"t": params.t, "seed": context.seed}, context, phase)
        # The matches depend on the metadata's content only (not on t or the seed).
        return super().fingerprint({"metadata": file_sha256(params.metadata)}, context, phase)

    @classmethod
    def check_params(cls, params: BalanceParams, context) -> None:
        read_metadata(params.metadata)

    def map(self, batch: pd.DataFrame) -> pd.DataFrame:
        matched = self.matcher(batch[["uid", "caption"]])
        return pd.DataFrame({"uid": matched["uid"].to_numpy(), "matched_entries": matched["matched_entries"].map(list)})

    def partial(self, mapped: pd.DataFrame) -> pd.DataFrame:
        counts = mapped["matched_entries"].explode().dropna().value_counts()
        return pd.DataFrame({"entry": counts.index.astype(str), "count": counts.to_numpy(np.int64)})

    @classmethod
    def combine(cls, params: BalanceParams, partials: Callable[[], Iterator[pd.DataFrame]],
                mapped: Callable[[], Iterator[pd.DataFrame]]) -> dict:
        counts = pd.Series(dtype=np.int64)  # a running sum: at most one count per metadata entry in memory
        for partial in partials():
            counts = counts.add(partial.set_index("entry")["count"], fill_value=0)
        counts = counts.sort_index().astype(np.int64)
        return {"counts": pd.DataFrame({"entry": counts.index.astype(str), "count": counts.to_numpy(np.int64)})}

    def decide(self, mapped: pd.DataFrame, state: dict) -> pd.DataFrame:
        if self._counts is None or self._counts[0] is not state:  # indexed once per state and process, not per shard
            self._counts = (state, state["counts"].set_index("entry")["count"])
        counts = self._counts[1]
        matched = mapped["matched_entries"].map(list)
        probability, _ = keep_probabilities(matched, self.params.t, counts)
        has_match = matched.map(len).to_numpy() > 0
        keep = has_match & (uid_uniform(mapped["uid"], self.context.seed) < probability)
        reason = np.where(keep, None, np.where(has_match, SUBSAMPLED_REASON, NO_MATCH_REASON))
        return decisions(mapped["uid"], reason, matched_entries=matched, keep_probability=probability)

    @classmethod
    def shard_summary(cls, params: BalanceParams, decided: pd.DataFrame) -> dict:
        """The shard's kept texts per entry and the sum of its keep probabilities."""
        kept = decided.loc[decided["keep"].astype(bool), "matched_entries"].explode().dropna().value_counts()
        return {"kept_entries": {str(entry): int(n) for entry, n in kept.items()},
                "expected_kept": float(decided["keep_probability"].sum())}

    @classmethod
    def summarize(cls, params: BalanceParams, shards: list[dict], out_dir: str) -> dict:
        """Also writes ``entry_counts.parquet`` (entry, count_before, count_after) beside the step's outputs."""
        before = read_frame(location(out_dir) / "state" / "counts.parquet").set_index("entry")["count"]
        after: Counter[str] = Counter()
        expected = 0.0
        for shard in shards:
            after.update(shard["kept_entries"])
            expected += shard["expected_kept"]
        order = before.sort_values(ascending=False, kind="stable").index.astype(str)
        entry_counts = pd.DataFrame({"entry": order, "count_before": before[order].to_numpy(np.int64),
                                     "count_after": np.array([after[entry] for entry in order], dtype=np.int64)})
        write_table(entry_counts, location(out_dir) / "entry_counts.parquet")
        is_tail = entry_counts.set_index("entry")["count_before"] < params.t
        return {"t": params.t, "metadata_entries": len(read_metadata(params.metadata)),
                "matched_entries": int(len(entry_counts)), "head_entries": int((~is_tail).sum()),
                "tail_share": tail_share(entry_counts.set_index("entry")["count_before"], is_tail),
                "tail_share_after": tail_share(entry_counts.set_index("entry")["count_after"], is_tail),
                "expected_kept": expected}

    @staticmethod
    def head_entry_floor(t: int) -> int:
        """Fewest texts a head entry may keep: each of its texts is kept with probability >= t / count, so the
        kept count has mean >= t; four standard deviations (at most sqrt(t)) below it is a failure, not chance."""
        import math

        return max(0, math.floor(t - 4 * math.sqrt(t)))

    @classmethod
    def expectations(cls, params: BalanceParams, table: pd.DataFrame, step_dir: str) -> list:
        """``entry_counts.parquet``: one row per entry, balancing never adds texts; head entries (count >= t)
        keep at least ``head_entry_floor(t)`` texts."""
        import great_expectations as gx


        counts = read_frame(location(step_dir) / "entry_counts.parquet", ["entry", "count_before", "count_after"])
        head = counts[counts["count_before"] >= params.t].reset_index(drop=True)
        return [
            ("entry_counts", counts, [
                gx.expectations.ExpectColumnValuesToBeUnique(column="entry"),
                gx.expectations.ExpectColumnPairValuesAToBeGreaterThanB(column_A="count_before",
                                                                       column_B="count_after", or_equal=True),
            ]),
            ("head_entries", head, [gx.expectations.ExpectColumnValuesToBeBetween(
                column="count_after", min_value=cls.head_entry_floor(params.t),
                description=f"head entries keep at least {cls.head_entry_floor(params.t)} texts (t = {params.t})")]),
        ]
