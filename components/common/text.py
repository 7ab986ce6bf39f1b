"""MetaCLIP substring matching of metadata entries in captions, shared by balancing and rewriting.

A caption is "spaced" first: the punctuation , . ; : ? ! ` is padded with spaces and tabs/newlines become
spaces; an entry then matches when " entry " occurs in " spaced caption " (case-sensitive).
"""
from __future__ import annotations

from collections.abc import Iterable

PADDED_PUNCTUATION = (",", ".", ";", ":", "?", "!", "`")
SPACED_CHARACTERS = ("\t", "\n", "\r")


def spaced_text(text: str) -> str:
    """``text`` with its punctuation padded, whitespace controls turned into spaces, and one space at each end."""
    out = f" {text} "
    for mark in PADDED_PUNCTUATION:
        out = out.replace(mark, f" {mark} ")
    for char in SPACED_CHARACTERS:
        out = out.replace(char, " ")
    return out


def missing_entries(entries: Iterable[str], text: str) -> list[str]:
    """The entries of ``entries`` that do not match ``text`` (in their given order)."""
    spaced = spaced_text(text)
    return [entry for entry in entries if f" {entry} " not in spaced]
