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
from .captions import CaptionRewriter, failed_captions, slot_counts
from .local_model import model_source
from .params import RewriteParams
from .prompt import stable_seed

NOT_SAMPLED = "not_sampled"


def sampled(uids: list, fraction: float | None, seed: int) -> list[bool]:
    """Which captions go to the backend: all, or the ``fraction`` whose hash of (seed, uid) falls below it; the
    choice of a uid does not depend on its shard or on the other uids."""
    if fraction is None or fraction >= 1:
        return [True] * len(uids)
    return [stable_seed(seed, "rewrite.sample", uid) < fraction * 2**64 for uid in uids]


class RewriteStep(Step):
    name = "rewrite"
    section = "rewrite"
    columns = {"rewrites": pa.list_(pa.string())}
    extra_columns = {"rewrite_dropped": pa.list_(pa.string())}  # one reason per dropped slot
    needs = ("caption",)

    def __init__(self, params: RewriteParams, context):
        super().__init__(params, context)
        self.seed = context.seed + params.seed_offset
        self.rewriter = CaptionRewriter(params, self.seed)

    @classmethod
    def fingerprint(cls, params, context, phase="apply"):
        dump = params.model_dump(mode="json")
        # Options that are off leave the fingerprint as it was before they existed, so that outputs made without
        # them stay reusable (and the demo's recorded outputs unchanged); set, they change it like any other.
        for section, name in ((dump, "sample_fraction"), (dump["transformers"], "gguf_file")):
            if section.get(name) is None:
                section.pop(name, None)
        return super().fingerprint({"params": dump, "seed": context.seed}, context, phase)

    @classmethod
    def check_params(cls, params: RewriteParams, context) -> None:
        """A local model that is not there stops the stage before any work (not in the first worker that loads it)."""
        if params.backend == "transformers":
            model_source(params.transformers)

    def apply(self, batch: pd.DataFrame) -> pd.DataFrame:
        # plain lists from here on: a shard's fixed cost is what a small shard of a large crawl pays per caption
        uids = batch["uid"].tolist()
        captions = batch["caption"].fillna("").astype(str).tolist()
        entries = ([list(e) for e in batch["matched_entries"]] if "matched_entries" in batch
                   else [[] for _ in uids])
        rewrites, dropped = self._rewrite(uids, captions, entries)
        failed = failed_captions(dropped, self.params.rewrites_per_caption)
        if uids and sum(failed.values()) / len(uids) > self.params.openai.max_failed_fraction:
            raise ClipmillError(f"rewrite: {sum(failed.values())} of {len(uids)} captions of a shard got no answer "
                                f"from the backend ({dict(sorted(failed.items()))}), more than max_failed_fraction="
                                f"{self.params.openai.max_failed_fraction}; rerun to retry them (answers are cached)")
        return decisions(uids, [None] * len(uids), rewrites=rewrites, rewrite_dropped=dropped)

    def _rewrite(self, uids: list, captions: list[str], entries: list[list[str]]
                 ) -> tuple[list[list[str]], list[list[str]]]:
        """(rewrites, rewrite_dropped) per caption, in order; captions outside ``sample_fraction`` are not sent to
        the backend and drop every slot as ``not_sampled``."""
        chosen = sampled(uids, self.params.sample_fraction, self.seed)
        todo = [i for i, c in enumerate(chosen) if c]
        rewrites: list[list[str]] = [[] for _ in uids]
        dropped = [[NOT_SAMPLED] * self.params.rewrites_per_caption for _ in uids]
        size = self.params.batch_size
        for start in range(0, len(todo), size):
            part = todo[start:start + size]
            kept, reasons = self.rewriter.rewrite([uids[i] for i in part], [captions[i] for i in part],
                                                  [entries[i] for i in part])
            for i, k, r in zip(part, kept, reasons):
                rewrites[i], dropped[i] = k, r
        return rewrites, dropped

    @classmethod
    def shard_summary(cls, params: RewriteParams, decided: pd.DataFrame) -> dict:
        """The shard's slot counts (``captions.slot_counts``: each shard's marker holds only what differs by shard;
        ``summarize`` takes the backend and model from the params)."""
        return slot_counts(decided, params.rewrites_per_caption)

    @classmethod
    def summarize(cls, params: RewriteParams, shards: list[dict], out_dir: str) -> dict:
        """The slot counts of every shard added up (``rewrites``: captions, slots, kept, dropped per reason)."""
        total: Counter = Counter()
        dropped: Counter = Counter()
        failed: Counter = Counter()
        rejected: Counter = Counter()
        for counts in shards:
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
