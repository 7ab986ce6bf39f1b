"""The ablation's numbers: means over seeds, and paired class-bootstrap CIs of each arm's marginal effect and of the
whole funnel's."""
from __future__ import annotations

import numpy as np
import pandas as pd

from clipmill.components.common.evalsets import BUCKETS

from .arms import RAW, Arm

OVERALL = "zeroshot/mean_per_class_recall"


def means_table(runs: pd.DataFrame, arms: list[Arm], metrics: list[str]) -> pd.DataFrame:
    """One row per arm: samples, runs, then mean and standard deviation over seeds of each metric present."""
    rows = []
    for arm in arms:
        mine = runs[runs["arm"] == arm.name]
        row = {"arm": arm.name, "label": arm.label, "samples": int(mine["arm_samples"].iloc[0]),
               "samples_seen": int(mine["samples_seen"].iloc[0]), "runs": len(mine)}
        for metric in metrics:
            if metric in mine.columns:
                row[metric] = float(mine[metric].mean())
                row[f"{metric} sd"] = float(mine[metric].std(ddof=1)) if len(mine) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def _recall_matrix(per_class: pd.DataFrame, arm: str, classes: list[str]) -> np.ndarray:
    """Top-1 recall [seeds, classes] of ``arm``'s runs."""
    table = per_class[per_class["arm"] == arm].pivot(index="seed", columns="class_name", values="recall")
    return table[classes].to_numpy(dtype=float)


def bootstrap_delta(a: np.ndarray, b: np.ndarray, resamples: int, confidence: float,
                    rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean per-class recall of ``a`` minus ``b`` ([seeds, classes] each, the same classes): the point estimate
    and a percentile CI. Each replicate draws the classes with replacement (the same classes for both arms:
    paired) and each arm's seeds with replacement."""
    point = float(a.mean() - b.mean())
    n = a.shape[1]
    classes = rng.integers(0, n, size=(resamples, n))
    sa = a[rng.integers(0, len(a), size=(resamples, len(a)))].mean(axis=1)  # [B, C]: seeds resampled
    sb = b[rng.integers(0, len(b), size=(resamples, len(b)))].mean(axis=1)
    deltas = (np.take_along_axis(sa, classes, 1) - np.take_along_axis(sb, classes, 1)).mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(deltas, [tail, 1 - tail])
    return point, float(low), float(high)


def comparisons(arms: list[Arm]) -> list[tuple[str, str, str]]:
    """(arm, baseline, effect) pairs: each arm against its baseline (``marginal``), then, when raw is listed, the cut
    with the most steps against raw (``funnel``: what the whole curation bought, with a CI of its own; the marginal
    effects' CIs do not add up to one), unless that is a marginal effect already."""
    pairs = [(a.name, a.baseline, "marginal") for a in arms if a.baseline is not None]
    cuts = [a for a in arms if a.cut]
    if any(a.name == RAW for a in arms) and cuts:
        last = max(cuts, key=lambda a: len(a.steps)).name
        if (last, RAW, "marginal") not in pairs:
            pairs.append((last, RAW, "funnel"))
    return pairs


def effects_table(per_class: pd.DataFrame, arms: list[Arm], resamples: int, confidence: float,
                  seed: int) -> pd.DataFrame:
    """Each comparison of ``comparisons``: the change of mean per-class recall over all classes and within each
    head/mid/tail third (when the classes have crawl counts), with paired class-bootstrap CIs."""
    rng = np.random.default_rng(seed)
    classes = sorted(per_class["class_name"].unique())
    buckets = per_class.drop_duplicates("class_name").set_index("class_name")["bucket"] \
        if "bucket" in per_class.columns else None
    groups = {OVERALL: classes}
    if buckets is not None:
        groups.update({f"zeroshot/recall_{b}": [c for c in classes if buckets[c] == b] for b in BUCKETS})
    rows = []
    for name, baseline, effect in comparisons(arms):
        a, b = _recall_matrix(per_class, name, classes), _recall_matrix(per_class, baseline, classes)
        for metric, chosen in groups.items():
            if not chosen:
                continue
            cols = [classes.index(c) for c in chosen]
            delta, low, high = bootstrap_delta(a[:, cols], b[:, cols], resamples, confidence, rng)
            rows.append({"arm": name, "baseline": baseline, "effect": effect, "metric": metric,
                         "classes": len(cols), "delta": delta, "ci_low": low, "ci_high": high,
                         "excludes_zero": bool(low > 0 or high < 0)})
    return pd.DataFrame(rows, columns=["arm", "baseline", "effect", "metric", "classes", "delta", "ci_low",
                                       "ci_high", "excludes_zero"])
