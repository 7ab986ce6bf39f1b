"""Reshard: every curated uid exactly once across shuffled shards, sizes, manifest, stable content hash, atomicity."""
from __future__ import annotations

import json
import tarfile

import mlflow
import pandas as pd
import pytest
import webdataset as wds

from clipmill.cli import main as clipmill_main
from components.common.errors import InputError
from components.common.params import TrackingParams
from components.reshard.curated import reshard
from components.reshard.params import ReshardParams
from tests.curation_tables import make_curation


@pytest.fixture(scope="module")
def curation(tmp_path_factory):
    return make_curation(tmp_path_factory.mktemp("curation"), n=160, per_shard=50)


def run(curation, out, samples_per_shard=30, seed=0, tracking=None):
    p = curation["paths"]
    return reshard(p["manifest"], p["shards"], p["rules"], p["scores"], p["balance"], p["rewrites"], out,
                   ReshardParams(samples_per_shard=samples_per_shard), seed, tracking or TrackingParams(enabled=False))


def expected_uids(curation) -> set[str]:
    kept = [set(curation[t].loc[curation[t]["keep"], "uid"]) for t in ("rules", "scores", "balance")]
    return set.intersection(*kept)


def read_samples(out) -> list[dict]:
    urls = [str(p) for p in sorted((out / "shards").glob("*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_every_kept_uid_lands_once_with_its_image_caption_and_metadata(curation, tmp_path, mlflow_uri):
    out = tmp_path / "curated"
    summary = run(curation, out, tracking=TrackingParams(tracking_uri=mlflow_uri))
    expected = expected_uids(curation)
    samples = read_samples(out)
    assert sorted(s["__key__"] for s in samples) == sorted(expected)
    assert summary["samples"] == len(expected) == 80
    shard_sizes = [sum(1 for m in tarfile.open(f) if m.name.endswith(".jpg")) for f in sorted((out / "shards").glob("*.tar"))]
    assert shard_sizes == [30, 30, 20] and summary["shards"] == 3

    manifest = curation["manifest"].set_index("uid")
    scores = curation["scores"].set_index("uid")["clip_score"]
    rewrites = curation["rewrites"].set_index("uid")["rewrites"]
    with tarfile.open(curation["paths"]["shards"] / "00001.tar") as source:
        source_jpgs = {m.name.split(".")[0]: source.extractfile(m).read() for m in source if m.name.endswith(".jpg")}
    checked = 0
    for sample in samples:
        uid = sample["__key__"]
        meta = json.loads(sample["json"])
        assert sample["txt"].decode() == manifest.at[uid, "caption"]
        assert meta["uid"] == uid and meta["rewrites"] == list(rewrites[uid])
        assert meta["clip_score"] == pytest.approx(float(scores[uid]))
        assert meta["source_key"] == manifest.at[uid, "key"] and meta["source_shard"] == manifest.at[uid, "shard"]
        assert "background" in meta["matched_entries"]
        if meta["source_shard"] == "00001.tar":
            assert sample["jpg"] == source_jpgs[meta["source_key"]]
            checked += 1
    assert checked > 10

    table = pd.read_parquet(out / "manifest.parquet")
    assert list(table.columns) == ["uid", "shard", "key"] and table["uid"].is_unique
    assert set(table["uid"]) == expected
    assert (out / "content_hash.txt").read_text().strip() == summary["content_hash"]
    runs = mlflow.search_runs(experiment_names=["clipmill"])
    assert runs["tags.clipmill.curated_hash"].iloc[0] == summary["content_hash"]
    assert runs["metrics.samples"].iloc[0] == 80


def test_shards_are_shuffled_by_seed_and_byte_identical_on_rerun(curation, tmp_path):
    first = run(curation, tmp_path / "a", seed=0)
    again = run(curation, tmp_path / "b", seed=0)
    other = run(curation, tmp_path / "c", seed=1)
    assert first["content_hash"] == again["content_hash"]
    assert first["shard_sha256"] == again["shard_sha256"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a" / "manifest.parquet"),
                                  pd.read_parquet(tmp_path / "b" / "manifest.parquet"))
    assert other["content_hash"] != first["content_hash"]
    order = pd.read_parquet(tmp_path / "a" / "manifest.parquet")["uid"].tolist()
    assert order != sorted(order)
    # Shuffled across shards: the first output shard draws on every source shard, not one.
    sources = {json.loads(s["json"])["source_shard"] for s in read_samples(tmp_path / "a")[:30]}
    assert len(sources) >= 3


def test_rerun_replaces_the_output_and_a_failure_leaves_the_old_one(curation, tmp_path):
    out = tmp_path / "curated"
    run(curation, out, samples_per_shard=50)
    assert len(list((out / "shards").glob("*.tar"))) == 2
    run(curation, out, samples_per_shard=30)
    assert len(list((out / "shards").glob("*.tar"))) == 3
    before = (out / "content_hash.txt").read_text()

    broken = dict(curation)
    broken_shards = tmp_path / "broken_shards"
    broken_shards.mkdir()
    for f in curation["paths"]["shards"].glob("*.tar"):
        (broken_shards / f.name).write_bytes(f.read_bytes())
    (broken_shards / "00002.tar").write_bytes(b"")
    broken["paths"] = {**curation["paths"], "shards": broken_shards}
    with pytest.raises(InputError, match="00002.tar: not a readable tar shard"):
        run(broken, out, samples_per_shard=30)
    with tarfile.open(curation["paths"]["shards"] / "00002.tar") as source, \
            tarfile.open(broken_shards / "00002.tar", "w") as target:
        for member in source:
            if not member.name.endswith(".jpg"):
                target.addfile(member, source.extractfile(member))
    with pytest.raises(InputError, match=r"00002.tar: field 'jpg': no member \d+.jpg"):
        run(broken, out, samples_per_shard=30)
    assert (out / "content_hash.txt").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".curated")] == []


def test_inconsistent_inputs_are_one_clear_error(curation, tmp_path, capsys):
    p = curation["paths"]
    rewrites = tmp_path / "rewrites.parquet"
    curation["rewrites"].iloc[1:].to_parquet(rewrites, index=False)
    params_file = tmp_path / "params.yaml"
    params_file.write_text("tracking:\n  enabled: false\n")
    args = ["stage", "reshard", "--params", str(params_file), "--manifest", str(p["manifest"]),
            "--shards", str(p["shards"]), "--rules", str(p["rules"]), "--scores", str(p["scores"]),
            "--balance", str(p["balance"]), "--out", str(tmp_path / "curated")]
    assert clipmill_main(args + ["--rewrites", str(rewrites)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rewrites.parquet: field 'uid': 1 uids kept by every curation stage have no rewrites row" in err[0]
    assert not (tmp_path / "curated").exists()
    assert clipmill_main(args + ["--rewrites", str(p["rewrites"])]) == 0
    assert (tmp_path / "curated" / "manifest.parquet").exists()
