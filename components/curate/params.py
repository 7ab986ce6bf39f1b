"""The ``curate:`` section of params.yaml: which steps run, and where."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from clipmill.components.common.curation import STEP_NAMES
from clipmill.components.common.params import Section


class CurateParams(Section):
    steps: list[str] = Field(
        default_factory=lambda: list(STEP_NAMES),
        description="The curation steps to run, in the declared order (a subsequence of "
                    f"{', '.join(STEP_NAMES)}); leaving one out keeps every sample it would drop.",
    )
    executor: Literal["local", "ray"] = Field(
        "local", description="Where the per-shard work runs: a local process pool (local) or Ray tasks (ray; "
                             "see the ray section).")
    workers: int = Field(2, ge=0, description="Processes of the local pool; 0 runs every shard in this process.")

    @field_validator("steps")
    @classmethod
    def _declared_order(cls, steps: list[str]) -> list[str]:
        unknown = [s for s in steps if s not in STEP_NAMES]
        if unknown:
            raise ValueError(f"unknown step(s) {unknown} (declared: {', '.join(STEP_NAMES)})")
        if steps != [s for s in STEP_NAMES if s in steps] or len(set(steps)) != len(steps):
            raise ValueError(f"steps must follow the declared order once each: {', '.join(STEP_NAMES)}")
        return steps

# The sections of params.yaml this package owns (clipmill/params.py collects them): name -> (schema, what it is).
SECTIONS = {
    "curate": (CurateParams,
        'The curation steps, per download shard -> <data_dir>/curate (steps/<step>/<shard>.parquet, '
        'summary.json).'),
}
