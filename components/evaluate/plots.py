"""Evaluation plots: per-class zero-shot accuracy, confusion matrix, and a retrieval examples grid (PNG files)."""
from __future__ import annotations

import io
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from clipmill.components.common.io import atomic_path  # noqa: E402


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def per_class_accuracy(classes: list[str], recall: np.ndarray, support: np.ndarray, title: str, path: Path) -> Path:
    """Horizontal bars of top-1 recall per class, worst first, with each class's sample count."""
    order = np.argsort(recall, kind="stable")
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(classes) + 1)))
    ax.barh(range(len(order)), recall[order], color="#4c72b0")
    ax.set_yticks(range(len(order)), [f"{classes[i]} (n={support[i]})" for i in order], fontsize=8)
    ax.set_xlim(0, 1)
    ax.axvline(float(np.nanmean(recall)), color="#c44e52", ls="--", lw=1, label="mean per-class recall")
    ax.set_xlabel("top-1 recall")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def confusion_matrix(classes: list[str], labels: np.ndarray, predictions: np.ndarray, max_classes: int,
                     title: str, path: Path) -> Path:
    """Row-normalised confusion matrix; with more than ``max_classes`` classes, the most confused ones only."""
    n = len(classes)
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    shown = np.arange(n)
    if n > max_classes:
        errors = counts.sum(axis=1) - np.diag(counts) + counts.sum(axis=0) - np.diag(counts)
        shown = np.sort(np.argsort(-errors, kind="stable")[:max_classes])
        title += f" ({max_classes} most confused of {n} classes)"
    sub = counts[np.ix_(shown, shown)].astype(float)
    rows = counts[shown].sum(axis=1, keepdims=True)
    rates = np.divide(sub, rows, out=np.zeros_like(sub), where=rows > 0)
    size = max(4.0, 0.3 * len(shown) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    names = [classes[i] for i in shown]
    ax.set_xticks(range(len(shown)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(shown)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    return _save(fig, path)


def retrieval_examples(queries: list[str], ranked: np.ndarray, correct: np.ndarray, images: list[bytes],
                       title: str, path: Path) -> Path:
    """One row per text query: its top-k images, the correct image framed in green, others in grey."""
    rows, k = ranked.shape
    fig, axes = plt.subplots(rows, k, figsize=(1.6 * k, 1.9 * rows), squeeze=False)
    for r in range(rows):
        for c in range(k):
            ax = axes[r][c]
            with Image.open(io.BytesIO(images[ranked[r, c]])) as im:
                ax.imshow(im.convert("RGB"))
            hit = ranked[r, c] == correct[r]
            for spine in ax.spines.values():
                spine.set_edgecolor("#2ca02c" if hit else "#bbbbbb")
                spine.set_linewidth(4 if hit else 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel("\n".join(textwrap.wrap(queries[r], 22)[:3]), fontsize=7, rotation=0,
                              ha="right", va="center")
            if r == 0:
                ax.set_title(f"#{c + 1}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
