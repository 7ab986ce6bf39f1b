"""The ``reshard:`` section of params.yaml."""
from __future__ import annotations

from pydantic import Field

from clipmill.components.common.params import Section


class ReshardParams(Section):
    samples_per_shard: int = Field(
        1000, ge=1,
        description="Samples per curated webdataset shard (the last one holds the rest).",
    )
    seed_offset: int = Field(0, ge=0, description="Added to project.seed for the shuffle across shards.")

# The sections of params.yaml this package owns (clipmill/params.py collects them): name -> (schema, what it is).
SECTIONS = {
    "reshard": (ReshardParams,
        'Curated training shards -> <data_dir>/curated (shards/, manifest.parquet, content_hash.json).'),
}
