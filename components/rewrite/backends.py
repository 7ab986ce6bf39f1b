"""How the configured rewriting backend is built. The backends import only ``generated`` (their shared types),
so there is no import circle; each imports its heavy libraries (transformers) only when it is built."""
from __future__ import annotations

from .generated import Backend
from .local_model import LocalModelBackend
from .openai_backend import OpenAIBackend
from .params import RewriteParams
from .rules import RulesBackend

_BACKENDS = {"openai": OpenAIBackend, "transformers": LocalModelBackend, "rules": RulesBackend}


def model_name(params: RewriteParams) -> str:
    """What the ``model`` column records: the served model name, the model directory, or ``rules``."""
    names = {"rules": "rules", "openai": params.openai.model, "transformers": params.transformers.model_dir}
    return names[params.backend]


def make_backend(params: RewriteParams, seed: int) -> Backend:
    """The backend named by ``params.backend``."""
    return _BACKENDS[params.backend](params, seed)
