"""MetaCLIP balancing: per-entry keep probabilities from the pool's counts, and the seeded draw per text.

An entry e matched by count_e texts gets p_e = t / max(count_e, t); a text matching entries E is kept with
probability 1 - prod_{e in E}(1 - p_e); texts that match no entry are dropped. The draw for a text is a
uniform number derived from (seed, uid), so the outcome does not depend on batching, order or engine.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

NO_MATCH_REASON = "no_metadata_match"
SUBSAMPLED_REASON = "balance_subsampled"


def uid_uniform(uids: pd.Series, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per uid, fixed by (seed, uid)."""
    return np.array([int.from_bytes(hashlib.blake2b(f"balance:{seed}:{uid}".encode(), digest_size=8).digest(), "big")
                     for uid in uids], dtype=np.float64) / 2.0**64


def keep_probabilities(matched_entries: pd.Series, t: int,
                       counts: pd.Series | None = None) -> tuple[np.ndarray, pd.Series]:
    """Per text, 1 - prod(1 - p_e) over its matched entries (0 for none); and count_e per matched entry.

    ``counts``: count_e over the whole pool (default: over ``matched_entries``)."""
    matched_entries = matched_entries.reset_index(drop=True)
    exploded = matched_entries.explode().dropna()
    if counts is None:
        counts = exploded.value_counts()
    p_entry = t / np.maximum(counts.astype(np.float64), t)
    with np.errstate(divide="ignore"):
        log_miss = pd.Series(np.log1p(-exploded.map(p_entry).to_numpy(np.float64)), index=exploded.index)
    miss = np.exp(log_miss.groupby(level=0).sum())
    probability = np.zeros(len(matched_entries))
    probability[miss.index.to_numpy()] = 1.0 - miss.to_numpy()
    return probability, counts


def tail_share(counts: pd.Series, is_tail: pd.Series) -> float:
    """Fraction of the (text, entry) matches that fall in tail entries."""
    total = counts.sum()
    return float(counts[is_tail].sum() / total) if total else 0.0
