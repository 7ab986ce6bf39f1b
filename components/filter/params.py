"""The ``filter:`` section of params.yaml."""
from __future__ import annotations

import re

from pydantic import Field, field_validator

from clipmill.components.common.params import Section

# Captions that are nothing but web boilerplate: a file name, a camera name, a UI string or a placeholder.
# Anchored at both ends, so an honest caption with boilerplate around it is kept. They are searched in the caption
# with its whitespace normalised (one space between words, none at the ends), and each runs in linear time: no
# quantifier inside a quantifier, no two adjacent quantifiers over the same characters.
DEFAULT_BOILERPLATE = [
    r"(?i)^[\w().-]+(?: \(\d+\))?\.(?:jpe?g|png|gif|webp|bmp|tiff?)$",
    r"(?i)^(?:img|dsc|dscn|dscf|pict?|p|photo|image|screenshot|file)[ _-]*\d+$",
    r"(?i)^(?:click(?: \w+)? (?:to|for) [\w ]+|(?:view|see) (?:more|larger image|full size)|(?:free )?download(?: now)?"
    r"|(?:hd )?wallpaper|thumbnail|untitled(?:-\d+)?|image|photo|picture|img|logo|banner|home|placeholder"
    r"|no (?:image|description)(?: available)?|image not found|stock photo|royalty free|all rights reserved"
    r"|high resolution|(?:picture|figure|image|photo) \d+|image via \w+) ?[.!]*$",
]

# Terms that web pages stuff into alt text for shops and search engines, not for describing the image.
DEFAULT_SPAM_WORDS = [
    "buy", "cheap", "best", "sale", "deals", "discount", "free", "download", "online", "shop", "top", "trending",
    "hd", "4k", "8k", "wallpaper", "wallpapers", "png", "jpg", "svg", "vector", "clipart", "printable",
    "aesthetic", "ideas", "2022", "2023", "2024", "2025",
]


class FilterParams(Section):
    min_words: int | None = Field(
        3, ge=1,
        description="Drop captions with fewer whitespace-separated words (DataComp: more than 2); null: off.",
    )
    min_chars: int | None = Field(
        6, ge=1,
        description="Drop captions shorter than this many characters after stripping (DataComp: more than 5); null: "
                    "off.",
    )
    min_image_side: int | None = Field(
        200, ge=1,
        description="Drop images whose original shorter side is below this many pixels (DataComp: 200); null: off.",
    )
    max_aspect_ratio: float | None = Field(
        3.0, ge=1.0,
        description="Drop images whose original longer/shorter side ratio exceeds this (DataComp: 3); null: off.",
    )
    max_caption_chars: int | None = Field(
        1000, ge=1,
        description="Step rules: drop captions longer than this many characters before any other rule reads them (page "
                    "text, or a caption crafted to be costly); null: off.",
    )
    boilerplate_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_BOILERPLATE),
        description="Python regexes searched in the whitespace-normalised caption; a match drops the sample as "
                    "boilerplate. Patterns that can backtrack super-linearly (a quantifier inside a quantifier, "
                    "adjacent quantifiers over the same characters) are refused. Empty list: off.",
    )
    max_caption_words: int | None = Field(
        60, ge=1,
        description="Step spam: drop captions of more words than this (page text, not a description) as "
                    "caption_too_long; null: off.",
    )
    spam_words: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SPAM_WORDS),
        description="Step spam: shop and search-engine terms; a caption holding max_spam_words of them is keyword "
                    "stuffing.",
    )
    max_spam_words: int | None = Field(
        4, ge=1,
        description="Step spam: drop captions with at least this many spam_words (counted with repeats) as "
                    "keyword_stuffing; null: off.",
    )
    dedup_images: bool = Field(
        True,
        description="Drop exact-duplicate images (same sha256) as duplicate_image, keeping the one with the smallest "
                    "uid.",
    )
    near_duplicate_distance: float | None = Field(
        None, ge=0, le=1,
        description="Step neardup: images whose blurred 8 x 8 RGB thumbnails differ by at most this RMS (pixel "
                    "values 0-1) and correlate at least near_duplicate_min_correlation are near-duplicates; each "
                    "cluster keeps its smallest uid, the others are dropped as near_duplicate_image (0.025 on the demo "
                    "crawl: precision 0.99, recall 0.95); null: off.",
    )
    near_duplicate_min_correlation: float = Field(
        0.95, ge=0, le=1,
        description="Step neardup: the least correlation of two near-duplicates' mean-centred thumbnails (the layout "
                    "matches, not only the colours: low-contrast pictures are close in RMS without being alike).",
    )
    languages: list[str] = Field(
        default_factory=lambda: ["en"],
        description="Step langid: ISO 639-1 codes of the caption languages kept (py3langid's codes); a caption with a "
                    "part confidently in another language is dropped as foreign_language:<code>. Empty list: off.",
    )
    language_min_odds: float = Field(
        300.0, gt=1,
        description="Step langid: a part of a caption counts as another language only when that language is at least "
                    "this many times as likely as the likeliest kept language, by py3langid's character model or by "
                    "the word model over wordfreq's lists (short or ambiguous text, whose odds are low, is kept).",
    )

    @field_validator("boilerplate_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"pattern {pattern!r} is not a valid regex: {e}") from None
            from .rules import regex_risk

            if (risk := regex_risk(pattern)) is not None:
                raise ValueError(f"pattern {pattern!r} can take time that grows faster than the caption's length "
                                 f"({risk}); rewrite it, e.g. with an atomic group (?>...) or a possessive "
                                 "quantifier (*+, ++)")
        return patterns

# The sections of params.yaml this package owns (clipmill/params.py collects them): name -> (schema, what it is).
SECTIONS = {
    "filter": (FilterParams,
        "Steps rules (DataComp 'basic'), spam, langid, dedup (exact-duplicate images) and neardup; null "
        "switches a rule off. Each drop is recorded with its reason (the key's name unless told)."),
}
