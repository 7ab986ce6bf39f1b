"""A real curation directory of a tiny download (tests/curation_fixtures.py), written by the curate stage.

``make_curation`` runs the curate stage (every declared step, params.yaml shrunk to the fixture: tracking off,
one process, a 20 px image-side floor for the 64 px images, a small balancing t) with a tiny randomly
initialised scorer; ``make_curated`` adds the curated shards written by the reshard stage.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from clipmill.components.common.curation import read_step_table
from clipmill.components.common.model import create_clip, export_local_dir
from clipmill.components.curate.stage import curate
from clipmill.components.reshard.curated import reshard
from clipmill.components.reshard.params import ReshardParams
from clipmill.params import Params, load_params
from tests.curation_fixtures import make_download

REPO = Path(__file__).resolve().parents[1]
BALANCE_T = 5


def curation_params(steps: list[str] | None = None) -> Params:
    """params.yaml shrunk for the fixture download; ``steps``: the curation steps (default: all declared)."""
    params = load_params(REPO / "params.yaml")
    params.tracking.enabled = False
    params.curate.workers = 0
    params.filter.min_image_side = 20
    params.filter.near_duplicate_distance = None  # the fixture draws one picture per concept: all look alike
    params.score.top_fraction, params.score.null_recall = 0.7, None  # a threshold that drops at any size
    params.balance.t = BALANCE_T
    if steps is not None:
        params.curate.steps = list(steps)
    return params


def make_curation(root: Path, n: int = 160, per_shard: int = 50, seed: int = 0,
                  steps: list[str] | None = None) -> dict:
    """Download fixture, tiny scorer and curation directory under ``root``.

    Returns ``paths`` (manifest, download_summary, shards, scorer, curate), the manifest table, the params and
    ``tables``: each step's decisions, all shards concatenated."""
    download = make_download(root / "download", n=n, per_shard=per_shard, seed=seed)
    summary = root / "download" / "summary.json"
    summary.write_text(json.dumps({"urls": n, "urls_listed": n, "duplicates": 0}))
    torch.manual_seed(0)
    scorer = export_local_dir(create_clip("clipmill-tiny"), root / "scorer")
    params = curation_params(steps)
    curate_dir = root / "curate"
    curate(download["manifest"], download["shards"], curate_dir, params,
           inputs={"bootstrap_model": scorer, "manifest": download["manifest"]})
    paths = {"manifest": download["manifest"], "download_summary": summary, "shards": download["shards"],
             "scorer": scorer, "curate": curate_dir}
    tables = {step: read_step_table(curate_dir, step) for step in params.curate.steps}
    return {"paths": paths, "manifest": download["table"], "params": params, "steps": list(params.curate.steps),
            "tables": tables}


def run_reshard(curation: dict, out: Path, samples_per_shard: int, steps: list[str] | None = None,
                seed: int = 0, **paths) -> dict:
    """The reshard stage on ``curation`` (``paths`` replace its inputs: curate, shards)."""
    p = {**curation["paths"], **paths}
    return reshard(p["curate"], p["shards"], out, ReshardParams(samples_per_shard=samples_per_shard), seed,
                   curation["params"].tracking, steps if steps is not None else curation["steps"])


def make_curated(root: Path, n: int, per_shard: int, samples_per_shard: int) -> dict:
    """``make_curation`` plus ``root/curated`` from the reshard stage (``paths["curated"]``)."""
    curation = make_curation(root, n=n, per_shard=per_shard)
    curation["paths"]["curated"] = root / "curated"
    run_reshard(curation, root / "curated", samples_per_shard)
    return curation
