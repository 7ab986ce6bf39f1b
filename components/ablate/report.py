"""The ablation's report: a markdown table of means, the marginal and funnel effects with their CIs, and one plot."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .stats import OVERALL  # noqa: E402


def _short(metric: str) -> str:
    return metric.replace("zeroshot/", "").replace("retrieval/", "").replace("_recall_at_", " R@") \
        .replace("image_to_text", "i→t").replace("text_to_image", "t→i")


def markdown(means: pd.DataFrame, effects: pd.DataFrame, metrics: list[str], facts: dict[str, str],
             confidence: float) -> str:
    shown = [m for m in metrics if m in means.columns]
    lines = ["# Curation ablation", ""] + [f"- {k}: {v}" for k, v in facts.items()] + [""]
    lines += ["| arm | samples | runs | " + " | ".join(_short(m) for m in shown) + " |",
              "|---|---:|---:|" + "---:|" * len(shown)]
    for row in means.to_dict(orient="records"):
        values = [f"{row[m]:.3f} ± {row[f'{m} sd']:.3f}" for m in shown]
        lines.append(f"| {row['label']} | {row['samples']} | {row['runs']} | " + " | ".join(values) + " |")
    pct = round(confidence * 100)
    lines += ["", f"Effects (arm minus its baseline; marginal: the steps an arm adds or removes, funnel: the cut with "
                  f"the most steps against raw; paired class bootstrap, {pct}% CI):", "",
              "| arm | baseline | effect | metric | classes | Δ | CI | excludes 0 |",
              "|---|---|---|---|---:|---:|---|---|"]
    for row in effects.itertuples(index=False):
        lines.append(f"| {row.arm} | {row.baseline} | {row.effect} | {_short(row.metric)} | {row.classes} | "
                     f"{row.delta:+.3f} | [{row.ci_low:+.3f}, {row.ci_high:+.3f}] | "
                     f"{'yes' if row.excludes_zero else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(means: pd.DataFrame, effects: pd.DataFrame, metrics: list[str], path: Path) -> Path:
    """Left: each metric's mean per arm (error bars: sd over seeds); right: each effect with its CI."""
    shown = [m for m in metrics if m in means.columns]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, max(3.5, 0.45 * len(means) + 1.5)))
    width = 0.8 / max(1, len(shown))
    y = np.arange(len(means))
    for i, metric in enumerate(shown):
        left.barh(y + i * width, means[metric], width, xerr=means[f"{metric} sd"], label=_short(metric))
    left.set_yticks(y + 0.4 - width / 2, means["label"])
    left.invert_yaxis()
    left.set_xlabel("mean over seeds")
    left.legend(fontsize=7, loc="lower right")
    left.set_title("Metrics per arm", fontsize=10)
    if len(effects):
        labels = [f"{r.arm} vs {r.baseline}: {_short(r.metric)}" for r in effects.itertuples(index=False)]
        ey = np.arange(len(effects))
        colors = ["#2ca02c" if (r.excludes_zero and r.delta > 0) else "#c44e52" if r.excludes_zero else "#777777"
                  for r in effects.itertuples(index=False)]
        for y_, row, color in zip(ey, effects.itertuples(index=False), colors):
            right.errorbar(row.delta, y_, xerr=[[row.delta - row.ci_low], [row.ci_high - row.delta]], fmt="o",
                           color=color, ecolor=color, capsize=3, markersize=4)
        right.set_yticks(ey, labels, fontsize=7)
        right.invert_yaxis()
        right.axvline(0, color="black", lw=0.8)
    right.set_xlabel(f"Δ {_short(OVERALL)} (and per third)")
    right.set_title("Effects with CIs (marginal; funnel: most steps vs raw)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path
