"""The ``ablate:`` section of params.yaml."""
from __future__ import annotations

from pydantic import Field

from clipmill.components.common.params import Section

DEFAULT_METRICS = ["zeroshot/acc1", "zeroshot/acc5", "zeroshot/recall_head", "zeroshot/recall_tail",
                   "retrieval/image_to_text_recall_at_5", "retrieval/text_to_image_recall_at_5"]


class AblateParams(Section):
    arms: list[str] | None = Field(
        None, description="The arms, in order: 'raw' (every download), a step name (the funnel cut after that "
                          "step of curate.steps) or '-<step>' (every step of curate.steps but that one, curated "
                          "again); null: raw, then one cut after each step of curate.steps.")
    seeds: int = Field(3, ge=1, description="Training runs per arm, seeded train.seed, train.seed+1, ... (train.seed "
                                            "null: project.seed).")
    samples_per_epoch: int = Field(4096, ge=1, description="train.samples_per_epoch of every run: with train.epochs, "
                                                           "every arm is trained on the same number of samples.")
    bootstrap: int = Field(2000, ge=100,
                           description="Class-bootstrap resamples of each effect's CI (marginal and funnel).")
    confidence: float = Field(0.95, gt=0, lt=1, description="Coverage of the bootstrap confidence intervals.")
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS),
                               description="Metrics in the table of means (keys of the evaluation's metrics); the "
                                           "suite's attribute accuracies (zeroshot/acc1_<attribute>) follow them.")
    out_dir: str = Field("reports/ablation", description="Table, effects with CIs, per-run results and the plot.")
    work_dir: str | None = Field(None, description="Each arm's curated shards and trained models; null: a temporary "
                                                   "directory, removed at the end.")

# The sections of params.yaml this package owns (clipmill/params.py collects them): name -> (schema, what it is).
SECTIONS = {
    "ablate": (AblateParams,
        '`clipmill ablate`: the funnel cut after each step, trained and evaluated side by side -> '
        'ablate.out_dir.'),
}
