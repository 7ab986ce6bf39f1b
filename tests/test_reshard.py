"""Reshard: every curated uid exactly once across shuffled shards, sizes, manifest, stable content hash, atomicity."""
from __future__ import annotations

import json
import shutil
import tarfile

import mlflow
import pandas as pd
import pytest
import webdataset as wds

from clipmill.cli import main as clipmill_main
from clipmill.components.common.curation import output_path, unit_path
from clipmill.components.common.errors import InputError
from clipmill.components.common.params import TrackingParams
from clipmill.components.reshard.curated import reshard
from clipmill.components.reshard.params import ReshardParams
from tests.curation_tables import make_curation, run_reshard


@pytest.fixture(scope="module")
def curation(tmp_path_factory):
    return make_curation(tmp_path_factory.mktemp("curation"), n=160, per_shard=50)


def expected_uids(curation, steps=None) -> set[str]:
    """The uids kept by every listed step, from the step tables."""
    tables = curation["tables"]
    kept = [set(tables[s].loc[tables[s]["keep"], "uid"]) for s in (steps or curation["steps"])]
    return set.intersection(*kept)


def read_samples(out) -> list[dict]:
    urls = [str(p) for p in sorted((out / "shards").glob("*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False))


def copy_curate(curation, tmp_path):
    target = tmp_path / "curate"
    shutil.copytree(curation["paths"]["curate"], target)
    return target


def rewrite_parquet(path, change) -> None:
    """Replace the table at ``path`` by ``change(table)`` (its completion marker stays)."""
    change(pd.read_parquet(path)).to_parquet(path, index=False)


def test_every_kept_uid_lands_once_with_its_image_caption_and_metadata(curation, tmp_path, mlflow_uri):
    out = tmp_path / "curated"
    p = curation["paths"]
    summary = reshard(p["curate"], p["shards"], out, ReshardParams(samples_per_shard=30), 0,
                      TrackingParams(tracking_uri=mlflow_uri), curation["steps"])
    expected = expected_uids(curation)
    assert len(expected) == len(curation["tables"]["rewrite"]) > 45  # the last step's input: every earlier step kept
    samples = read_samples(out)
    assert sorted(s["__key__"] for s in samples) == sorted(expected)
    assert summary["samples"] == len(expected) and summary["steps"] == curation["steps"]
    shard_sizes = [sum(1 for m in tarfile.open(f) if m.name.endswith(".jpg"))
                   for f in sorted((out / "shards").glob("*.tar"))]
    assert shard_sizes == [min(30, len(expected) - i) for i in range(0, len(expected), 30)]
    assert summary["shards"] == len(shard_sizes) >= 3

    manifest = curation["manifest"].set_index("uid")
    tables = {s: t.set_index("uid") for s, t in curation["tables"].items()}
    with tarfile.open(p["shards"] / "00001.tar") as source:
        source_jpgs = {m.name.split(".")[0]: source.extractfile(m).read() for m in source if m.name.endswith(".jpg")}
    checked = 0
    for sample in samples:
        uid = sample["__key__"]
        meta = json.loads(sample["json"])
        assert set(meta) == {"uid", "source_shard", "source_key", "clip_score", "matched_entries", "keep_probability",
                             "rewrites"}
        assert sample["txt"].decode() == manifest.at[uid, "caption"]
        assert meta["uid"] == uid and meta["rewrites"] == list(tables["rewrite"].at[uid, "rewrites"])
        assert meta["rewrites"] and all(isinstance(r, str) for r in meta["rewrites"])
        assert meta["clip_score"] == pytest.approx(float(tables["score"].at[uid, "clip_score"]))
        assert meta["keep_probability"] == pytest.approx(float(tables["balance"].at[uid, "keep_probability"]))
        assert meta["matched_entries"] == list(tables["balance"].at[uid, "matched_entries"])
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
    assert runs["metrics.samples"].iloc[0] == len(expected)


def test_the_listed_steps_decide_the_samples_and_their_metadata(curation, tmp_path):
    steps = ["rules", "dedup", "score"]
    summary = run_reshard(curation, tmp_path / "curated", 100, steps=steps)
    samples = read_samples(tmp_path / "curated")
    assert {s["__key__"] for s in samples} == expected_uids(curation, steps)
    assert summary["samples"] == int(curation["tables"]["score"]["keep"].sum()) > len(curation["tables"]["rewrite"])
    for sample in samples:
        meta = json.loads(sample["json"])
        # json.rewrites is always there for training, empty when no listed step rewrites
        assert set(meta) == {"uid", "source_shard", "source_key", "clip_score", "rewrites"} and meta["rewrites"] == []

    assert run_reshard(curation, tmp_path / "none", 100, steps=[])["samples"] == len(curation["tables"]["rules"])
    # A list the curation did not run in this order: balance's table holds what score kept, not what rules kept.
    with pytest.raises(InputError, match=r"steps/balance/00000.parquet: field 'uid': \d+ uids that reached step "
                                         r"'balance' have no row"):
        run_reshard(curation, tmp_path / "bad", 100, steps=["rules", "balance"])


def test_shards_are_shuffled_by_seed_and_byte_identical_on_rerun(curation, tmp_path):
    first = run_reshard(curation, tmp_path / "a", 30, seed=0)
    again = run_reshard(curation, tmp_path / "b", 30, seed=0)
    other = run_reshard(curation, tmp_path / "c", 30, seed=1)
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
    run_reshard(curation, out, 50)
    assert len(list((out / "shards").glob("*.tar"))) == 2
    run_reshard(curation, out, 30)
    assert len(list((out / "shards").glob("*.tar"))) == 3
    before = (out / "content_hash.txt").read_text()

    broken_shards = tmp_path / "broken_shards"
    shutil.copytree(curation["paths"]["shards"], broken_shards)
    (broken_shards / "00002.tar").write_bytes(b"")
    with pytest.raises(InputError, match="00002.tar: not a readable tar shard"):
        run_reshard(curation, out, 30, shards=broken_shards)
    with tarfile.open(curation["paths"]["shards"] / "00002.tar") as source, \
            tarfile.open(broken_shards / "00002.tar", "w") as target:
        for member in source:
            if not member.name.endswith(".jpg"):
                target.addfile(member, source.extractfile(member))
    with pytest.raises(InputError, match=r"00002.tar: field 'jpg': no member \d+.jpg"):
        run_reshard(curation, out, 30, shards=broken_shards)
    assert (out / "content_hash.txt").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".curated")] == []


def test_inconsistent_inputs_are_one_clear_error(curation, tmp_path, capsys):
    curate = copy_curate(curation, tmp_path)
    rewrites = output_path(curate, "rewrite", "00001")
    rewrite_parquet(rewrites, lambda t: t.iloc[1:])  # a sample that reached the step has no row
    params_file = tmp_path / "params.yaml"
    params_file.write_text("tracking:\n  enabled: false\n")
    args = ["stage", "reshard", "--params", str(params_file), "--curate", str(curate),
            "--shards", str(curation["paths"]["shards"]), "--out", str(tmp_path / "curated")]
    assert clipmill_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "steps/rewrite/00001.parquet: field 'uid': 1 uids that reached step 'rewrite' have no row" in err[0]
    assert not (tmp_path / "curated").exists()

    shutil.copy(output_path(curation["paths"]["curate"], "rewrite", "00001"), rewrites)
    kept = curation["tables"]["rewrite"]["uid"]

    def swap_keys(units: pd.DataFrame) -> pd.DataFrame:  # two curated samples point at each other's images
        rows = units.index[units["uid"].isin(kept)][:2]
        units.loc[rows, "key"] = units.loc[rows[::-1], "key"].to_numpy()
        return units

    rewrite_parquet(unit_path(curate, "00001"), swap_keys)
    assert clipmill_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "00001.tar: field 'uid': sample '" in err[0] and "the curation units say" in err[0]
    assert not (tmp_path / "curated").exists()

    shutil.copy(unit_path(curation["paths"]["curate"], "00001"), unit_path(curate, "00001"))
    assert clipmill_main(args) == 0
    assert (tmp_path / "curated" / "manifest.parquet").exists()
