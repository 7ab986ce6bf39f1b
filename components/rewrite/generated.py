"""What every rewriting backend returns (the backends and the guard share these types; nothing here imports them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Generated:
    """The candidate rewrites of one caption, or why the backend produced none (``error``); ``dropped``: one
    reason per slot the backend already dropped itself (a refusal, a rewrite its own guard rejected)."""

    candidates: list[str] = field(default_factory=list)
    error: str | None = None
    dropped: list[str] = field(default_factory=list)


class Backend(Protocol):
    def generate(self, uids: list[str], captions: list[str], entries: list[list[str]]) -> list[Generated]:
        """One ``Generated`` per caption, in order, with up to ``rewrites_per_caption`` candidates each."""
