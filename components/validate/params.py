"""The ``validation:`` section of params.yaml (thresholds of the validate stage), one subsection per boundary."""
from __future__ import annotations

from pydantic import Field, model_validator

from clipmill.components.common.params import Section


class DownloadBoundaryParams(Section):
    min_success_rate: float = Field(
        0.5, ge=0, le=1,
        description="Fewest URLs that must download, as a fraction of all.",
    )
    max_success_rate: float = Field(
        1.0, ge=0, le=1,
        description="Most URLs that may download (below 1 catches a crawl that should fail some).",
    )
    min_width: int = Field(16, ge=1, description="Smallest width of a downloaded image, px.")
    max_width: int = Field(4096, ge=1, description="Largest width of a downloaded image, px.")
    min_height: int = Field(16, ge=1, description="Smallest height of a downloaded image, px.")
    max_height: int = Field(4096, ge=1, description="Largest height of a downloaded image, px.")

    @model_validator(mode="after")
    def _ordered(self):
        for low, high in (("min_success_rate", "max_success_rate"), ("min_width", "max_width"),
                          ("min_height", "max_height")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} ({getattr(self, low)}) is larger than {high} ({getattr(self, high)})")
        return self


class ValidationParams(Section):
    download: DownloadBoundaryParams = Field(default_factory=DownloadBoundaryParams,
                                             description="Expectations on data/download/manifest.parquet.")

# The sections of params.yaml this package owns (clipmill/params.py collects them): name -> (schema, what it is).
SECTIONS = {
    "validation": (ValidationParams,
        'Thresholds of `clipmill stage validate <boundary>` (Great Expectations), one subsection per '
        'boundary.'),
}
