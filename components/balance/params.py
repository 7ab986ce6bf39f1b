"""The ``balance:`` section of params.yaml."""
from __future__ import annotations

from pydantic import Field

from clipmill.components.common.params import Section

DEFAULT_METADATA = "components/balance/metadata/default.txt"


class BalanceParams(Section):
    metadata: str = Field(
        DEFAULT_METADATA,
        description="Metadata entries: a text file (one entry per line) or a JSON list of strings such as MetaCLIP's "
                    "metadata.json.",
    )
    t: int = Field(
        20000, ge=1,
        description="MetaCLIP's t: entries matched by more texts are subsampled towards t texts (MetaCLIP-400M: "
                    "20,000).",
    )

# The sections of params.yaml this package owns (clipmill/params.py collects them): name -> (schema, what it is).
SECTIONS = {
    "balance": (BalanceParams, 'Step balance: MetaCLIP balancing of the score survivors (pool-wide entry counts).'),
}
