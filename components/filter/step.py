"""The rule filter as curation steps: ``rules`` (per sample) and ``dedup`` (exact-duplicate images, pool-wide)."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import pandas as pd
import pyarrow as pa

from components.common.errors import InputError
from components.common.steps import PoolStep, Step, decisions

from .rules import RULE_REASONS, rule_reasons

DUPLICATE_REASON = "duplicate_image"


class RulesStep(Step):
    """DataComp basic rules: caption words and characters, boilerplate captions, image side and aspect ratio."""

    name = "rules"
    section = "filter"
    reasons = RULE_REASONS
    needs = ("caption", "original_width", "original_height")

    def apply(self, batch: pd.DataFrame) -> pd.DataFrame:
        for column in ("original_width", "original_height"):
            if batch[column].isna().any():
                raise InputError(self.context.inputs.get("manifest", "manifest"), f"missing for successful download uid "
                                             f"{batch['uid'][batch[column].isna()].iloc[0]!r}", field=column)
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

    @classmethod
    def fingerprint(cls, params, context, phase="apply"):
        return super().fingerprint({"dedup_images": params.dedup_images}, context, phase)

    def map(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self.params.dedup_images and batch["sha256"].isna().any():
            raise InputError(self.context.inputs.get("manifest", "manifest"), f"missing for successful download uid "
                                         f"{batch['uid'][batch['sha256'].isna()].iloc[0]!r}", field="sha256")
        return batch[["uid", "sha256"]].reset_index(drop=True)

    def partial(self, mapped: pd.DataFrame) -> pd.DataFrame:
        grouped = mapped.groupby("sha256", sort=True)["uid"]
        return pd.DataFrame({"sha256": grouped.min().index, "uid": grouped.min().to_numpy(),
                             "count": grouped.size().to_numpy()})

    @classmethod
    def combine(cls, params, partials: Iterable[pd.DataFrame], mapped: Callable[[], Iterator[pd.DataFrame]]) -> dict:
        if not params.dedup_images:
            return {}
        table = pd.concat(list(partials), ignore_index=True)
        grouped = table.groupby("sha256", sort=True).agg(uid=("uid", "min"), count=("count", "sum"))
        winners = grouped[grouped["count"] > 1].reset_index()[["sha256", "uid"]]
        return {"winners": winners}

    def decide(self, mapped: pd.DataFrame, state: dict) -> pd.DataFrame:
        if "winners" not in state:
            return decisions(mapped["uid"], [None] * len(mapped))
        winner = state["winners"].set_index("sha256")["uid"].reindex(mapped["sha256"]).to_numpy()
        duplicate = pd.notna(winner) & (winner != mapped["uid"].to_numpy())
        return decisions(mapped["uid"], [DUPLICATE_REASON if d else None for d in duplicate])
