"""The ``report:`` section of params.yaml."""
from __future__ import annotations

from pydantic import Field

from clipmill.components.common.params import Section


class ReportParams(Section):
    examples_per_group: int = Field(
        12, ge=0,
        description="Thumbnails of kept samples, and of dropped samples, in the example grid.",
    )
    rewrite_examples: int = Field(10, ge=0, description="Captions shown with their rewrites.")
    thumbnail_px: int = Field(128, ge=16, description="Longer side of the example thumbnails, in pixels.")
    histogram_bins: int = Field(50, ge=5, description="Bins of the CLIP-score histogram.")
    seed_offset: int = Field(0, ge=0, description="Added to project.seed for picking the examples.")

# The sections of params.yaml this package owns (clipmill/params.py collects them): name -> (schema, what it is).
SECTIONS = {
    "report": (ReportParams,
        'Curation report -> <reports_dir>/curation/index.html (+ PNG plots), also logged to MLflow.'),
}
