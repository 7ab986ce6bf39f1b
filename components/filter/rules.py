"""DataComp's basic rules and web boilerplate, as a batch function: manifest rows in, the first failed rule out."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from .params import FilterParams

RULE_REASONS = ("min_words", "min_chars", "boilerplate", "min_image_side", "max_aspect_ratio")


def rule_reasons(batch: pd.DataFrame, params: FilterParams) -> np.ndarray:
    """Rows with caption, original_width and original_height in; per row the first failed rule, or None.

    Order of checks: caption words, caption characters, boilerplate, image side, aspect ratio.
    """
    caption = batch["caption"].fillna("").astype(str)
    width = batch["original_width"].astype("float64").to_numpy()
    height = batch["original_height"].astype("float64").to_numpy()
    checks: list[tuple[np.ndarray, str]] = []
    if params.min_words is not None:
        checks.append(((caption.str.split().str.len() < params.min_words).to_numpy(), "min_words"))
    if params.min_chars is not None:
        checks.append(((caption.str.strip().str.len() < params.min_chars).to_numpy(), "min_chars"))
    if params.boilerplate_patterns:
        patterns = [re.compile(p) for p in params.boilerplate_patterns]
        boilerplate = np.array([any(p.search(text) for p in patterns) for text in caption], dtype=bool)
        checks.append((boilerplate, "boilerplate"))
    if params.min_image_side is not None:
        checks.append((np.minimum(width, height) < params.min_image_side, "min_image_side"))
    if params.max_aspect_ratio is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.maximum(width, height) / np.minimum(width, height)
        checks.append((ratio > params.max_aspect_ratio, "max_aspect_ratio"))
    reason = np.full(len(batch), None, dtype=object)
    for failed, value in checks:
        reason[failed & pd.isna(reason)] = value
    return reason
