"""URL lists appended to the crawl: checked on append, downloaded after the base list, counted per list."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipmill.components.common.errors import InputError
from clipmill.components.common.params import RayParams, TrackingParams
from clipmill.components.demo_corpus import DEMO_BASE_URL
from clipmill.components.demo_corpus.corpus import generate_crawl_batch, generate_demo_corpus
from clipmill.components.demo_corpus.params import DemoCorpusParams
from clipmill.components.download.additions import append_url_list, list_additions, read_crawl
from clipmill.components.download.params import DownloadParams

SMALL = dict(num_pairs=80, zeroshot_per_class=1, retrieval_size=1, trusted_size=1, workers=1)


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    """An 80-pair demo crawl and its batch 1 (40 new pairs with their own web/ directory)."""
    root = tmp_path_factory.mktemp("crawl")
    params = DemoCorpusParams(**SMALL)
    generate_demo_corpus(params, 0, root / "crawl", root / "eval", root / "trusted")
    summary = generate_crawl_batch(params, 0, 1, 40, root / "batch1")
    assert summary["num_pairs"] == 40 and summary["batch"] == 1
    return root


def test_a_batch_is_new_urls_on_the_same_web(crawl):
    base, batch = (pd.read_parquet(crawl / d / "urls.parquet") for d in ("crawl", "batch1"))
    assert list(batch.columns) == list(base.columns)
    assert not set(batch["url"]) & set(base["url"]) and not set(batch["uid"]) & set(base["uid"])
    assert (crawl / "batch1" / "web" / "routes.json").is_file()


def test_appended_lists_download_after_the_base_list_with_counts_that_add_up(crawl, tmp_path):
    additions = tmp_path / "additions"
    first = append_url_list(crawl / "batch1" / "urls.parquet", additions,
                            now=dt.datetime(2026, 11, 2, 3, 0, tzinfo=dt.UTC))
    assert first.id.startswith("20261102T030000Z-") and first.web is not None
    with pytest.raises(InputError, match="appended to the crawl before"):
        append_url_list(crawl / "batch1" / "urls.parquet", additions)
    # a later list repeating 5 crawl URLs and bringing 3 new ones (no web/ beside it: not served)
    base = pd.read_parquet(crawl / "crawl" / "urls.parquet")
    repeat = pd.concat([base.head(5), base.head(3).assign(uid=lambda d: "new" + d["uid"].str[3:],
                                                          url=lambda d: d["url"] + ".v2")])
    (tmp_path / "repeat").mkdir()
    repeat.to_parquet(tmp_path / "repeat" / "urls.parquet", index=False)
    second = append_url_list(tmp_path / "repeat" / "urls.parquet", additions,
                             now=dt.datetime(2026, 11, 9, 3, 0, tzinfo=dt.UTC))
    assert [a.id for a in list_additions(additions)] == [first.id, second.id] and second.web is None

    c = read_crawl(crawl / "crawl" / "urls.parquet", additions)
    assert [e["name"] for e in c.lists] == ["crawl", first.id, second.id]
    assert [e["duplicates"] for e in c.lists] == [0, 0, 5]
    tables = [c.table(e["name"]) for e in c.lists]
    assert [len(t) for t in tables] == [80, 40, 3] and pd.concat(tables)["uid"].is_unique
    assert c.passthrough[-1] == "url_list" and all(list(t.columns) == list(tables[0].columns) for t in tables)
    assert list(c.web_dirs) == [first.id]  # the batch's web/ (the list without one brings none)

    from clipmill.components.download.stage import download

    mirror = {"prefix": DEMO_BASE_URL, "dir": str(crawl / "crawl" / "web"), "slow_seconds": 3.0}
    params = DownloadParams(urls=str(crawl / "crawl" / "urls.parquet"), timeout=2, retries=1, mirrors=[mirror],
                            number_sample_per_shard=50, processes_count=1, thread_count=8, image_size=32)
    run = dict(tracking=TrackingParams(enabled=False), ray_params=RayParams())
    base_only = download(params, params.urls, tmp_path / "out", **run)
    assert (base_only["lists_fetched"], base_only["lists_reused"]) == (1, 0)
    base_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "shards" / "crawl").iterdir()}
    base_manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")

    summary = download(params, params.urls, tmp_path / "out", additions=additions, **run)
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    # the base list is not fetched again: its shards are untouched and its rows are the same
    assert (summary["lists_fetched"], summary["lists_reused"]) == (2, 1)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "shards" / "crawl").iterdir()} == base_files
    pd.testing.assert_frame_equal(manifest[manifest["url_list"] == "crawl"].reset_index(drop=True), base_manifest)
    assert manifest.loc[manifest["status"] == "success", "shard"].str.split("/").str[0].drop_duplicates().tolist() \
        == ["crawl", first.id]
    assert summary["urls"] == len(manifest) == 123 and summary["urls_listed"] == 128 and summary["duplicates"] == 5
    assert sum(summary["by_status"].values()) == summary["urls"]
    per_list = manifest.groupby("url_list")["status"].apply(lambda s: int((s == "success").sum())).to_dict()
    assert {e["name"]: e["downloaded"] for e in summary["url_lists"]} == per_list
    assert per_list[first.id] > 25  # the batch's own web/ is served: most of its URLs answer
    assert per_list[second.id] == 0  # .v2 paths are not on the demo web: 404
    assert list(manifest["url_list"].drop_duplicates()) == ["crawl", first.id, second.id]


def test_an_appended_list_tracked_but_not_checked_out_is_one_clear_error(crawl, tmp_path):
    additions = tmp_path / "additions"
    additions.mkdir()
    (additions / "20261102T030000Z-0123abcd.dvc").write_text("outs:\n- md5: 0.dir\n  path: 20261102T030000Z-0123abcd\n")
    with pytest.raises(InputError, match="not in the work tree: run `dvc pull`"):
        read_crawl(crawl / "crawl" / "urls.parquet", additions)


def test_a_bad_list_is_refused_before_anything_is_written(tmp_path):
    pd.DataFrame({"link": ["http://a.test/x.jpg"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="caption|url"):
        append_url_list(tmp_path / "bad.parquet", tmp_path / "additions")
    assert not (tmp_path / "additions").exists()


def _list(path, uids, urls=None, **columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    urls = urls or [f"http://img.test/{u}.jpg" for u in uids]
    pd.DataFrame({"uid": uids, "url": urls, "caption": [f"caption {u}" for u in uids], **columns}).to_parquet(path)
    return path


@pytest.mark.parametrize("case, field, reason", [
    ("url_list_column", "url_list", "reserved for the list each URL comes from"),
    ("bad_uid", "uid", "not made of letters, digits"),
    ("collides_with_base", "uid", "already in the crawl with another url or caption"),
    ("collides_with_addition", "uid", "already in the crawl with another url or caption"),
    ("passthrough_type", "site", "differs from"),
])
def test_new_urls_that_fail_the_crawl_checks_are_refused_before_anything_is_copied(tmp_path, case, field, reason):
    base = _list(tmp_path / "crawl" / "urls.parquet", ["a1", "a2"], site=["x", "y"])
    additions = tmp_path / "additions"
    append_url_list(_list(tmp_path / "week1" / "urls.parquet", ["b1"], site=["z"]), additions, crawl_urls=base,
                    now=dt.datetime(2026, 11, 2, tzinfo=dt.UTC))
    before = sorted(p.name for p in additions.iterdir())
    new = tmp_path / "week2" / "urls.parquet"
    if case == "url_list_column":
        _list(new, ["c1"], url_list=["crawl"])
    elif case == "bad_uid":
        _list(new, ["c1", "../c2", "c.3"])
    elif case == "collides_with_base":
        _list(new, ["c1", "a2"], urls=["http://img.test/c1.jpg", "http://other.test/a2.jpg"])
    elif case == "collides_with_addition":
        _list(new, ["b1"], urls=["http://other.test/b1.jpg"])
    elif case == "passthrough_type":
        _list(new, ["c1"], site=[3])
    with pytest.raises(InputError) as err:
        append_url_list(new, additions, crawl_urls=base)
    assert err.value.file == str(new) and err.value.field == field and reason in err.value.reason
    assert sorted(p.name for p in additions.iterdir()) == before  # nothing copied


def test_new_urls_repeating_crawl_pairs_are_appended_as_duplicates(tmp_path):
    base = _list(tmp_path / "crawl" / "urls.parquet", ["a1", "a2"])
    again = _list(tmp_path / "week1" / "urls.parquet", ["a2", "c1"])
    addition = append_url_list(again, tmp_path / "additions", crawl_urls=base)
    crawl = read_crawl(base, tmp_path / "additions")
    assert [e["duplicates"] for e in crawl.lists] == [0, 1] and addition.path.is_dir()


def test_a_symlink_in_the_web_directory_of_new_urls_is_refused_not_followed(crawl, tmp_path):
    import shutil

    batch = tmp_path / "batch"
    shutil.copytree(crawl / "batch1", batch)
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    link = next((batch / "web").rglob("*.jpg"), None) or next(p for p in (batch / "web").rglob("*") if p.is_file()
                                                                and p.name != "routes.json")
    link.unlink()
    link.symlink_to(secret)
    with pytest.raises(InputError, match="symbolic link") as err:
        append_url_list(batch / "urls.parquet", tmp_path / "additions")
    assert err.value.file == str(link)
    assert not (tmp_path / "additions").exists() or not any((tmp_path / "additions").iterdir())


def _record_of(crawl, name):
    return next(e for e in crawl.lists if e["name"] == name)


def test_a_recorded_list_is_not_read_again_unless_a_later_list_is_checked_against_it(tmp_path, monkeypatch):
    """The download's record of a finished list stands for its check: a rerun reads no list; a new list is checked
    against the earlier ones' streamed uids and URLs, with the same counts and errors as a full check."""
    from clipmill.components.download import additions as mod

    base = _list(tmp_path / "crawl" / "urls.parquet", ["a1", "a2", "a3"], site=["x", "y", "z"])
    week1 = tmp_path / "additions"
    append_url_list(_list(tmp_path / "w1" / "urls.parquet", ["a2", "b1"],
                          urls=["http://img.test/a2.jpg", "http://img.test/a3.jpg"], site=["y", "w"]),
                    week1, crawl_urls=base, now=dt.datetime(2026, 11, 2, tzinfo=dt.UTC))
    full = read_crawl(base, week1)
    assert [(e["duplicates"], e["duplicate_urls"]) for e in full.lists] == [(0, 0), (1, 1)]
    records = {e["name"]: e for e in full.lists}
    read = []
    real_read, real_rows = mod.read_url_list, mod.iter_list_rows
    monkeypatch.setattr(mod, "read_url_list", lambda path, *a: read.append(("read", path)) or real_read(path, *a))
    monkeypatch.setattr(mod, "iter_list_rows", lambda path, *a: read.append(("stream", path)) or real_rows(path, *a))

    rerun = read_crawl(base, week1, recorded=lambda name, path, sha, earlier: records[name])
    assert read == [] and rerun.lists == full.lists and rerun.sha256 == full.sha256
    assert rerun.passthrough == full.passthrough

    # week 1 is new to this output: the base list is streamed for the check, not read whole
    only_base = read_crawl(base, week1, recorded=lambda name, *_: records.get(name) if name == "crawl" else None)
    assert only_base.lists == full.lists and [kind for kind, _ in read] == ["stream", "read", "stream"]
    assert only_base.table(full.lists[1]["name"])["uid"].tolist() == ["b1"]  # a2 was in the base list
    assert list(only_base.table("crawl")["uid"]) == ["a1", "a2", "a3"]
    with pytest.raises(InputError, match="already in the crawl with another url"):
        read_crawl(base, week1, extra=[("new", _list(tmp_path / "w2" / "urls.parquet", ["a1"],
                                                     urls=["http://other.test/a1.jpg"], site=["v"]))],
                   recorded=lambda name, *_: records.get(name))


def test_hashes_that_collide_are_confirmed_on_the_values(tmp_path, monkeypatch):
    from clipmill.components.download import additions as mod

    base = _list(tmp_path / "crawl" / "urls.parquet", ["a1", "a2"])
    new = _list(tmp_path / "w1" / "urls.parquet", ["b1", "a2"])
    monkeypatch.setattr(mod, "_hits", lambda values, seen: np.ones(len(values), dtype=bool))  # every hash "seen"
    crawl = read_crawl(base, None, extra=[("new", new)])
    assert [(e["duplicates"], e["duplicate_urls"]) for e in crawl.lists] == [(0, 0), (1, 0)]


def test_a_passthrough_column_some_list_lacks_has_the_type_it_has_across_the_lists(tmp_path):
    base = _list(tmp_path / "crawl" / "urls.parquet", ["a1"], rank=[3], flag=[True])
    new = _list(tmp_path / "w1" / "urls.parquet", ["b1"], site=["x"])
    crawl = read_crawl(base, None, extra=[("new", new)])
    tables = [crawl.table(e["name"]) for e in crawl.lists]
    assert crawl.passthrough == ["rank", "flag", "site", "url_list"]
    together = pd.concat([read_crawl(base).table("crawl"), pd.read_parquet(new)], ignore_index=True)
    for table in tables:
        assert list(table.columns) == ["uid", "url", "caption", "rank", "flag", "site", "url_list"]
        assert {c: table[c].dtype for c in ("rank", "flag", "site")} == \
            {c: together[c].dtype for c in ("rank", "flag", "site")}
    assert tables[0]["rank"].tolist() == [3.0] and tables[1]["rank"].isna().all()


@pytest.mark.parametrize("array", [pa.array(["a", None]), pa.array([1, 2]), pa.array([1, None]),
                                   pa.array([1, None], pa.int8()), pa.array([True, None]), pa.array([True, False]),
                                   pa.array([1.5, None], pa.float32()), pa.array([None, None]),
                                   pa.array(["x"], pa.large_string())])
def test_a_passthrough_column_gets_the_dtype_its_table_would_have(tmp_path, array):
    from clipmill.components.download.url_list import passthrough_dtypes

    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://a.test/x.jpg"] * len(array), "caption": ["c"] * len(array),
                             "extra": array}), path, row_group_size=1)
    assert passthrough_dtypes(path, batch_rows=1) == {"extra": pa.chunked_array([array]).to_pandas().dtype}
