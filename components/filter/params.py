"""The ``filter:`` section of params.yaml."""
from __future__ import annotations

import re

from pydantic import Field, field_validator

from components.common.params import Section

# Captions that are nothing but web boilerplate: a file name, a camera name, a UI string or a placeholder.
# Anchored at both ends, so an honest caption with boilerplate around it is kept.
DEFAULT_BOILERPLATE = [
    r"(?i)^\s*[\w().-]+( \(\d+\))?\.(jpe?g|png|gif|webp|bmp|tiff?)\s*$",
    r"(?i)^\s*(img|dsc|dscn|dscf|pict?|p|photo|image|screenshot|file)[\s_-]*\d+\s*$",
    r"(?i)^\s*(click( \w+)? (to|for) [\w ]+|(view|see) (more|larger image|full size)|(free )?download( now)?"
    r"|(hd )?wallpaper|thumbnail|untitled(-\d+)?|image|photo|picture|img|logo|banner|home|placeholder"
    r"|no (image|description)( available)?|image not found|stock photo|royalty free|all rights reserved"
    r"|high resolution|(picture|figure|image|photo) \d+|image via \w+)\s*[.!]*\s*$",
]

# Terms that web pages stuff into alt text for shops and search engines, not for describing the image.
DEFAULT_SPAM_WORDS = [
    "buy", "cheap", "best", "sale", "deals", "discount", "free", "download", "online", "shop", "top", "trending",
    "hd", "4k", "8k", "wallpaper", "wallpapers", "png", "jpg", "svg", "vector", "clipart", "printable",
    "aesthetic", "ideas", "2022", "2023", "2024", "2025",
]


class FilterParams(Section):
    min_words: int | None = Field(3, ge=1, description="Drop captions with fewer whitespace-separated words (DataComp: more than 2); null: off.")
    min_chars: int | None = Field(6, ge=1, description="Drop captions shorter than this many characters after stripping (DataComp: more than 5); null: off.")
    min_image_side: int | None = Field(200, ge=1, description="Drop images whose original shorter side is below this many pixels (DataComp: 200); null: off.")
    max_aspect_ratio: float | None = Field(3.0, ge=1.0, description="Drop images whose original longer/shorter side ratio exceeds this (DataComp: 3); null: off.")
    boilerplate_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_BOILERPLATE),
        description="Python regexes searched in the caption; a match drops the sample as boilerplate. Empty list: off.",
    )
    max_caption_words: int | None = Field(60, ge=1, description="Step spam: drop captions of more words than this (page text, not a description); null: off.")
    spam_words: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SPAM_WORDS),
        description="Step spam: shop and search-engine terms; a caption holding max_spam_words of them is keyword stuffing.",
    )
    max_spam_words: int | None = Field(4, ge=1, description="Step spam: drop captions with at least this many spam_words (counted with repeats); null: off.")
    dedup_images: bool = Field(True, description="Drop exact-duplicate images (same sha256), keeping the one with the smallest uid.")

    @field_validator("boilerplate_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"pattern {pattern!r} is not a valid regex: {e}") from None
        return patterns
