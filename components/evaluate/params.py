"""The ``evaluate:`` section of params.yaml."""
from __future__ import annotations

from pydantic import Field

from components.common.params import Section


class EvaluateParams(Section):
    batch_size: int = Field(64, ge=1, description="Images or texts per forward pass.")
    device: str = Field("cpu", description="Torch device the model runs on (cpu, cuda, cuda:1).")
    example_queries: int = Field(6, ge=1, le=32, description="Text queries shown in the retrieval examples grid.")
    confusion_max_classes: int = Field(
        40, ge=2, description="Above this many classes the confusion matrix shows only the most confused ones."
    )
