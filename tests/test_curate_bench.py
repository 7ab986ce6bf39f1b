"""The curation cost benchmark on a tiny crawl: the full step list, pixels and scorer included, runs end to end."""
from __future__ import annotations

import json
import tarfile

import pandas as pd

from benchmarks import curate_bench


def test_a_shard_with_images_has_img2dataset_s_table_beside_its_tar(tmp_path):
    from clipmill.components.demo_corpus.params import DemoCorpusParams

    rows = curate_bench.make_shard((3, 50, 0, True, tmp_path, DemoCorpusParams().model_dump()))
    shard = tmp_path / curate_bench.LIST_NAME
    table = pd.read_parquet(shard / "00003.parquet")
    with tarfile.open(shard / "00003.tar") as tar:
        keys = sorted({m.name.split(".")[0] for m in tar.getmembers()})
    assert list(table["uid"]) == list(rows["uid"])
    assert sorted(table.loc[table["status"] == "success", "key"]) == keys and len(keys) > 0


def test_the_full_step_list_runs_on_a_tiny_crawl(tmp_path):
    out = tmp_path / "curate.json"
    curate_bench.main(["--base", "300", "--scales", "1", "--image-scales", "1", "--shard-rows", "100",
                       "--repeats", "1", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    full = json.loads(out.read_text())["full"]
    assert full["steps"] == ["rules", "spam", "langid", "dedup", "neardup", "score", "balance", "rewrite"]
    run = full["runs"][0]
    assert run["samples"] > 0 and 0 < run["kept"] < run["samples"]
