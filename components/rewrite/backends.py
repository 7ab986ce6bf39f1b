"""What every rewriting backend returns, and how the configured one is built."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .params import RewriteParams


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


def model_name(params: RewriteParams) -> str:
    """What the ``model`` column records: the served model name, the model directory, or ``rules``."""
    return {"rules": "rules", "openai": params.openai.model, "transformers": params.transformers.model_dir}[params.backend]


def make_backend(params: RewriteParams, seed: int) -> Backend:
    """The backend named by ``params.backend`` (its libraries are imported only when it is chosen)."""
    if params.backend == "openai":
        from .openai_backend import OpenAIBackend

        return OpenAIBackend(params, seed)
    if params.backend == "transformers":
        from .local_model import LocalModelBackend

        return LocalModelBackend(params, seed)
    from .rules import RulesBackend

    return RulesBackend(params, seed)
