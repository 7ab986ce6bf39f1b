"""MetaCLIP substring matching of texts against metadata entries, with an Aho-Corasick automaton.

A text is spaced exactly as MetaCLIP does it (``clipmill.components.common.text.spaced_text``: punctuation , . ; : ? ! `
padded with spaces, tabs and newlines turned into spaces) and an entry matches when " entry " occurs in the
spaced " text " (case-sensitive). The automaton finds every such occurrence in one pass over the text.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import ahocorasick
import pandas as pd

from clipmill.components.common.errors import InputError
from clipmill.components.common.io import read_text
from clipmill.components.common.text import spaced_text


def read_metadata(path: str | os.PathLike) -> list[str]:
    """Metadata entries from a JSON list of strings (MetaCLIP's metadata.json) or a text file, one per line.

    Blank lines are skipped and repeated entries kept once, in first-seen order.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such metadata file (balance.metadata)")
    text = read_text(path)
    if path.suffix == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(path, f"not valid JSON: {e}") from None
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise InputError(path, "expected a JSON list of strings")
    else:
        entries = text.splitlines()
    entries = list(dict.fromkeys(e for e in entries if e.strip()))
    if not entries:
        raise InputError(path, "no metadata entries")
    return entries


class EntryMatcher:
    """Batch function: (uid, caption) rows in, (uid, matched_entries) out, entries in metadata order."""

    def __init__(self, entries: list[str]):
        self.entries = list(entries)
        self.automaton = ahocorasick.Automaton()
        for index, entry in enumerate(self.entries):
            self.automaton.add_word(f" {entry} ", index)
        self.automaton.make_automaton()

    def match(self, text: str) -> list[int]:
        """Indices of the entries that occur in ``text``, each once, ascending."""
        return sorted({index for _, index in self.automaton.iter(spaced_text(text))})

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        entries = self.entries
        matched = [[entries[i] for i in self.match(text)] for text in batch["caption"].fillna("").astype(str)]
        return pd.DataFrame({"uid": batch["uid"].to_numpy(), "matched_entries": matched})
