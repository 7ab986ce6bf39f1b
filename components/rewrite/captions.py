"""Rewriting captions: the backend's candidates through the faithfulness guard, and the slot counts."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import pandas as pd

from .backends import make_backend
from .guard import GuardRules, guard_rewrites
from .params import RewriteParams


class CaptionRewriter:
    """Batch function (``rewrite``): uids, captions and matched entries in; per caption the candidates that passed
    the faithfulness guard and one reason per dropped slot out.
    The backend (and its model or HTTP client) is built once per worker.
    """

    def __init__(self, params: RewriteParams, seed: int):
        self.params = params
        self.backend = make_backend(params, seed)
        self.guard = GuardRules.from_params(params)

    def rewrite(self, uids: list, captions: list[str], entries: list[list[str]]
                ) -> tuple[list[list[str]], list[list[str]]]:
        """Per caption: the candidates that passed the guard, and one reason per dropped slot."""
        generated = self.backend.generate(uids, captions, entries)
        guarded = [guard_rewrites(c, e, g, self.params.rewrites_per_caption, self.guard)
                   for c, e, g in zip(captions, entries, generated)]
        return [k for k, _ in guarded], [d for _, d in guarded]


def failed_captions(dropped: Iterable[list[str]], k: int, prefix: str = "backend:") -> Counter:
    """Captions that dropped every one of their ``k`` slots for a reason starting with ``prefix``, by reason: by
    default those the backend could not answer (``backend:*``)."""
    return Counter(reasons[0] for reasons in dropped if len(reasons) == k and reasons[0].startswith(prefix))


def summarize(table: pd.DataFrame, params: RewriteParams, model: str) -> dict:
    """Slot counts of a rewrite run (``slot_counts``) with the backend, ``model`` and ``rewrites_per_caption``."""
    return {"backend": params.backend, "model": model, "rewrites_per_caption": params.rewrites_per_caption,
            **slot_counts(table, params.rewrites_per_caption)}


def slot_counts(table: pd.DataFrame, k: int) -> dict:
    """Slot counts of rewritten captions: every caption has ``k`` slots, each kept or dropped.

    ``table`` has ``rewrites`` and ``rewrite_dropped`` (one reason per dropped slot) per caption.
    ``failed_captions``: captions the backend could not answer (``backend:*``, worth a rerun);
    ``rejected_captions``: captions the server refused for themselves (``rejected:http_4xx``), which keep their
    original caption only."""
    dropped = Counter(reason for reasons in table["rewrite_dropped"] for reason in reasons)
    failed = failed_captions(table["rewrite_dropped"], k)
    rejected = failed_captions(table["rewrite_dropped"], k, "rejected:")
    counts = {
        "captions": int(len(table)), "slots": int(len(table) * k), "kept": int(table["rewrites"].map(len).sum()),
        "dropped": dict(sorted(dropped.items())),
        "captions_with_rewrites": int((table["rewrites"].map(len) > 0).sum()),
        "failed_captions": dict(sorted(failed.items())),
        "rejected_captions": dict(sorted(rejected.items())),
    }
    if counts["kept"] + sum(dropped.values()) != counts["slots"]:
        raise AssertionError(f"rewrite counts do not add up: {counts}")
    return counts
