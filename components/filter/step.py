"""The rule filter as curation steps: ``rules`` (per sample) and ``dedup`` (exact-duplicate images, pool-wide)."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from clipmill.components.common.errors import InputError
from clipmill.components.common.steps import PoolStep, Step, decisions

from .rules import RULE_REASONS, rule_reasons

DUPLICATE_REASON = "duplicate_image"
COMBINE_BUCKETS = 8  # the dedup combine works through the pool's image hashes in this many parts


class RulesStep(Step):
    """DataComp basic rules: caption words and characters, boilerplate captions, image side and aspect ratio."""

    name = "rules"
    section = "filter"
    reasons = RULE_REASONS
    needs = ("caption", "original_width", "original_height")

    def apply(self, batch: pd.DataFrame) -> pd.DataFrame:
        for column in ("original_width", "original_height"):
            if batch[column].isna().any():
                raise InputError(self.context.inputs.get("manifest", "manifest"),
                                 f"missing for successful download uid {batch['uid'][batch[column].isna()].iloc[0]!r}",
                                 field=column)
        return decisions(batch["uid"], rule_reasons(batch, self.params))


class DedupStep(PoolStep):
    """Exact-duplicate images (same sha256) across the whole pool: the smallest uid of each image is kept.

    Partial per shard: the smallest uid and the count per sha256; the state holds the winner of every sha256
    seen more than once (``filter.dedup_images: false`` keeps everything)."""

    name = "dedup"
    section = "filter"
    reasons = (DUPLICATE_REASON,)
    needs = ("sha256",)
    map_columns = {"sha256": pa.string()}
    _winners: tuple[dict, pd.Series] | None = None

    @classmethod
    def fingerprint(cls, params, context, phase="apply"):
        return super().fingerprint({"dedup_images": params.dedup_images}, context, phase)

    def map(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self.params.dedup_images and batch["sha256"].isna().any():
            raise InputError(self.context.inputs.get("manifest", "manifest"), f"missing for successful download uid "
                                         f"{batch['uid'][batch['sha256'].isna()].iloc[0]!r}", field="sha256")
        return batch[["uid", "sha256"]].reset_index(drop=True)

    def partial(self, mapped: pd.DataFrame) -> pd.DataFrame:
        """Per sha256 of the shard: the smallest uid, how many samples have it, and its combine bucket."""
        ordered = mapped.sort_values(["sha256", "uid"], kind="stable")
        first = ordered.drop_duplicates("sha256")
        counts = ordered["sha256"].value_counts()
        return pd.DataFrame({"sha256": first["sha256"].to_numpy(), "uid": first["uid"].to_numpy(),
                             "count": counts.reindex(first["sha256"]).to_numpy(np.int64),
                             "bucket": (pd.util.hash_array(first["sha256"].to_numpy(object)) % COMBINE_BUCKETS)
                             .astype(np.int64)})

    @classmethod
    def combine(cls, params, partials: Callable[[], Iterator[pd.DataFrame]],
                mapped: Callable[[], Iterator[pd.DataFrame]]) -> dict:
        """The winner of every sha256 seen more than once, one hash bucket at a time (the driver holds a
        1/COMBINE_BUCKETS share of the pool's distinct images, not all of them)."""
        if not params.dedup_images:
            return {}
        winners = []
        for bucket in range(COMBINE_BUCKETS):
            table = pd.concat([p[p["bucket"] == bucket] for p in partials()], ignore_index=True)
            table = table.sort_values(["sha256", "uid"], kind="stable")
            counts = table.groupby("sha256", sort=False)["count"].sum()
            first = table.drop_duplicates("sha256").set_index("sha256")["uid"]
            repeated = counts.index[counts.to_numpy() > 1]
            winners.append(pd.DataFrame({"sha256": repeated, "uid": first.reindex(repeated).to_numpy()}))
        return {"winners": pd.concat(winners, ignore_index=True).sort_values("sha256", ignore_index=True)}

    def decide(self, mapped: pd.DataFrame, state: dict) -> pd.DataFrame:
        if "winners" not in state:
            return decisions(mapped["uid"], [None] * len(mapped))
        if self._winners is None or self._winners[0] is not state:  # indexed once per state and process
            self._winners = (state, state["winners"].set_index("sha256")["uid"])
        winner = self._winners[1].reindex(mapped["sha256"]).to_numpy()
        duplicate = pd.notna(winner) & (winner != mapped["uid"].to_numpy())
        return decisions(mapped["uid"], [DUPLICATE_REASON if d else None for d in duplicate])
