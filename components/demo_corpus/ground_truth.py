"""The ground truth of the synthetic crawl: what each URL really serves and which defects were injected.

No pipeline stage reads it; audits and tests use it to score the stages (``load_ground_truth``).
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from clipmill.components.common.errors import InputError

GROUND_TRUTH_COLUMNS: dict[str, str] = {
    "uid": "the pair's uid (as in urls.parquet)",
    "url": "the pair's URL (as in urls.parquet)",
    "caption": "the caption served with the URL (as in urls.parquet)",
    "behaviour": "what the demo server does for the URL (ok, not_found, transient_5xx, slow, truncated, "
                 "html_as_image, redirect, robots_noai)",
    "mismatched": "the caption belongs to another image that shares no concept with this one",
    "boilerplate_only": "the caption is only boilerplate or a file name",
    "exact_duplicate": "same image bytes as the pair duplicate_of, under another URL",
    "near_duplicate": "the scene of duplicate_of, re-encoded, shifted or rescaled (near_duplicate_kind)",
    "near_duplicate_kind": "reencode | shift | rescale, or null",
    "duplicate_of": "uid of the pair whose image this one duplicates, or null",
    "caption_noise": "web noise kinds in the caption (filename, boilerplate, seo_spam, foreign, html_entities, "
                     "very_long, empty)",
    "caption_of": "uid of the pair whose image the caption describes (itself, the donor of a mismatched caption, "
                  "or null for boilerplate-only and empty captions)",
    "caption_matches_image": "the caption describes this image (not mismatched, not boilerplate-only, not empty)",
    "concepts": "'color shape' of every object drawn in the image, in drawing order",
    "true_caption": "canonical description of the image (no colors for grayscale images)",
    "image_file": "the file under web/ holding the image",
    "image_sha256": "sha256 of the image file's bytes",
    "image_format": "jpeg | png | webp",
    "image_mode": "RGB | L | P | RGBA",
    "grayscale": "stored in mode L: colors are not visible, and honest captions name none",
    "palette": "stored in mode P",
    "has_alpha": "RGBA with a transparent background",
    "exif_orientation": "EXIF orientation tag (1: none; 3, 6, 8: pixels stored rotated, upright once honored)",
    "oversized": "far larger than the crawl's usual images",
    "width": "upright width in pixels",
    "height": "upright height in pixels",
    "background": "solid | gradient | texture | transparent",
    "page_url": "the page the image was found on",
    "crawl_date": "when the pair was crawled",
}


def load_ground_truth(path: str | os.PathLike) -> pd.DataFrame:
    """The ground truth table (one row per crawl pair), checked for its columns and unique uids."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no ground truth here; run `clipmill stage demo_corpus` first")
    try:
        table = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InputError(path, f"not a readable parquet file ({type(e).__name__}: {e})") from None
    missing = [c for c in GROUND_TRUTH_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(path, "column missing from the ground truth", field=missing[0])
    if table["uid"].duplicated().any():
        raise InputError(path, f"duplicate uid {table['uid'][table['uid'].duplicated()].iloc[0]!r}", field="uid")
    return table
