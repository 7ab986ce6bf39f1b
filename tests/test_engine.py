"""The batch engine: local semantics, and a local Ray (2 CPUs) giving the same outputs for every curation stage."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from components.balance.balancing import balance
from components.balance.params import BalanceParams
from components.common.engine import map_batches, ray_session
from components.common.errors import ConfigError
from components.common.model import create_clip, export_local_dir
from components.common.params import RayParams, TrackingParams
from components.filter.params import FilterParams
from components.filter.rules import filter_manifest
from components.score.params import ScoreParams
from components.score.scoring import score_survivors
from tests.curation_fixtures import make_download

NO_TRACKING = TrackingParams(enabled=False)
RAY = RayParams(num_cpus=2)


def add_offset(batch: pd.DataFrame, offset: int) -> pd.DataFrame:
    return pd.DataFrame({"uid": batch["uid"], "value": batch["x"] + offset, "rows_in_batch": len(batch)})


class CountingDoubler:
    instances = 0

    def __init__(self, factor: int):
        type(self).instances += 1
        self.factor = factor

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"uid": batch["uid"], "value": batch["x"] * self.factor})


@pytest.fixture
def table():
    return pd.DataFrame({"uid": [f"u{i:03d}" for i in range(250)], "x": np.arange(250)})


def test_local_function_in_batches_keeps_order(table):
    out = map_batches(table, add_offset, engine="local", batch_size=100, fn_kwargs={"offset": 5})
    assert out["uid"].tolist() == table["uid"].tolist()
    assert out["value"].tolist() == list(range(5, 255))
    assert out["rows_in_batch"].tolist() == [100] * 200 + [50] * 50


def test_local_class_is_built_once(table):
    CountingDoubler.instances = 0
    out = map_batches(table, CountingDoubler, engine="local", batch_size=30, fn_constructor_kwargs={"factor": 3})
    assert CountingDoubler.instances == 1
    assert out["value"].tolist() == [3 * i for i in range(250)]


def test_empty_table_still_has_the_output_columns(table):
    out = map_batches(table.iloc[0:0], add_offset, engine="local", fn_kwargs={"offset": 1})
    assert list(out.columns) == ["uid", "value", "rows_in_batch"] and out.empty


def test_bad_engine_batch_size_and_output_are_errors(table):
    with pytest.raises(ConfigError, match="unknown engine 'spark'"):
        map_batches(table, add_offset, engine="spark")
    with pytest.raises(ConfigError, match="batch_size"):
        map_batches(table, add_offset, engine="local", batch_size=0)
    with pytest.raises(TypeError, match="one row per input row"):
        map_batches(table, lambda b: b.head(1), engine="local", batch_size=10)


@pytest.fixture(scope="module")
def local_ray():
    with ray_session(RAY):
        yield


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    return make_download(tmp_path_factory.mktemp("download"), n=90, per_shard=40)


def test_curation_stages_on_ray_equal_local(local_ray, download, tmp_path):
    """filter (a function), score and balance (classes run as actors), once per engine: identical tables."""
    torch.manual_seed(0)
    scorer = export_local_dir(create_clip("clipmill-tiny"), tmp_path / "scorer")
    metadata = tmp_path / "metadata.txt"
    metadata.write_text("red\nblue\ncircle\nsquare\ntriangle\nred circle\nwhite background\n")
    tables = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        filter_manifest(download["manifest"], out, FilterParams(engine=engine, min_image_side=32, batch_size=16),
                        RAY, NO_TRACKING)
        score_survivors(download["manifest"], out / "rules.parquet", download["shards"], out,
                        ScoreParams(engine=engine, scorer=f"local-dir:{scorer}", top_fraction=0.6, batch_size=16,
                                    device="cpu"), RAY, NO_TRACKING)
        balance(download["manifest"], out / "scores.parquet", out,
                BalanceParams(engine=engine, metadata=str(metadata), t=5, batch_size=16), 0, RAY, NO_TRACKING)
        tables[engine] = {name: pd.read_parquet(out / f"{name}.parquet")
                          for name in ("rules", "scores", "balance", "entry_counts")}
    for name, local in tables["local"].items():
        on_ray = tables["ray"][name]
        if name == "scores":  # same model, same batches; float32 reductions may differ in the last bit
            np.testing.assert_allclose(local.pop("clip_score"), on_ray.pop("clip_score"), atol=1e-6)
        pd.testing.assert_frame_equal(local, on_ray, obj=name)
    assert tables["local"]["balance"]["keep"].any() and not tables["local"]["balance"]["keep"].all()
