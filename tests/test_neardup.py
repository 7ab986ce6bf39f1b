"""Near-duplicate step: perceptual hashes per shard, banded candidate pairs, clusters keep their smallest uid."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from clipmill.components.common.steps import StepContext
from clipmill.components.filter.neardup import (
    BAND_BITS,
    HASH_COLUMNS,
    NEAR_DUPLICATE_REASON,
    WORDS,
    NearDupStep,
    band_values,
    clusters,
    hamming,
    linked_pairs,
)
from clipmill.components.filter.params import FilterParams


def scene(seed: int, size: int = 96) -> Image.Image:
    """A distinct picture per seed: a few coloured blocks on a coloured background."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size, size, 3), dtype=np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
    for _ in range(6):
        x, y = rng.integers(0, size - 24, 2)
        w, h = rng.integers(12, 40, 2)
        pixels[y:y + h, x:x + w] = rng.integers(0, 256, 3, dtype=np.uint8)
    return Image.fromarray(pixels)


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def rescaled(image: Image.Image, factor: float) -> Image.Image:
    size = image.size[0]
    big = image.resize((round(size * factor), round(size * factor)), Image.Resampling.BILINEAR)
    return big.resize((size, size), Image.Resampling.BILINEAR)


@pytest.fixture()
def crawl(tmp_path):
    """Two shards: 12 distinct pictures, plus a re-encoded copy and a rescaled copy of pictures 0 and 5 (each
    copy in the other shard), and one sample whose bytes are not an image. Returns (shards dir, batches)."""
    samples = [(f"u{i:02d}", jpeg(scene(i))) for i in range(12)]
    samples += [("a-copy0", jpeg(scene(0), quality=55)), ("z-copy0", jpeg(rescaled(scene(0), 1.1))),
                ("b-copy5", jpeg(scene(5), quality=60)), ("z-copy5", jpeg(rescaled(scene(5), 0.9))),
                ("u99", b"<html>not an image</html>")]
    shards = tmp_path / "shards"
    shards.mkdir()
    batches = []
    for shard_id, part in enumerate([samples[0::2], samples[1::2]]):
        with wds.TarWriter(str(shards / f"{shard_id:05d}.tar")) as writer:
            rows = []
            for index, (uid, data) in enumerate(part):
                key = f"{shard_id:05d}{index:04d}"
                writer.write({"__key__": key, "jpg": data})
                rows.append({"uid": uid, "shard": f"{shard_id:05d}.tar", "key": key})
        batches.append(pd.DataFrame(rows))
    return shards, batches


def run_pool(step: NearDupStep, batches: list[pd.DataFrame]) -> pd.DataFrame:
    """The step's three phases as the curate stage runs them: map and partial per shard, one combine, decide."""
    mapped = [step.map(b) for b in batches]
    partials = [step.partial(m) for m in mapped]
    state = NearDupStep.combine(step.params, lambda: iter(partials), lambda: iter(mapped))
    return pd.concat([step.decide(m, state) for m in mapped], ignore_index=True)


def test_reencoded_and_rescaled_copies_across_shards_are_dropped_and_the_smallest_uid_kept(crawl):
    shards, batches = crawl
    step = NearDupStep(FilterParams(near_duplicate_distance=24), StepContext(shards_dir=str(shards)))
    out = run_pool(step, batches).set_index("uid")
    dropped = set(out.index[~out["keep"]])
    # 'a-copy0' < 'u00' and 'b-copy5' < 'u05': the copy with the smallest uid is the one kept
    assert dropped == {"u00", "z-copy0", "u05", "z-copy5"}
    assert set(out.loc[sorted(dropped), "reason"]) == {NEAR_DUPLICATE_REASON}
    assert out.loc[["a-copy0", "b-copy5", "u99"], "keep"].all()  # an undecodable image is not this step's to drop
    # the pool-wide result equals the step applied to the whole pool at once
    whole = step.apply(pd.concat(batches, ignore_index=True)).set_index("uid")
    assert whole["keep"].equals(out["keep"].reindex(whole.index))


def test_distance_null_hashes_nothing_and_drops_nothing(crawl):
    shards, batches = crawl
    step = NearDupStep(FilterParams(near_duplicate_distance=None), StepContext(shards_dir=str(shards)))
    out = run_pool(step, batches)
    assert out["keep"].all() and not step.map(batches[0])["hashed"].any()


def test_distance_zero_links_only_identical_hashes(crawl):
    shards, batches = crawl
    out = run_pool(NearDupStep(FilterParams(near_duplicate_distance=0), StepContext(shards_dir=str(shards))), batches)
    assert out["keep"].sum() >= len(out) - 2  # a rescaled copy differs in some bits


def test_banding_finds_pairs_within_the_distance_and_links_no_pair_beyond_it():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=WORDS, dtype=np.uint64)
    near = base.copy()
    near[0] ^= np.uint64(0b1111)          # 4 bits in band 0
    near[1] ^= np.uint64(0b111 << 20)     # 3 bits in another band
    far = base ^ rng.integers(0, 2**63, size=WORDS, dtype=np.uint64)  # about half the bits differ
    words = np.stack([base, near, far])
    assert hamming(words, base).tolist()[:2] == [0, 7] and hamming(words, base)[2] > 64
    uids = np.array(["b", "a", "c"], dtype=object)
    pairs = []
    for band in range(WORDS * 64 // BAND_BITS):
        pairs += linked_pairs(uids, words, band_values(words, band), max_distance=7)
    assert {frozenset(p) for p in pairs} == {frozenset({"a", "b"})}
    assert not linked_pairs(uids, words, band_values(words, 0), max_distance=6)


def test_clusters_are_transitive_and_won_by_their_smallest_uid():
    table = clusters([("d", "c"), ("c", "b"), ("x", "y")]).set_index("uid")["winner"]
    assert table.to_dict() == {"b": "b", "c": "b", "d": "b", "x": "x", "y": "x"}


def test_partial_holds_only_hashed_rows_with_their_words(crawl):
    shards, batches = crawl
    step = NearDupStep(FilterParams(near_duplicate_distance=24), StepContext(shards_dir=str(shards)))
    mapped = step.map(batches[0])
    partial = step.partial(mapped)
    assert list(partial.columns) == ["uid", *HASH_COLUMNS]
    assert len(partial) == int(mapped["hashed"].sum()) == len(mapped) - ("u99" in set(mapped["uid"]))


def test_expectations_fail_when_a_dropped_uids_winner_was_not_kept(tmp_path):
    import great_expectations as gx

    (tmp_path / "state").mkdir()
    pd.DataFrame({"uid": ["c", "z"], "winner": ["a", "x"]}).to_parquet(tmp_path / "state" / "losers.parquet")
    params = FilterParams(near_duplicate_distance=24)
    good = pd.DataFrame({"uid": ["a", "c", "x", "z"], "keep": [True, False, True, False]})
    bad = good.assign(keep=[True, False, False, False])
    context = gx.get_context(mode="ephemeral")
    batches = context.data_sources.add_pandas("t").add_dataframe_asset("a").add_batch_definition_whole_dataframe("w")
    outcome = []
    for table in (good, bad):
        [(name, frame, expectations)] = NearDupStep.expectations(params, table, str(tmp_path))
        suite = gx.ExpectationSuite(name=name, expectations=expectations)
        outcome.append(batches.get_batch(batch_parameters={"dataframe": frame}).validate(suite).success)
    assert outcome == [True, False]
    assert NearDupStep.expectations(FilterParams(near_duplicate_distance=None), good, str(tmp_path)) == []


def test_many_identical_hashes_are_linked_without_comparing_every_pair():
    """Blank images share one hash: a bucket of thousands of copies must not cost a comparison per pair."""
    import time

    rng = np.random.default_rng(3)
    blank = np.zeros(WORDS, dtype=np.uint64)
    words = np.vstack([np.tile(blank, (5000, 1)), rng.integers(0, 2**63, size=(3, WORDS), dtype=np.uint64)])
    uids = np.array([f"u{i:05d}" for i in range(len(words))], dtype=object)
    started = time.perf_counter()
    pairs = linked_pairs(uids, words, band_values(words, 0), max_distance=24)
    assert time.perf_counter() - started < 2.0
    table = clusters(pairs)
    assert len(table) == 5000 and set(table["winner"]) == {"u00000"}
