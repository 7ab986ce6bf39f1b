"""The report's figures (matplotlib, Agg backend): funnel, CLIP-score histogram, entry rank-frequency."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .funnel import StageCounts

KEPT_COLOR, DROPPED_COLOR, LINE_COLOR = "#3b78b0", "#d9822b", "#444444"


def funnel_figure(stages: list[StageCounts]) -> Figure:
    """Horizontal bars: samples left after each stage, with what the stage dropped stacked after them."""
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(stages) + 1.2))
    names = [s.stage for s in stages][::-1]
    kept = np.array([s.kept for s in stages][::-1])
    dropped = np.array([s.input - s.kept for s in stages][::-1])
    ax.barh(names, kept, color=KEPT_COLOR, label="kept")
    ax.barh(names, dropped, left=kept, color=DROPPED_COLOR, label="dropped here")
    total = max(stages[0].input, 1)
    for y, (k, d) in enumerate(zip(kept, dropped)):
        note = f"{k:,} ({100 * k / total:.1f}%)" + (f"  −{d:,}" if d else "")
        ax.text(k + d + total * 0.01, y, note, va="center", fontsize=9)
    ax.set_xlim(0, total * 1.35)
    ax.set_xlabel("samples")
    ax.set_title("Curation funnel: samples kept after each stage")
    ax.legend(loc="lower right", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def score_histogram_figure(scores: pd.DataFrame, threshold: float | None, bins: int) -> Figure:
    """CLIP-score histogram of the scored samples (clip_score, keep), kept and dropped stacked, with the
    threshold (when there is one) as a line."""
    fig, ax = plt.subplots(figsize=(8, 4))
    values = scores["clip_score"].astype(float)
    keep = scores["keep"].astype(bool)
    edges = np.histogram_bin_edges(values, bins=bins) if len(values) else np.linspace(-1, 1, bins + 1)
    ax.hist([values[keep], values[~keep]], bins=edges, stacked=True, color=[KEPT_COLOR, DROPPED_COLOR],
            label=[f"kept ({int(keep.sum()):,})", f"dropped ({int((~keep).sum()):,})"])
    if threshold is not None:
        ax.axvline(float(threshold), color=LINE_COLOR, linestyle="--", label=f"threshold {float(threshold):.3f}")
    ax.set(xlabel="CLIP score (cosine similarity of image and caption)", ylabel="samples",
           title="CLIP-score filter")
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def rank_frequency_figure(entry_counts: pd.DataFrame, t: int | None) -> Figure:
    """Log-log texts per metadata entry against the entry's rank, before and after balancing, with t marked."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for column, label, color in (("count_before", "before balancing", DROPPED_COLOR),
                                 ("count_after", "after balancing", KEPT_COLOR)):
        values = np.sort(entry_counts[column].to_numpy())[::-1]
        values = values[values > 0]
        ax.plot(np.arange(1, len(values) + 1), values, label=f"{label} ({len(values):,} entries)", color=color,
                marker="." if len(values) < 200 else None)
    if t is not None:
        ax.axhline(t, color=LINE_COLOR, linestyle="--", label=f"t = {t:,}")
    ax.set(xscale="log", yscale="log", xlabel="entry rank", ylabel="texts matching the entry",
           title="Metadata entries: rank-frequency before and after balancing")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)
