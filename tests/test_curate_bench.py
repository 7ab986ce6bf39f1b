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


def test_each_step_reports_its_fastest_run_and_the_sizes_run_in_turn(monkeypatch, tmp_path):
    def run(stage_wall, rules, rewrite):
        return {"stage_wall_s": stage_wall, "steps": {"rules": {"input": 10, "task_s": rules},
                                                      "rewrite": {"input": 5, "task_s": rewrite}}}

    best = curate_bench.best_of([run(3.0, 0.5, 2.0), run(2.0, 0.7, 2.5), run(4.0, 0.9, 1.5)])
    assert best["stage_wall_s"] == 2.0 and best["stage_wall_s_of_runs"] == [3.0, 2.0, 4.0]
    assert best["steps"]["rules"]["task_s"] == 0.5 and best["steps"]["rewrite"]["task_s"] == 1.5

    order = []
    monkeypatch.setattr(curate_bench, "_size_runs", lambda args, kind, steps, scale, *rest:
                        lambda attempt: order.append((attempt, scale)) or run(scale + attempt, scale, scale))
    args = curate_bench._parse(["--runs", "2"])
    runs = curate_bench.measure_sizes(args, "no-pixels", [], [1, 4], 1, tmp_path, {1: None, 4: None}, tmp_path)
    assert order == [(0, 1), (0, 4), (1, 1), (1, 4)]
    assert [r["stage_wall_s_of_runs"] for r in runs] == [[1, 2], [4, 5]]
