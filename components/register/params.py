"""The ``register:`` section of params.yaml: registry name and promotion policy."""
from __future__ import annotations

import warnings

from pydantic import Field

from clipmill.components.common.params import Section

# The section is named after its stage; on the Params schema that name shadows ABCMeta.register, which nothing uses.
warnings.filterwarnings("ignore", message='Field name "register" in "Params" shadows', category=UserWarning)


class ServingLimits(Section):
    """Per-request limits of the served model (written into its model config at registration)."""

    max_rows: int = Field(256, ge=1, description="Rows per request.")
    max_caption_chars: int = Field(1000, ge=1, description="Characters of one text.")
    max_image_bytes: int = Field(10_000_000, ge=1, description="Encoded bytes of one image.")
    max_image_pixels: int = Field(16_777_216, ge=1, description="Width x height of one image (read from its header).")


class RegisterParams(Section):
    model_name: str = Field("clipmill", min_length=1, description="Registered model name in the MLflow registry.")
    promote: bool = Field(True, description="Apply the promotion policy after registering (false: only `challenger`).")
    primary_metric: str = Field(
        "zeroshot/acc1",
        description="Metric (a key of metrics.json) a challenger must improve.",
    )
    min_improvement: float = Field(
        0.005, ge=0, description="Absolute gain in the primary metric needed to replace the champion."
    )
    min_primary: float = Field(
        0.0, ge=0, description="Minimum bar: a model whose primary metric is below this never becomes champion."
    )
    guardrails: list[str] = Field(
        ["zeroshot/mean_per_class_recall", "retrieval/image_to_text_recall_at_5",
         "retrieval/text_to_image_recall_at_5"],
        description="Metrics (higher is better) that may not regress by more than guardrail_tolerance.",
    )
    guardrail_tolerance: float = Field(0.01, ge=0, description="Largest allowed absolute drop of a guardrail metric.")
    serving: ServingLimits = Field(default_factory=ServingLimits,
                                   description="Request limits of the served model; a version keeps those it was "
                                               "first registered with.")

# The sections of params.yaml this package owns (clipmill/params.py collects them): name -> (schema, what it is).
SECTIONS = {
    "register": (RegisterParams,
        'MLflow registry and promotion policy -> <data_dir>/register/registration.json, '
        '<reports_dir>/promotion.md.'),
}
