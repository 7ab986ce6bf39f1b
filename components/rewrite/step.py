"""LaCLIP-style caption rewriting as a per-sample curation step: it drops nothing and adds ``rewrites``.

The candidates of the configured backend pass the faithfulness guard (every matched metadata entry kept); each
caption has ``rewrites_per_caption`` slots, each kept or dropped with a reason (``rewrite_dropped``).
"""
from __future__ import annotations

from collections import Counter

import pandas as pd
import pyarrow as pa

from clipmill.components.common.errors import ClipmillError
from clipmill.components.common.steps import Step, decisions

from .backends import model_name
from .captions import CaptionRewriter, summarize
from .params import RewriteParams


class RewriteStep(Step):
    name = "rewrite"
    section = "rewrite"
    columns = {"rewrites": pa.list_(pa.string())}
    extra_columns = {"rewrite_dropped": pa.list_(pa.string())}  # one reason per dropped slot
    needs = ("caption",)

    def __init__(self, params: RewriteParams, context):
        super().__init__(params, context)
        self.rewriter = CaptionRewriter(params, context.seed + params.seed_offset)

    @classmethod
    def fingerprint(cls, params, context, phase="apply"):
        return super().fingerprint({"params": params.model_dump(mode="json"), "seed": context.seed}, context, phase)

    def apply(self, batch: pd.DataFrame) -> pd.DataFrame:
        entries = batch["matched_entries"] if "matched_entries" in batch else pd.Series([[]] * len(batch))
        captions = pd.DataFrame({"uid": batch["uid"].to_numpy(),
                                 "caption": batch["caption"].fillna("").astype(str).to_numpy(),
                                 "matched_entries": [list(e) for e in entries]})
        # A shard that earlier steps emptied still gets its (empty) table with every column.
        out = pd.concat([self.rewriter(captions.iloc[i:i + self.params.batch_size].reset_index(drop=True))
                         for i in range(0, len(captions), self.params.batch_size)]
                        or [pd.DataFrame({"uid": [], "rewrites": [], "rewrite_dropped": []})], ignore_index=True)
        counts = summarize(out, self.params, model_name(self.params))
        failed = sum(counts["failed_captions"].values())
        if len(out) and failed / len(out) > self.params.openai.max_failed_fraction:
            raise ClipmillError(f"rewrite: {failed} of {len(out)} captions of a shard got no answer from the "
                                f"backend ({counts['failed_captions']}), more than max_failed_fraction="
                                f"{self.params.openai.max_failed_fraction}; rerun to retry them (answers are cached)")
        return decisions(out["uid"], [None] * len(out), rewrites=out["rewrites"].map(list),
                         rewrite_dropped=out["rewrite_dropped"].map(list))

    @classmethod
    def summarize(cls, params: RewriteParams, decided, out_dir: str) -> dict:
        """The slot counts of every shard added up (``rewrites``: captions, slots, kept, dropped per reason)."""
        total: Counter = Counter()
        dropped: Counter = Counter()
        failed: Counter = Counter()
        rejected: Counter = Counter()
        for table in decided():
            counts = summarize(table, params, model_name(params))
            total.update({k: counts[k] for k in ("captions", "slots", "kept", "captions_with_rewrites")})
            dropped.update(counts["dropped"])
            failed.update(counts["failed_captions"])
            rejected.update(counts["rejected_captions"])
        rewrites = {"backend": params.backend, "model": model_name(params),
                    "rewrites_per_caption": params.rewrites_per_caption, **{k: int(total[k]) for k in
                    ("captions", "slots", "kept", "captions_with_rewrites")},
                    "dropped": dict(sorted(dropped.items())), "failed_captions": dict(sorted(failed.items())),
                    "rejected_captions": dict(sorted(rejected.items()))}
        return {"rewrites": rewrites}

    @classmethod
    def expectations(cls, params: RewriteParams, table: pd.DataFrame, step_dir: str) -> list:
        """Every rewrite is a non-empty, non-blank text (one row per rewrite)."""
        import great_expectations as gx

        texts = table[["uid", "rewrites"]].explode("rewrites").dropna(subset=["rewrites"])
        texts = texts.rename(columns={"rewrites": "rewrite"}).reset_index(drop=True)
        return [("rewrite_texts", texts, [
            gx.expectations.ExpectColumnValueLengthsToBeBetween(column="rewrite", min_value=1),
            gx.expectations.ExpectColumnValuesToNotMatchRegex(column="rewrite", regex=r"^\s*$"),
        ])]
