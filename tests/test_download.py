"""The download stage: real img2dataset against a mirror of the demo crawl on 127.0.0.1, on a 200-URL demo crawl."""
from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from clipmill.components.common.errors import InputError
from clipmill.components.common.io import OUTPUT_MARKER
from clipmill.components.common.params import RayParams, TrackingParams
from clipmill.components.demo_corpus import DEMO_BASE_URL, load_ground_truth
from clipmill.components.demo_corpus.corpus import generate_demo_corpus
from clipmill.components.demo_corpus.params import DemoCorpusParams
from clipmill.components.download.params import DownloadParams
from clipmill.components.download.reasons import error_reason
from clipmill.components.download.safety import is_public_address, refusal_reasons
from clipmill.components.download.shards import canonicalize_shard, is_canonical, read_shard
from clipmill.components.download.stage import MANIFEST_COLUMNS, claim_output_dir, download
from clipmill.components.download.url_list import read_url_list
from clipmill.components.download.workers import finish_shard, forkserver_distributor, in_process_distributor

from .conftest import REPO

FAULTS = ["not_found", "transient_5xx", "slow", "truncated", "html_as_image", "redirect", "robots_noai"]
EXPECTED = {  # demo server behaviour -> (status, error_reason)
    "ok": ("success", None),
    "redirect": ("success", None),
    "transient_5xx": ("success", None),  # recovers on the retry
    "not_found": ("failed_to_download", "http_404"),
    "slow": ("failed_to_download", "timeout"),
    "truncated": ("failed_to_download", "truncated"),
    "robots_noai": ("failed_to_download", "robots_optout"),
    "html_as_image": ("failed_to_resize", "not_an_image"),
}
UNCLEAN_ROWS = [5, 50, 150]  # captions given invalid UTF-8 bytes
SLOW_SECONDS = 4.0
FAULT_SEED = int(os.environ.get("CLIPMILL_FAULT_SEED", "7"))
# The stage as `clipmill stage download` runs it, without importing every other stage's CLI.
RUN_STAGE = ("import sys; from clipmill.params import load_params; "
             "from clipmill.components.download.stage import download; "
             "p = load_params(sys.argv[1]); download(p.download, p.download.urls, sys.argv[2], tracking=p.tracking, "
             "ray_params=p.ray)")
PARAMS = {"timeout": 2, "retries": 1, "number_sample_per_shard": 70, "processes_count": 1, "thread_count": 8,
          "image_size": 32}


def _run(params: DownloadParams, out: Path, tracking: TrackingParams | None = None, **kwargs) -> dict:
    return download(params, params.urls, out, tracking=tracking or TrackingParams(enabled=False),
                    ray_params=RayParams(), **kwargs)


def _mirror(crawl: Path) -> list[dict]:
    """The demo crawl's URLs answered from its web/ directory, slow routes stalling SLOW_SECONDS."""
    return [{"prefix": DEMO_BASE_URL, "dir": str(crawl / "web"), "slow_seconds": SLOW_SECONDS}]


@pytest.fixture(scope="module")
def crawl(tmp_path_factory) -> Path:
    """A 200-pair demo crawl in which every fault occurs ten times; three captions are not valid UTF-8."""
    root = tmp_path_factory.mktemp("demo")
    params = DemoCorpusParams(num_pairs=200, behaviours=dict.fromkeys(FAULTS, 0.05), zeroshot_per_class=1,
                              retrieval_size=1, trusted_size=1, workers=1)
    generate_demo_corpus(params, 0, root / "crawl", root / "eval", root / "trusted")
    urls = root / "crawl" / "urls.parquet"
    table = pq.read_table(urls)
    captions = [c.encode() for c in table.column("caption").to_pylist()]
    for row in UNCLEAN_ROWS:
        captions[row] = b"caf\xe9 \xff" + captions[row]
    unclean = pa.array(captions, type=pa.binary()).view(pa.string())
    pq.write_table(table.set_column(table.schema.get_field_index("caption"), "caption", unclean), urls)
    return root / "crawl"


@pytest.fixture(scope="module")
def downloaded(crawl, tmp_path_factory):
    """One uninterrupted run of the stage, recorded in a temporary MLflow store."""
    root = tmp_path_factory.mktemp("download")
    params = DownloadParams(urls=str(crawl / "urls.parquet"), mirrors=_mirror(crawl), **PARAMS)
    with pytest.MonkeyPatch.context() as mp:
        uri = f"sqlite:///{root / 'mlflow.db'}"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        summary = _run(params, root / "out", TrackingParams(experiment="download-test"))
    return {"out": root / "out", "params": params, "summary": summary, "uri": uri,
            "manifest": pd.read_parquet(root / "out" / "manifest.parquet")}


def _tar_uids(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return [json.load(tar.extractfile(m))["uid"] for m in tar if m.name.endswith(".json")]


def test_every_shard_adds_up_and_each_success_is_in_exactly_one_shard(downloaded):
    shards = downloaded["out"] / "shards" / "crawl"
    manifest = downloaded["manifest"]
    assert sorted(p.name for p in shards.glob("*.tar")) == [f"0000{i}.tar" for i in range(3)]
    assert not (shards / "_tmp").exists()
    uids_in_tars = []
    for stats_file in sorted(shards.glob("*_stats.json")):
        stats = json.loads(stats_file.read_text())
        assert stats["count"] == stats["successes"] + stats["failed_to_download"] + stats["failed_to_resize"]
        rows = pq.read_table(stats_file.with_name(stats_file.name.replace("_stats.json", ".parquet"))).to_pandas()
        assert len(rows) == stats["count"]
        assert (rows["status"] == "success").sum() == stats["successes"]
        uids_in_tars += _tar_uids(stats_file.with_name(stats_file.name.replace("_stats.json", ".tar")))
    assert len(uids_in_tars) == len(set(uids_in_tars))
    assert set(uids_in_tars) == set(manifest.loc[manifest["status"] == "success", "uid"])
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert manifest["uid"].is_unique and len(manifest) == 200


def test_failure_reasons_match_the_injected_faults(downloaded, crawl):
    truth = load_ground_truth(crawl / "ground_truth.parquet")[["uid", "url", "behaviour"]]
    joined = downloaded["manifest"].merge(truth, on="uid", suffixes=("", "_truth"), validate="one_to_one")
    assert len(joined) == 200
    observed = zip(joined["behaviour"], joined["status"], joined["error_reason"], joined["error_message"])
    mismatches = [(b, s, r, m) for b, s, r, m in observed if (s, None if pd.isna(r) else r) != EXPECTED[b]]
    assert mismatches == []
    assert set(joined["behaviour"]) == set(EXPECTED)
    assert (joined["url"] == joined["url_truth"]).all()  # the demo server's address never reaches the manifest
    successes = joined[joined["status"] == "success"]
    assert (successes["width"] == 32).all() and (successes["height"] == 32).all()
    assert successes["sha256"].str.fullmatch("[0-9a-f]{64}").all()
    assert successes["shard"].notna().all() and joined.loc[joined["status"] != "success", "key"].isna().all()


def test_summary_counts_add_up_and_the_run_is_in_mlflow(downloaded, crawl):
    import mlflow

    summary, manifest = downloaded["summary"], downloaded["manifest"]
    truth = load_ground_truth(crawl / "ground_truth.parquet")
    expected_successes = int(truth["behaviour"].map(lambda b: EXPECTED[b][0] == "success").sum())
    counts, run = (json.loads((downloaded["out"] / name).read_text()) for name in ("summary.json", "run.json"))
    assert summary == {**counts, **{k: v for k, v in run.items() if k != "lists"}}
    assert not {"wall_seconds", "download_seconds", "images_per_s", "resumed_shards"} & counts.keys()
    assert [r["name"] for r in run["lists"]] == ["crawl"] and run["new_urls"] == 200
    assert sum(summary["by_status"].values()) == summary["urls"] == 200
    assert sum(summary["by_reason"].values()) == 200 - summary["by_status"]["success"]
    assert summary["by_status"]["success"] == expected_successes and summary["by_status"]["refused"] == 0
    assert summary["success_rate"] == pytest.approx(expected_successes / 200)
    assert summary["images_per_s"] > 0 and summary["captions_cleaned"] == len(UNCLEAN_ROWS)
    cleaned = manifest.iloc[UNCLEAN_ROWS]["caption"]
    assert cleaned.str.startswith("caf\ufffd \ufffd").all()

    client = mlflow.MlflowClient(downloaded["uri"])
    [run] = client.search_runs([client.get_experiment_by_name("download-test").experiment_id])
    assert run.data.tags["clipmill.stage"] == "download"
    assert run.data.metrics["success_rate"] == pytest.approx(expected_successes / 200)
    assert run.data.metrics["reason.http_404"] == 10
    assert run.data.params["image_size"] == "32"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["run.json", "summary.json"]


def test_killed_run_resumes_and_repairs_to_the_same_manifest(downloaded, crawl, tmp_path):
    out = tmp_path / "out"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({
        "tracking": {"enabled": False},
        "download": {"urls": str(crawl / "urls.parquet"), "mirrors": _mirror(crawl), **PARAMS}}))
    proc = subprocess.Popen([sys.executable, "-c", RUN_STAGE, str(params_file), str(out)], cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not list((out / "shards" / "crawl").glob("*_stats.json")):
            assert proc.poll() is None, "the stage ended before its first shard was finished"
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.05)
        # then a seeded random moment (CLIPMILL_FAULT_SEED) while the other shards are in flight
        time.sleep(random.Random(f"{FAULT_SEED}:download").uniform(0.0, 2.5))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.parquet").exists() and not (out / "summary.json").exists()
    finished = sorted((out / "shards" / "crawl").glob("*_stats.json"))
    assert 1 <= len(finished) < 3
    tar = finished[0].with_name(finished[0].name.replace("_stats.json", ".tar"))
    with open(tar, "r+b") as fh:  # a finished shard damaged afterwards: must be noticed and downloaded again
        fh.truncate(tar.stat().st_size // 2)

    summary = _run(downloaded["params"], out)
    assert summary["resumed_shards"] == len(finished) - 1 and summary["repaired_shards"] == 1
    pd.testing.assert_frame_equal(pd.read_parquet(out / "manifest.parquet"), downloaded["manifest"])
    assert sorted(p.name for p in (out / "shards" / "crawl").iterdir()) == sorted(
        p.name for p in (downloaded["out"] / "shards" / "crawl").iterdir())
    # canonical shards: a killed and resumed download gives the bytes of an uninterrupted one
    for shard in sorted((out / "shards" / "crawl").iterdir()):
        assert shard.read_bytes() == (downloaded["out"] / "shards" / "crawl" / shard.name).read_bytes(), shard.name
    # no leftover img2dataset input or temporary files (the output's own marker aside)
    assert [p.name for p in out.rglob(".*")] == [OUTPUT_MARKER]


def test_private_and_non_http_urls_are_refused_and_counted(tmp_path):
    urls = ["http://127.0.0.1:8080/a.jpg", "http://localhost/b.jpg", "http://169.254.169.254/latest/meta-data/",
            "http://10.1.2.3/c.jpg", "http://[::1]/d.jpg", "http://100.100.100.200/e.jpg", "file:///etc/passwd",
            "ftp://example.org/f.jpg", "not a url"]
    pd.DataFrame({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}).to_parquet(tmp_path / "urls.parquet")
    params = DownloadParams(urls=str(tmp_path / "urls.parquet"), **PARAMS)
    assert params.allow_private_hosts is False
    summary = _run(params, tmp_path / "out")
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert summary["by_status"] == {"success": 0, "failed_to_download": 0, "failed_to_resize": 0, "refused": 9}
    assert summary["by_reason"] == {"private_host": 6, "unsupported_scheme": 2, "invalid_url": 1}
    assert list(manifest["url"]) == urls and manifest["shard"].isna().all()
    assert not list((tmp_path / "out" / "shards").rglob("*.tar"))


def test_host_checks():
    assert refusal_reasons(["http://93.184.216.34/a.jpg", "https://8.8.8.8/b.png"], allow_private_hosts=False) \
        == [None, None]
    assert refusal_reasons(["http://127.0.0.1/a.jpg", "gopher://x/y"], allow_private_hosts=True) \
        == [None, "unsupported_scheme"]
    for address in ("127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "::1",
                    "fd00:ec2::254", "::ffff:127.0.0.1", "0.0.0.0", "224.0.0.1", "100.64.0.1"):
        assert not is_public_address(address), address
    assert is_public_address("93.184.216.34") and is_public_address("2606:4700::1111")


def _write(tmp_path: Path, df: pd.DataFrame) -> Path:
    path = tmp_path / "urls.parquet"
    df.to_parquet(path)
    return path


@pytest.mark.parametrize("case, field, reason", [
    ("missing_url", "url", "missing required column"),
    ("missing_caption", "caption", "missing required column"),
    ("not_parquet", None, "not a parquet file"),
    ("empty", None, "the URL list is empty"),
    ("duplicate_uid", "uid", "duplicate uid"),
    ("duplicate_pair", "uid", "computed from url + caption"),
    ("null_uid", "uid", "null uid"),
    ("reserved_column", "status", "reserved"),
    ("url_list_column", "url_list", "reserved for the list each URL comes from"),
    ("missing_file", None, "no such file"),
    ("uid_traversal", "uid", "not made of letters, digits"),
    ("uid_dot", "uid", "not made of letters, digits"),
    ("uid_empty", "uid", "not made of letters, digits"),
    ("uid_too_long", "uid", "1 to 128 characters"),
])
def test_bad_input_is_one_clear_error_and_nothing_is_written(tmp_path, case, field, reason):
    good = pd.DataFrame({"uid": ["a", "b"], "url": ["http://x.test/1.jpg", "http://x.test/2.jpg"],
                         "caption": ["c", "d"]})
    path = tmp_path / "urls.parquet"
    if case == "missing_url":
        _write(tmp_path, good.drop(columns="url"))
    elif case == "missing_caption":
        _write(tmp_path, good.drop(columns="caption"))
    elif case == "not_parquet":
        path.write_text("url,caption\nhttp://x.test/1.jpg,c\n")
    elif case == "empty":
        _write(tmp_path, good.iloc[:0])
    elif case == "duplicate_uid":
        _write(tmp_path, good.assign(uid=["a", "a"]))
    elif case == "duplicate_pair":
        _write(tmp_path, good.drop(columns="uid").iloc[[0, 0]])
    elif case == "null_uid":
        _write(tmp_path, good.assign(uid=["a", None]))
    elif case == "reserved_column":
        _write(tmp_path, good.assign(status=["x", "y"]))
    elif case == "url_list_column":
        _write(tmp_path, good.assign(url_list=["x", "y"]))
    elif case.startswith("uid_"):
        bad = {"uid_traversal": "../x", "uid_dot": "a.b", "uid_empty": "", "uid_too_long": "u" * 129}[case]
        _write(tmp_path, good.assign(uid=["a", bad]))
    with pytest.raises(InputError) as err:
        _run(DownloadParams(urls=str(path), **PARAMS), tmp_path / "out")
    assert err.value.field == field and reason in err.value.reason
    assert err.value.file == str(path)
    assert not (tmp_path / "out").exists()


def test_cli_prints_bad_input_as_one_line(tmp_path, capsys):
    from clipmill.cli import main

    _write(tmp_path, pd.DataFrame({"url": ["http://x.test/1.jpg"]}))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"tracking": {"enabled": False}}))
    rc = main(["stage", "download", "--params", str(params_file), "--urls", str(tmp_path / "urls.parquet"),
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"clipmill: error: {tmp_path / 'urls.parquet'}: field 'caption': missing required "
                               "column (columns: url)"]


def test_binary_and_invalid_captions_are_kept_cleaned_and_counted(tmp_path):
    table = pa.table({"url": ["http://x.test/1.jpg", "http://x.test/2.jpg", "http://x.test/3.jpg"],
                      "caption": pa.array([b"fine", b"bad \xff\xfe", None], type=pa.binary()),
                      "site": ["a", "b", "c"]})
    pq.write_table(table, tmp_path / "urls.parquet")
    url_list = read_url_list(tmp_path / "urls.parquet")
    assert list(url_list.table["caption"]) == ["fine", "bad \ufffd\ufffd", ""]
    assert (url_list.captions_cleaned, url_list.captions_missing) == (1, 1)
    assert url_list.passthrough == ["site"] and url_list.table["uid"].str.fullmatch("[0-9a-f]{32}").all()


def test_output_dir_of_a_different_run_is_refused(downloaded, tmp_path):
    out = downloaded["out"]
    with pytest.raises(InputError) as err:
        _run(downloaded["params"].model_copy(update={"image_size": 48}), out)
    assert err.value.file == str(out / "lists" / "crawl")
    assert "download.image_size: 32 -> 48" in err.value.reason and "--overwrite" in err.value.reason
    assert (out / "lists" / "crawl" / "manifest.parquet").exists()  # the refused run left the list as it was

    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"not part of a download output \(notes.txt\)"):
        _run(downloaded["params"], tmp_path / "mixed")
    assert (tmp_path / "mixed" / "notes.txt").read_text() == "mine"

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    run_info = {"list": "crawl", "urls": "u.parquet", "urls_sha256": "0" * 64, "earlier": [], "params": {}}
    with pytest.raises(InputError, match="no run.json"):
        claim_output_dir(stray, run_info, overwrite=False)
    assert claim_output_dir(stray, run_info, overwrite=True) is False
    assert sorted(p.name for p in stray.iterdir()) == ["run.json"]
    assert claim_output_dir(stray, run_info, overwrite=False) is True  # same fingerprint: resume


def test_damaged_list_records_are_redone_or_refused_never_a_traceback(downloaded, tmp_path):
    """A finished list whose summary or manifest was damaged afterwards is downloaded again from its finished
    shards (nothing fetched), to the same outputs; a damaged requests table (which URLs the shards hold) is refused
    with one error naming the list, and replaced only with --overwrite."""
    out = tmp_path / "out"
    shutil.copytree(downloaded["out"], out)
    lists = out / "lists" / "crawl"
    summary_bytes = (lists / "summary.json").read_bytes()
    for damage in ('{"urls": 5}', "[1, 2", '{"urls": -1}'):
        (lists / "summary.json").write_text(damage)
        summary = _run(downloaded["params"], out)
        assert summary["lists_fetched"] == 1 and summary["resumed_shards"] == downloaded["summary"]["shards"]
        assert summary["new_urls"] == 0 and (lists / "summary.json").read_bytes() == summary_bytes
        pd.testing.assert_frame_equal(pd.read_parquet(out / "manifest.parquet"), downloaded["manifest"])
    manifest = (lists / "manifest.parquet").read_bytes()
    (lists / "manifest.parquet").write_bytes(manifest[: len(manifest) // 2])
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("clipmill").addHandler(handler)
    try:
        assert _run(downloaded["params"], out)["lists_fetched"] == 1
    finally:
        logging.getLogger("clipmill").removeHandler(handler)
    assert len([w for w in warnings if "manifest.parquet" in w]) == 1  # said once, not once per check
    assert (lists / "manifest.parquet").read_bytes() == manifest
    assert _run(downloaded["params"], out)["lists_reused"] == 1  # whole again: reused

    (lists / "summary.json").unlink()  # an unfinished list whose requests table was damaged
    requests = (lists / "requests.parquet").read_bytes()
    (lists / "requests.parquet").write_bytes(requests[:100])
    with pytest.raises(InputError) as err:
        _run(downloaded["params"], out)
    assert err.value.file == str(lists) and "damaged requests.parquet" in err.value.reason
    assert "--overwrite" in err.value.reason and (out / "shards" / "crawl").is_dir()


def test_damaged_shards_are_detected(downloaded, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(downloaded["out"] / "shards" / "crawl", shards)
    assert len(read_shard(shards, 0)) == 70

    tar = shards / "00000.tar"
    with open(tar, "r+b") as fh:
        fh.truncate(tar.stat().st_size // 2)
    with pytest.raises(InputError, match="00000.tar"):
        read_shard(shards, 0)

    stats_file = shards / "00001_stats.json"
    stats = json.loads(stats_file.read_text())
    stats_file.write_text(json.dumps({**stats, "successes": stats["successes"] + 1}))
    with pytest.raises(InputError) as err:
        read_shard(shards, 1)
    assert err.value.field == "count"

    (shards / "00002_stats.json").unlink()
    with pytest.raises(InputError, match="not finished"):
        read_shard(shards, 2)


def test_canonicalizing_a_shard_returns_what_reading_it_back_gives(downloaded, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(downloaded["out"] / "shards" / "crawl", shards)
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    listed = dict(zip(downloaded["manifest"]["uid"], downloaded["manifest"]["url"]))
    rows = canonicalize_shard(shards, 1, listed)
    pd.testing.assert_frame_equal(rows, read_shard(shards, 1))
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before  # a canonical shard stays as it is


def _as_fetched(shards: Path, shard_id: int, fetched_prefix: str) -> None:
    """A canonical shard made to look as img2dataset leaves one: samples in another order with member times, the
    URLs fetched (a mirror's address), rows out of key order, the run's clock readings in the stats file."""
    tar, table, stats_file = (shards / f"{shard_id:05d}{suffix}" for suffix in (".tar", ".parquet", "_stats.json"))
    with tarfile.open(tar) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(tar, "w") as archive:
        for member, data in reversed(members):
            if member.name.endswith(".json"):
                meta = json.loads(data)
                data = json.dumps({**meta, "url": meta["url"].replace(DEMO_BASE_URL, fetched_prefix)}).encode()
            member.size, member.mtime = len(data), 1_700_000_000
            archive.addfile(member, io.BytesIO(data))
    rows = pq.read_table(table)
    at = rows.schema.get_field_index("url")
    urls = [url.replace(DEMO_BASE_URL, fetched_prefix) for url in rows["url"].to_pylist()]
    rows = rows.set_column(at, rows.schema.field(at), pa.array(urls, rows.schema.field(at).type))
    pq.write_table(rows.take(list(range(len(rows)))[::-1]), table)
    stats = json.loads(stats_file.read_text())
    stats_file.write_text(json.dumps({**stats, "start_time": 1.0, "end_time": 2.0, "duration": 1.0}))


def test_a_worker_makes_its_shard_canonical_as_the_stage_would_and_leaves_a_bad_one(downloaded, tmp_path):
    """``finish_shard`` (the download worker, right after a shard) gives the canonical shard's bytes, the listed
    URLs taken from the list's requests; a shard that fails its check is left for the stage to download again."""
    canonical = downloaded["out"] / "shards" / "crawl"
    shards = tmp_path / "shards"
    shutil.copytree(canonical, shards)
    requests = downloaded["out"] / "lists" / "crawl" / "requests.parquet"
    for shard_id in (0, 1):
        _as_fetched(shards, shard_id, "http://127.0.0.1:8123")
    assert (shards / "00001.tar").read_bytes() != (canonical / "00001.tar").read_bytes()
    with open(shards / "00000.tar", "r+b") as fh:
        fh.truncate((shards / "00000.tar").stat().st_size // 2)
    damaged = {p.name: p.read_bytes() for p in shards.glob("00000*")}
    finish_shard(shards, 0, str(requests))
    finish_shard(shards, 1, str(tmp_path / "unreadable" / "requests.parquet"))  # left for the stage
    assert not is_canonical(shards, 1)
    finish_shard(shards, 1, str(requests))
    assert {p.name: p.read_bytes() for p in shards.glob("00000*")} == damaged
    for name in ("00001.tar", "00001.parquet", "00001_stats.json"):
        assert (shards / name).read_bytes() == (canonical / name).read_bytes(), name
    assert sorted(p.name for p in shards.iterdir()) == sorted(p.name for p in canonical.iterdir())


def test_the_in_process_distributor_runs_every_shard_and_retries_the_failed_ones():
    calls = []

    def downloader(row):
        calls.append(row)
        return calls.count(row) > 1 or row != "b", row  # shard b fails once

    in_process_distributor(1, downloader, iter(["a", "b", "c"]), None, max_shard_retry=1)
    assert calls == ["a", "b", "c", "b"]


class _RecordingDownloader:
    """A picklable stand-in for img2dataset's downloader: records (shard, pid, parent pid) and fails shard b once."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __call__(self, row):
        import os

        attempt = len(list(self.folder.glob(f"{row}-*")))
        (self.folder / f"{row}-{attempt}").write_text(f"{os.getpid()} {os.getppid()} "
                                                      f"{os.environ.get('OPENCV_IO_MAX_IMAGE_PIXELS')}")
        return attempt > 0 or row != "b", row


def test_download_workers_fork_from_a_server_and_every_shard_runs_and_failed_ones_are_retried(tmp_path):
    """img2dataset's workers, replaced every five shards, are forked from one server process that imported
    img2dataset once, rather than each spawned and importing it again."""
    import os

    for limit, folder in (("1000", tmp_path / "first"), ("2000", tmp_path / "second")):
        folder.mkdir()
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = limit  # as run_img2dataset sets it from download.max_image_area
        try:
            forkserver_distributor(2, _RecordingDownloader(folder), iter(list("abcdefg")), None, max_shard_retry=1)
        finally:
            del os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"]
        runs = sorted(p.name for p in folder.iterdir())
        assert runs == ["a-0", "b-0", "b-1", "c-0", "d-0", "e-0", "f-0", "g-0"]
        records = [p.read_text().split() for p in folder.iterdir()]
        assert os.getpid() not in {int(parent) for _, parent, _ in records}  # a spawned worker's is this process
        # the server started with the first download's setting; each download's workers see their own
        assert {setting for *_, setting in records} == {limit}


class _TimedDownloader:
    """Records when (monotonic clock, shared by processes) and in which process each shard starts; takes 0.5 s."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __call__(self, row):
        import os
        import time

        (self.folder / row).write_text(f"{os.getpid()} {time.monotonic()}")
        time.sleep(0.5)
        return True, row


def test_the_first_workers_start_their_shards_apart_where_there_are_more_shards_than_workers(tmp_path):
    """With a stagger, the n-th of the pool's first workers takes its first shard n x stagger seconds after the
    first; with none (one wave of shards) they start as they come. The stage's stagger spreads a wave's starts over the
    longest a URL can take."""
    from clipmill.components.download.fetch import FetchPolicy
    from clipmill.components.download.stage import start_stagger

    policy = FetchPolicy(timeout=5)
    assert start_stagger(policy, retries=2, processes=16, pending=48) == pytest.approx(15 / 16)
    assert start_stagger(policy, retries=2, processes=16, pending=16) == 0.0  # one wave
    assert start_stagger(policy, retries=2, processes=1, pending=5) == 0.0
    for stagger in (0.4, 0.0):
        folder = tmp_path / str(stagger)
        folder.mkdir()
        # 12 shards of 0.5 s: the third worker, 0.8 s late, still finds 9 of them queued
        forkserver_distributor(3, _TimedDownloader(folder), iter(list("abcdefghijkl")), None, max_shard_retry=0,
                               stagger=stagger)
        first: dict[str, float] = {}
        for record in folder.iterdir():
            pid, at = record.read_text().split()
            first[pid] = min(first.get(pid, float("inf")), float(at))
        assert len(list(folder.iterdir())) == 12
        starts = sorted(first.values())
        gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
        if stagger:  # (a worker that finds no task queued yet starts later than it could: half is the bound)
            assert len(starts) == 3 and all(gap >= stagger / 2 for gap in gaps), gaps


def test_the_stage_starts_the_workers_server_early_with_img2dataset_imported():
    """In a fresh process (a process has one such server, its imports fixed by whoever started it first)."""
    import subprocess
    import sys

    from clipmill.components.download import stage, workers

    assert workers.WORKER_MODULES == [stage.WORKER_MODULE]
    code = ("import multiprocessing\n"
            "from clipmill.components.download.params import DownloadParams\n"
            "from clipmill.components.download.stage import start_worker_server\n"
            "start_worker_server(DownloadParams(processes_count=2))\n"
            "with multiprocessing.get_context('forkserver').Pool(1) as pool:\n"  # a worker forked from that server
            "    print(pool.apply(eval, (\"'img2dataset.main' in __import__('sys').modules\",)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("status, message, reason", [
    ("success", None, None),
    ("failed_to_download", "HTTP Error 404: Not Found", "http_404"),
    ("failed_to_download", "HTTP Error 503: Service Unavailable", "http_5xx"),
    ("failed_to_download", "HTTP Error 418: I'm a teapot", "http_4xx"),
    ("failed_to_download", "timed out", "timeout"),
    ("failed_to_download", "<urlopen error timed out>", "timeout"),
    ("failed_to_download", "IncompleteRead(354 bytes read, 355 more expected)", "truncated"),
    ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "robots_optout"),
    ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>", "dns"),
    ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "connection_refused"),
    ("failed_to_download", "HTTP Error 302: The HTTP server returned a redirect error that would lead to an "
                           "infinite loop.\nThe last 30x error message was:\nFound", "too_many_redirects"),
    ("failed_to_download", "something new", "download_error"),
    ("failed_to_resize", "Image decoding error", "not_an_image"),
    ("failed_to_resize", "image too small", "image_too_small"),
])
def test_error_messages_are_normalised(status, message, reason):
    assert error_reason(status, message) == reason


def test_an_80mb_caption_is_cut_at_ingestion_and_whitespace_collapsed(tmp_path):
    huge = "click to " + " " * 20000 + "#" + "x" * (80 * 2**20)
    table = pa.table({"url": ["http://x.test/1.jpg", "http://x.test/2.jpg", "http://x.test/3.jpg"],
                      "caption": ["  a\tred\n\ncircle  ", huge, "é" * 5000]})
    pq.write_table(table, tmp_path / "urls.parquet")
    url_list = read_url_list(tmp_path / "urls.parquet", max_caption_chars=4096)
    captions = list(url_list.table["caption"])
    assert captions[0] == "a red circle" and captions[1] == "click to" and captions[2] == "é" * 4096
    assert url_list.captions_truncated == 2 and url_list.captions_cleaned == 0


def test_the_same_url_with_two_captions_is_counted_in_the_summary(tmp_path):
    urls = ["http://10.0.0.1/a.jpg", "http://10.0.0.1/a.jpg", "http://10.0.0.1/b.jpg"]
    pd.DataFrame({"url": urls, "caption": ["a cat", "a dog", "a cat"]}).to_parquet(tmp_path / "urls.parquet")
    summary = _run(DownloadParams(urls=str(tmp_path / "urls.parquet"), **PARAMS), tmp_path / "out")
    assert summary["duplicate_urls"] == 1 and summary["urls"] == 3 and summary["captions_truncated"] == 0


def test_a_download_into_object_storage_publishes_each_list_once(crawl, downloaded, s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the local staging folder (.clipmill/staging) lives under the working directory
    params = DownloadParams(urls=str(crawl / "urls.parquet"), mirrors=_mirror(crawl), **PARAMS)
    summary = _run(params, "s3://crawl/download")
    assert summary["lists_fetched"] == 1 and summary["by_status"] == downloaded["summary"]["by_status"]
    manifest = pd.read_parquet("s3://crawl/download/manifest.parquet")
    expected = downloaded["manifest"]
    assert manifest["uid"].tolist() == expected["uid"].tolist()
    assert manifest["status"].tolist() == expected["status"].tolist()
    shards = {p.rsplit("/", 1)[-1] for p in s3.find("crawl/download/shards") if p.endswith(".tar")}
    assert shards == {Path(s).name for s in expected["shard"].dropna()}
    assert json.loads(s3.cat("crawl/download/summary.json"))["by_status"] == summary["by_status"]
    # The shards left the staging folder; a second run finds the list finished on the store and fetches nothing.
    assert not list((tmp_path / ".clipmill" / "staging").rglob("*.tar"))
    again = _run(params, "s3://crawl/download")
    assert again["lists_fetched"] == 0 and again["by_status"] == summary["by_status"]


def test_the_shard_archive_has_the_bytes_tarfile_writes():
    import io
    import tarfile

    from clipmill.components.download.shards import ustar_archive

    names = ["000000001.jpg", "a" * 99, "b" * 100, "c/" * 60 + "d.json", "é.txt", "x"]
    sizes = [0, 1, 511, 512, 513, 70000]
    members = [(name, bytes(range(256)) * (size // 256) + b"z" * (size % 256)) for name in names for size in sizes]
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            out.addfile(info, io.BytesIO(data))
    assert ustar_archive(members) == expected.getvalue()
    assert ustar_archive([]) == tarfile.NUL * tarfile.RECORDSIZE
    with tarfile.open(fileobj=io.BytesIO(ustar_archive(members))) as back:
        assert [(m.name, m.size) for m in back.getmembers()] == [(n, len(d)) for n, d in members]
