"""The ``evaluate:`` section of params.yaml."""
from __future__ import annotations

from pydantic import Field

from clipmill.components.common.params import Section


class EvaluateParams(Section):
    batch_size: int = Field(64, ge=1, description="Images or texts per forward pass.")
    device: str = Field("cpu", description="Torch device the model runs on (cpu, cuda, cuda:1).")
    example_queries: int = Field(6, ge=1, le=32, description="Text queries shown in the retrieval examples grid.")
    confusion_max_classes: int = Field(
        40, ge=2, description="Above this many classes the confusion matrix shows only the most confused ones."
    )
    concept_counts: str | None = Field(
        None, description="Where to count how often each zero-shot class occurs in the training crawl, for recall "
                          "by head/mid/tail third: the demo's ground_truth.parquet (concepts column), a URL list or "
                          "manifest (captions matched by class name), or a curation directory; null: no buckets.")
    extra_zeroshot: list[str] = Field(
        default_factory=list, description="CLIP_benchmark-style dataset directories (a folder of images per class, "
                                          "classnames.txt, templates), each scored as zeroshot_<folder name>/...")
    plots: bool = Field(True, description="Draw the PNG plots (false: metrics and tables only, the fast path).")

# The sections of params.yaml this package owns (clipmill/params.py collects them): name -> (schema, what it is).
SECTIONS = {
    "evaluate": (EvaluateParams,
        'Held-out suite -> <data_dir>/evaluate/metrics.json (+ plots in <reports_dir>/evaluation).'),
}
