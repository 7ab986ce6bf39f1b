"""The incremental benchmark's set-up: its runs' params with ``-S`` overrides, and a crawl generated once per
workdir (the runs' outputs made anew each time)."""
from __future__ import annotations

import pytest
import yaml

from benchmarks import __main__ as bench_main
from benchmarks import incremental_bench
from clipmill.components.common.errors import ConfigError


def test_the_benchmark_is_one_of_make_bench():
    assert bench_main.BENCHES["incremental"] is incremental_bench


def test_a_workdir_s_crawl_is_used_again_and_its_runs_made_anew(tmp_path):
    params, reused = incremental_bench._prepare(tmp_path, 40, 10, ["download.processes_count=3"])
    assert not reused
    assert yaml.safe_load(params.read_text())["download"]["processes_count"] == 3
    crawl = sorted(p.relative_to(tmp_path) for p in (tmp_path / "crawl").rglob("*"))
    (tmp_path / "download").mkdir()
    (tmp_path / "curate" / "steps").mkdir(parents=True)
    (tmp_path / "additions" / "earlier-list").mkdir()
    mtime = (tmp_path / "crawl" / "urls.parquet").stat().st_mtime_ns

    params, reused = incremental_bench._prepare(tmp_path, 40, 10, [])
    assert reused and (tmp_path / "crawl" / "urls.parquet").stat().st_mtime_ns == mtime
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "crawl").rglob("*")) == crawl
    assert not (tmp_path / "download").exists() and not (tmp_path / "curate").exists()
    assert list((tmp_path / "additions").iterdir()) == []
    assert "processes_count" not in yaml.safe_load(params.read_text())["download"]

    _, reused = incremental_bench._prepare(tmp_path, 41, 10, [])  # another crawl size: generated again
    assert not reused


def test_a_bad_override_stops_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="processes_count"):
        incremental_bench._prepare(tmp_path, 40, 10, ["download.processes_count=0"])
    assert not (tmp_path / "params.yaml").exists() and not (tmp_path / "crawl").exists()


def test_run_2s_steps_are_set_against_their_share_of_the_from_scratch_run():
    lines = incremental_bench._excess_table({"neardup": 6.0, "score": 10.0}, {"neardup": 10.0, "score": 40.0}, 0.2)
    assert [line.split() for line in lines[1:]] == [["neardup", "6.00", "share", "2.00", "excess", "+4.00"],
                                                    ["score", "10.00", "share", "8.00", "excess", "+2.00"]]
