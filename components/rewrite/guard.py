"""The faithfulness guard: a rewrite must keep every metadata entry its caption matched, and say something new.

Every candidate slot of a caption ends either kept or dropped with one reason, so
captions x rewrites_per_caption = kept + dropped.
"""
from __future__ import annotations

import re

from components.common.text import missing_entries

from .backends import Generated

EMPTY = "empty"
SAME_AS_CAPTION = "same_as_caption"
DUPLICATE = "duplicate"
LOST_ENTRY = "lost_entry"
NOT_GENERATED = "not_generated"


def _normalized(text: str) -> str:
    """The words of ``text``, lower-cased: rewrites that differ only in case or punctuation are the same."""
    return " ".join(re.findall(r"\w+", text.casefold()))


def guard_rewrites(caption: str, entries: list[str], generated: Generated, slots: int) -> tuple[list[str], list[str]]:
    """One caption's candidates in; (kept rewrites, one drop reason per dropped slot) out, ``slots`` in all.

    A failed caption (``generated.error``) drops every slot with that error as the reason; missing candidates
    drop as ``not_generated``; candidates past ``slots`` are ignored.
    """
    if generated.error:
        return [], [generated.error] * slots
    kept: list[str] = []
    dropped: list[str] = []
    seen = {_normalized(caption)}
    candidates = generated.candidates[:slots]
    for candidate in candidates:
        text = " ".join(candidate.split())
        key = _normalized(text)
        if not key:
            dropped.append(EMPTY)
        elif key == _normalized(caption):
            dropped.append(SAME_AS_CAPTION)
        elif key in seen:
            dropped.append(DUPLICATE)
        elif missing_entries(entries, text):
            dropped.append(LOST_ENTRY)
        else:
            kept.append(text)
        seen.add(key)
    dropped += [NOT_GENERATED] * (slots - len(candidates))
    return kept, dropped
