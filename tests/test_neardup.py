"""Near-duplicate step: perceptual hashes per shard, banded candidate pairs, clusters keep their smallest uid."""
from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from clipmill.components.common.steps import StepContext
from clipmill.components.filter.neardup import (
    BAND_BITS,
    BANDS,
    HASH_COLUMNS,
    MEAN_COLUMNS,
    NEAR_DUPLICATE_REASON,
    STD_COLUMNS,
    THUMB_BYTES,
    WORDS,
    Banding,
    NearDupStep,
    band_positions,
    band_values,
    banding,
    candidate_bits,
    clusters,
    hamming,
    linked_pairs,
    signatures,
    similar,
    thumbnail,
)
from clipmill.components.filter.params import FilterParams


def scene(seed: int, size: int = 96, shift: int = 0) -> Image.Image:
    """A distinct picture per seed: a few coloured blocks on a coloured background (the blocks moved by ``shift``
    pixels right and down, the background not)."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size, size, 3), dtype=np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
    for _ in range(6):
        x, y = rng.integers(0, size - 24, 2) + shift
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
    step = NearDupStep(FilterParams(near_duplicate_distance=0.025), StepContext(shards_dir=str(shards)))
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


def test_distance_zero_links_only_identical_thumbnails(crawl):
    shards, batches = crawl
    out = run_pool(NearDupStep(FilterParams(near_duplicate_distance=0), StepContext(shards_dir=str(shards))), batches)
    assert out["keep"].sum() >= len(out) - 2  # a rescaled copy differs in some thumbnail values


def test_a_distance_in_pHash_bits_is_refused():
    with pytest.raises(ValueError, match="near_duplicate_distance"):
        FilterParams(near_duplicate_distance=24)


def thumbs(*images: Image.Image) -> np.ndarray:
    return np.stack([thumbnail(jpeg(image, quality=85)) for image in images])


def test_a_copy_whose_objects_moved_a_pixel_is_similar_and_other_pictures_are_not():
    copies = thumbs(scene(3), scene(3, shift=1))  # large saturated blocks: a 3 px move is beyond 0.025 here
    others = thumbs(scene(3), scene(4))
    assert similar(copies[:1], copies[1:], 0.025, 0.95).all()
    assert not similar(others[:1], others[1:], 0.025, 0.95).any()


def faint(image: Image.Image, contrast: float = 0.04) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    return Image.fromarray((128 + (pixels - pixels.mean()) * contrast).round().astype(np.uint8))


def test_faint_pictures_are_close_in_rms_but_only_alike_when_their_layout_correlates():
    a, b, a_again = thumbs(faint(scene(1)), faint(scene(2)), faint(scene(1, shift=2)))[:, None]
    assert similar(a, b, 0.025, 0.0).all()          # the colours alone cannot tell them apart
    assert not similar(a, b, 0.025, 0.95).any()
    assert similar(a, a_again, 0.025, 0.95).all()


def test_blank_images_of_one_colour_are_alike_and_unlike_a_picture():
    blank = Image.new("RGB", (80, 80), (200, 30, 30))
    other_blank = Image.new("RGB", (80, 80), (30, 30, 200))
    t = thumbs(blank, blank.resize((100, 100)), other_blank, scene(5))
    assert similar(t[[0, 0, 0]], t[[1, 2, 3]], 0.025, 0.95).tolist() == [True, False, False]
    assert (signatures(t[:1]) == signatures(t[1:2])).all()  # one signature: banding pairs them
    gray = thumbs(Image.new("RGB", (64, 64), (90, 90, 90)), Image.new("RGB", (90, 90), (91, 91, 91)),
                  faint(scene(6), contrast=0.05))
    other_gray = thumbs(Image.new("RGB", (64, 64), (150, 150, 150)))
    assert (signatures(gray[:1]) == signatures(gray[1:2])).all()  # no layout: the signature of their grey level
    assert hamming(signatures(gray[:1]), signatures(other_gray)[0])[0] > candidate_bits(0.95)
    assert similar(gray[[0, 0]], gray[[1, 2]], 0.025, 0.95).tolist() == [True, False]


def test_thumbnails_at_the_least_correlation_fall_within_the_candidate_bits():
    rng = np.random.default_rng(7)
    base = rng.normal(0, 1, (200, 192))
    noise = rng.normal(0, 1, (200, 192))
    noise -= (noise * base).sum(1, keepdims=True) / (base * base).sum(1, keepdims=True) * base
    noise *= np.linalg.norm(base, axis=1, keepdims=True) / np.linalg.norm(noise, axis=1, keepdims=True)
    near = 0.95 * base + np.sqrt(1 - 0.95 ** 2) * noise     # correlation 0.95 with base

    def to_uint8(x):
        return np.clip(128 + 12 * x, 0, 255).astype(np.uint8)

    a, b = signatures(to_uint8(base)), signatures(to_uint8(near))
    distances = np.array([hamming(a[i:i + 1], b[i])[0] for i in range(len(a))])
    assert distances.max() <= candidate_bits(0.95) < 256 // 2


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


def test_partial_holds_only_hashed_rows_with_their_words_and_channel_means(crawl):
    shards, batches = crawl
    step = NearDupStep(FilterParams(near_duplicate_distance=0.025), StepContext(shards_dir=str(shards)))
    mapped = step.map(batches[0])
    partial = step.partial(mapped)
    assert list(partial.columns) == ["uid", *HASH_COLUMNS, *MEAN_COLUMNS, *STD_COLUMNS]
    assert len(partial) == int(mapped["hashed"].sum()) == len(mapped) - ("u99" in set(mapped["uid"]))
    hashed = mapped[mapped["hashed"]]
    thumbs = np.stack([np.frombuffer(t, dtype=np.uint8) for t in hashed["thumb"]]).reshape(len(hashed), -1, 3)
    np.testing.assert_allclose(partial[MEAN_COLUMNS].to_numpy(), thumbs.mean(axis=1) / 255)
    np.testing.assert_allclose(partial[STD_COLUMNS].to_numpy(), (thumbs / 255).std(axis=1))


def test_expectations_fail_when_a_dropped_uids_winner_was_not_kept(tmp_path):
    import great_expectations as gx

    (tmp_path / "state").mkdir()
    pd.DataFrame({"uid": ["c", "z"], "winner": ["a", "x"]}).to_parquet(tmp_path / "state" / "losers.parquet")
    params = FilterParams(near_duplicate_distance=0.025)
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


def test_many_identical_hashes_are_linked_without_comparing_every_pair(monkeypatch):
    """Blank images share one hash: a bucket of thousands of copies must not cost a comparison per pair."""
    from clipmill.components.filter import neardup

    compared = []
    monkeypatch.setattr(neardup, "hamming", lambda a, b: compared.append(len(a)) or hamming(a, b))
    rng = np.random.default_rng(3)
    blank = np.zeros(WORDS, dtype=np.uint64)
    words = np.vstack([np.tile(blank, (5000, 1)), rng.integers(0, 2**63, size=(3, WORDS), dtype=np.uint64)])
    uids = np.array([f"u{i:05d}" for i in range(len(words))], dtype=object)
    pairs = neardup.linked_pairs(uids, words, np.zeros(len(words), dtype=np.int64), max_distance=24)
    assert sum(compared) <= 6  # the 4 distinct hashes, pairwise; the 4,999 copies are linked without a comparison
    table = clusters(pairs)
    assert len(table) == 5000 and set(table["winner"]) == {"u00000"}


@pytest.mark.parametrize("wide", [False, True], ids=["16x16", "26x20"])
def test_candidates_do_not_depend_on_how_many_passes_the_memory_bound_takes(monkeypatch, wide):
    """One read of the partials, or a pass per band spilling rows to buckets when the signatures exceed the driver's
    bound: the same candidate pairs (copies, close pairs across partials, far pairs left out), with 16-bit bands and
    with the wider random-subset bands of a larger pool."""
    from clipmill.components.filter import neardup
    from clipmill.components.filter.neardup import Banding, candidate_pairs

    if wide:
        monkeypatch.setattr(neardup, "banding", lambda pool, min_correlation: Banding(20, 26))

    rng = np.random.default_rng(5)
    base = rng.integers(0, 2**63, size=(40, WORDS), dtype=np.uint64)
    near = base.copy()
    near[:, 0] ^= np.uint64(0b1011)                 # 3 bits off: a candidate of its base
    far = rng.integers(0, 2**63, size=(40, WORDS), dtype=np.uint64)
    words = np.vstack([base, near, far, base[:5]])  # the last five: exact copies
    frame = pd.DataFrame({"uid": [f"u{i:03d}" for i in range(len(words))],
                          **{c: words[:, i] for i, c in enumerate(HASH_COLUMNS)}})
    parts = [frame.iloc[i:i + 30].reset_index(drop=True) for i in range(0, len(frame), 30)]
    one_pass = candidate_pairs(lambda: iter(parts), max_bits=8)
    sliced = candidate_pairs(lambda: iter(parts), max_bits=8, memory=1000)
    assert one_pass == sliced
    assert {(f"u{i:03d}", f"u{i + 40:03d}") for i in range(40)} <= set(one_pass)
    assert {(f"u{i:03d}", f"u{i + 120:03d}") for i in range(5)} <= set(one_pass)
    assert not any(int(a[1:]) >= 80 and int(a[1:]) < 120 or 80 <= int(b[1:]) < 120 for a, b in one_pass)


def test_the_colour_moment_bound_never_prunes_a_pair_the_thumbnail_check_would_link():
    """Two thumbnails within RMS d differ in their three channel means and three channel standard deviations by at
    most mean_gap(d), squared and summed: pruning candidates by it changes nothing but their number. The standard
    deviations prune pairs of equal colour and other contrast, which the means alone keep."""
    from clipmill.components.filter.neardup import MOMENT_COLUMNS, mean_gap, signature_frame, similar

    rng = np.random.default_rng(11)
    n = 20000
    a = rng.integers(0, 256, size=(n, THUMB_BYTES)).astype(np.uint8)
    shift = rng.integers(-30, 31, size=(n, 3)).repeat(THUMB_BYTES // 3, axis=0).reshape(n, -1, 3)
    # half the copies keep their contrast, half scale it about the channel's own mean (the mean stays)
    contrast = np.where(rng.random((n, 1, 1)) < 0.5, 1.0, rng.uniform(0.85, 1.15, size=(n, 1, 3)))
    noise = rng.integers(-3, 4, size=(n, THUMB_BYTES))
    channels = a.reshape(n, -1, 3).astype(float)
    scaled = channels.mean(axis=1, keepdims=True) + contrast * (channels - channels.mean(axis=1, keepdims=True))
    b = np.clip(np.rint(scaled + shift).reshape(n, -1) + noise, 0, 255).astype(np.uint8)

    def moments(thumbs):
        return signature_frame(pd.DataFrame({"uid": np.arange(n), **{c: 0 for c in HASH_COLUMNS},
                                             "thumb": [t.tobytes() for t in thumbs], "hashed": True}))

    ma, mb = moments(a)[MOMENT_COLUMNS].to_numpy(), moments(b)[MOMENT_COLUMNS].to_numpy()
    gaps = ((ma - mb) ** 2).sum(axis=1)
    mean_gaps = ((ma[:, :3] - mb[:, :3]) ** 2).sum(axis=1)
    for d in (0.01, 0.025, 0.05, 0.1):
        linked = similar(a, b, d, -1.0)  # any correlation: the RMS alone
        assert linked.any() and (gaps[linked] <= mean_gap(d)).all()
        assert ((gaps > mean_gap(d)) & (mean_gaps <= mean_gap(d))).any()  # the deviations prune what means keep


def test_same_layout_in_another_colour_is_no_candidate_under_the_mean_bound():
    """A brighter copy has the same centred thumbnail (the same signature) but other channel means: the banding
    alone makes it a candidate, the mean bound does not."""
    from clipmill.components.filter.neardup import candidate_pairs, mean_gap, signature_frame

    rng = np.random.default_rng(2)
    picture = rng.integers(0, 120, size=THUMB_BYTES).astype(np.uint8)
    brighter = (picture + 60 + rng.integers(0, 3, size=THUMB_BYTES)).astype(np.uint8)
    again = (picture + 1 + rng.integers(0, 3, size=THUMB_BYTES)).astype(np.uint8)
    thumbs = np.stack([picture, brighter, again])
    words = signatures(thumbs)
    assert len(np.unique(words, axis=0)) == 3  # not copies: linked only if compared
    frame = pd.DataFrame({"uid": ["p", "q", "r"], **{c: words[:, i] for i, c in enumerate(HASH_COLUMNS)},
                          "thumb": [t.tobytes() for t in thumbs], "hashed": True})
    loose = candidate_pairs(lambda: iter([frame[["uid", *HASH_COLUMNS]]]), max_bits=40)
    pruned = candidate_pairs(lambda: iter([signature_frame(frame)]), max_bits=40,
                             max_mean_gap=mean_gap(0.025))
    assert {("p", "q"), ("p", "r")} <= set(loose)
    assert pruned == [("p", "r")]


def test_identical_hashes_are_linked_once_for_all_bands_with_the_pairs_each_band_links_alone(monkeypatch):
    """_band_pairs takes identical hashes out before the bands (they share every band value): the same pairs as
    linking each band on its own, and the uniqueness pass runs once, not once per band."""
    from clipmill.components.filter import neardup

    rng = np.random.default_rng(11)
    base = rng.integers(0, 2**63, size=(30, WORDS), dtype=np.uint64)
    near = base.copy()
    near[:, 0] ^= np.uint64(0b101)
    words = np.vstack([base, near, base[:10], rng.integers(0, 2**63, size=(20, WORDS), dtype=np.uint64)])
    uids = np.array([f"u{i:03d}" for i in rng.permutation(len(words))], dtype=object)
    bands = range(WORDS * 64 // BAND_BITS)
    expected = {tuple(sorted(p)) for band in bands
                for p in linked_pairs(uids, words, band_values(words, band), max_distance=8)}
    calls = []
    real = neardup._identical_rows
    monkeypatch.setattr(neardup, "_identical_rows", lambda w: calls.append(len(w)) or real(w))
    found = neardup._band_pairs(uids, words, None, 8, math.inf)
    assert found == expected and len(found) == 40  # 30 near pairs and 10 copies
    assert calls == [len(words)]


def test_the_thumbnail_check_gives_the_same_pairs_whatever_its_chunk(monkeypatch):
    from clipmill.components.filter import neardup

    rng = np.random.default_rng(7)
    thumbs = rng.integers(0, 256, size=(12, neardup.THUMB_BYTES), dtype=np.uint8)
    close = np.clip(thumbs.astype(int) + rng.integers(-2, 3, size=thumbs.shape), 0, 255).astype(np.uint8)
    uids = [f"a{i:02d}" for i in range(12)] + [f"b{i:02d}" for i in range(12)]
    frame = pd.DataFrame({"uid": uids, "thumb": [t.tobytes() for t in np.vstack([thumbs, close])], "hashed": True})
    pairs = sorted([(f"a{i:02d}", f"b{i:02d}") for i in range(12)]
                   + [(f"a{i:02d}", f"a{i + 1:02d}") for i in range(11)])
    whole = neardup.checked_pairs(pairs, lambda: iter([frame]), 0.05, 0.9)
    monkeypatch.setattr(neardup, "CHECK_CHUNK", 5)
    assert neardup.checked_pairs(pairs, lambda: iter([frame]), 0.05, 0.9) == whole
    assert whole == sorted((f"a{i:02d}", f"b{i:02d}") for i in range(12))


def test_the_bands_widen_with_the_pool_and_keep_the_chance_of_linking_a_pair_at_the_least_correlation():
    """Below 2**16 signatures the 16 bands of 16 bits; above, bands of ceil(log2(pool)) bits, as many as keep the
    chance that a pair at the least correlation shares one at least that of 16 x 16."""
    assert banding(10, 0.95) == banding(2**16, 0.95) == Banding(BAND_BITS, BANDS) == Banding(16, 16)
    s = 1 - math.acos(0.95) / math.pi

    def chance(scheme):
        return 1 - (1 - s ** scheme.bits) ** scheme.bands

    for pool, bits in ((2**16 + 1, 17), (2**20, 20), (10**8, 27), (10**9, 30)):
        scheme = banding(pool, 0.95)
        assert scheme.bits == bits and chance(scheme) >= chance(Banding()) - 1e-12
        assert chance(Banding(scheme.bits, scheme.bands - 1)) < chance(Banding())  # no more bands than needed
    assert banding(10**6, 0.9).bands > banding(10**6, 0.95).bands > banding(10**6, 0.99).bands
    # 16-bit bands are the signature's consecutive bits; wider ones a fixed subset each, other for every band
    assert [list(band_positions(16, b)) for b in (0, 5)] == [list(range(16)), list(range(80, 96))]
    wide = [band_positions(24, b) for b in range(3)]
    assert all(len(set(p)) == 24 and p.max() < 256 for p in wide) and len({tuple(sorted(p)) for p in wide}) == 3
    assert (band_positions(24, 1) == wide[1]).all()
    assert not set(wide[0]) & set(wide[1]) and not set(wide[1]) & set(wide[2])  # one permutation: disjoint
    rng = np.random.default_rng(1)
    words = rng.integers(0, 2**64, size=(2000, WORDS), dtype=np.uint64)
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")  # bit k of the signature: column k
    assert (band_values(words, 5) == (bits[:, 80:96].astype(np.int64) << np.arange(16)).sum(axis=1)).all()
    # a wide band's value: the same for the same bits in the band, whatever the others; another for other bits
    outside = bits.copy()
    outside[:, np.setdiff1d(np.arange(256), wide[1])] = rng.integers(0, 2, size=(2000, 256 - 24))
    inside = bits.copy()
    inside[np.arange(2000), wide[1][rng.integers(0, 24, 2000)]] ^= 1

    def pack(b):
        return np.packbits(b, axis=1, bitorder="little").view(np.uint64)

    values = band_values(words, 1, 24)
    many = rng.integers(0, 2**64, size=(2**16, WORDS), dtype=np.uint64)
    many_bits = np.unpackbits(many.view(np.uint8), axis=1, bitorder="little")
    for band in range(4):  # as many distinct values as distinct bit patterns in the band: no collision
        patterns = many_bits[:, band_positions(18, band)]
        assert len(np.unique(band_values(many, band, 18))) == len(np.unique(patterns, axis=0))
    assert (values >= 0).all()
    assert (band_values(pack(outside), 1, 24) == values).all()
    assert (band_values(pack(inside), 1, 24) != values).all()


def test_wide_bands_find_pairs_at_the_least_correlation_as_often_as_16_bit_bands():
    """Pairs 26 bits apart (the expected distance at correlation 0.95): the share that shares a band, and so becomes
    a candidate, is that of the 16 x 16 bits with the banding of a 10**7-signature pool."""
    from clipmill.components.filter.neardup import _band_pairs

    rng = np.random.default_rng(4)
    n, flips = 2000, 26
    base = rng.integers(0, 2**63, size=(n, WORDS), dtype=np.uint64)
    bits = np.unpackbits(base.view(np.uint8), axis=1, bitorder="little")
    for row in bits:
        row[rng.choice(256, flips, replace=False)] ^= 1
    near = np.packbits(bits, axis=1, bitorder="little").view(np.uint64)
    assert (hamming(base, near) == flips).all()
    uids = np.array([f"a{i:04d}" for i in range(n)] + [f"b{i:04d}" for i in range(n)], dtype=object)
    words = np.vstack([base, near])
    found = {}
    for scheme in (Banding(), banding(10**7, 0.95)):
        pairs = _band_pairs(uids, words, None, candidate_bits(0.95), math.inf, scheme)
        found[scheme] = sum(a[1:] == b[1:] for a, b in pairs) / n
        assert len(pairs) == sum(a[1:] == b[1:] for a, b in pairs)  # unrelated signatures are ~128 bits apart
    assert banding(10**7, 0.95) == Banding(24, 40)
    assert all(0.93 <= share <= 0.98 for share in found.values()), found  # 0.96 expected in both


def test_unrelated_signatures_cost_under_half_a_comparison_a_band_whatever_the_pool(monkeypatch):
    """With 16-bit bands, a pool's unrelated signatures share a band value pool / 2**17 times each (pairs / pool);
    with ceil(log2(pool)) bits, a quarter to half a time, however large the pool."""
    from clipmill.components.filter import neardup

    compared = []
    monkeypatch.setattr(neardup, "hamming", lambda a, b: compared.append(len(a)) or hamming(a, b))
    rng = np.random.default_rng(9)
    per_signature = {}
    for pool in (2**17 + 1, 2**18 + 1):
        words = rng.integers(0, 2**64, size=(pool, WORDS), dtype=np.uint64)  # every bit random
        uids = np.array([f"u{i:06d}" for i in range(pool)], dtype=object)
        for scheme in (Banding(), banding(pool, 0.95)):
            compared.clear()
            assert not neardup._band_pairs(uids, words, None, 8, math.inf, scheme)
            per_signature[pool, scheme.bits] = sum(compared) / pool / scheme.bands
    assert 0.2 < per_signature[2**17 + 1, 18] < 0.3 and 0.2 < per_signature[2**18 + 1, 19] < 0.3
    assert 0.9 < per_signature[2**17 + 1, 16] < 1.1 and 1.8 < per_signature[2**18 + 1, 16] < 2.2


def test_the_banding_benchmark_reports_both_bandings_and_the_same_candidates_out_of_core(tmp_path):
    from benchmarks import neardup_bench

    result = neardup_bench.main(["--sizes", "20000", "100000", "--spill-memory", "1000000",
                                 "--out", str(tmp_path / "neardup.json")])
    small, large = result["sizes"]
    assert (small["scaled"]["bits"], large["scaled"]["bits"]) == (16, 17)
    assert small["scaled"]["candidates"] == small["fixed_16"]["candidates"]  # below 2**16 the same banding
    assert large["scaled_out_of_core"]["same_candidates"] and large["scaled_out_of_core"]["memory"] == 1000000
    # the last 2 of 10 shards added to the earlier 80,000 signatures' candidates (17-bit bands both)
    assert large["added_out_of_core"]["same_candidates"] and large["added_out_of_core"]["new"] == 20000
    assert all(r[k]["planted_found"] > 0.9 for r in (small, large) for k in ("scaled", "fixed_16"))
    assert "exponent" in large["scaled"] and (tmp_path / "neardup.json").exists()


@pytest.mark.parametrize("with_fresh", [False, True], ids=["all", "fresh"])
@pytest.mark.parametrize("gap", [0.0005, 0.01, math.inf])
def test_rows_sorted_by_brightness_within_a_band_value_give_every_close_pair(gap, with_fresh):
    """Large groups of one band value, moments near one another: the pairs found are exactly those that a comparison
    of every two rows of a group finds (the brightness window leaves out only pairs the moment bound rejects); with a
    fifth of the rows fresh, exactly those of them with a fresh row."""
    from clipmill.components.filter.neardup import _close_rows, hamming

    rng = np.random.default_rng(7)
    n = 600
    keys = rng.integers(0, 4, n)  # groups of about 150 rows
    base = rng.integers(0, 2**63, (1, 4), dtype=np.uint64)
    flips = rng.random((n, 4, 64)) < 0.04  # a few bits off a shared layout: most pairs within the bit bound
    words = base ^ np.packbits(flips, axis=2, bitorder="little").view(np.uint64).reshape(n, 4)
    means = np.clip(0.5 + rng.normal(0, 0.03, (n, 6)), 0, 1)
    means[::5, :3] = means[::5, :3][:, ::-1]  # equal brightness, other colours: left to the moment bound
    fresh = rng.random(n) < 0.2 if with_fresh else None
    first, second = _close_rows(words, keys, 24, means, gap, fresh=fresh)
    found = {(min(a, b), max(a, b)) for a, b in zip(first.tolist(), second.tolist())}
    assert len(found) == len(first)  # each pair once
    i, j = np.triu_indices(n, 1)
    same = keys[i] == keys[j]
    close = hamming(words[i], words[j]) <= 24
    near = ((means[i] - means[j]) ** 2).sum(axis=1) <= gap
    wanted = same & close & near & (fresh[i] | fresh[j] if with_fresh else True)
    expected = set(zip(i[wanted].tolist(), j[wanted].tolist()))
    assert found == expected and 0 < len(expected) < same.sum()
    if with_fresh:  # pairs of two fresh rows and pairs of a fresh row with an earlier one both occur
        assert any(fresh[a] and fresh[b] for a, b in expected) and any(fresh[a] != fresh[b] for a, b in expected)


def grown_pool(order: str) -> tuple[list[pd.DataFrame], list[pd.DataFrame], list[bool]]:
    """Thumbnails in six shards, two of them new (``order``: where the new shards sit in the pool: ``after``,
    ``before`` or ``between`` the earlier four): pictures, slightly changed copies of them within and across the
    old and new shards, exact copies (identical hashes) of earlier pictures in the new shards, a group of blank
    images in both. Returns (map outputs, partials, fresh flags), shard by shard in pool order."""
    from clipmill.components.filter.neardup import signature_frame

    rng = np.random.default_rng(21)
    pictures = rng.integers(0, 256, size=(120, THUMB_BYTES)).astype(np.uint8)

    def near(thumbs):
        return np.clip(thumbs.astype(int) + rng.integers(-2, 3, size=thumbs.shape), 0, 255).astype(np.uint8)

    blank = np.full((1, THUMB_BYTES), 128, dtype=np.uint8)
    old = np.vstack([pictures[:80], near(pictures[:20]), np.repeat(blank, 3, axis=0)])
    new = np.vstack([pictures[80:], near(pictures[10:30]), near(pictures[85:95]), pictures[:6],
                     np.repeat(blank, 2, axis=0)])  # pictures[:6]: the same hashes as six earlier images
    shards = [(f"o{i}", part, False) for i, part in enumerate(np.array_split(old, 4))]
    shards += [(f"n{i}", part, True) for i, part in enumerate(np.array_split(new, 2))]
    order_of = {"after": [0, 1, 2, 3, 4, 5], "before": [4, 5, 0, 1, 2, 3], "between": [0, 4, 1, 2, 5, 3]}[order]
    mapped, partials, fresh = [], [], []
    for name, thumbs, is_new in (shards[i] for i in order_of):
        words = signatures(thumbs)
        frame = pd.DataFrame({"uid": [f"{name}-{rng.integers(10**6):06d}-{j:03d}" for j in range(len(thumbs))],
                              **{c: words[:, i] for i, c in enumerate(HASH_COLUMNS)},
                              "thumb": [t.tobytes() for t in thumbs], "hashed": True})
        mapped.append(frame)
        partials.append(signature_frame(frame))
        fresh.append(is_new)
    return mapped, partials, fresh


@pytest.mark.parametrize("order", ["after", "before", "between"])
def test_new_shards_added_to_the_stored_state_give_the_whole_pools_state(monkeypatch, order):
    """combine_more over the earlier pool's state and the new shards equals combine over the whole pool: the same
    linked pairs and losers, wherever the new shards sit in the pool (new exact copies before their earlier
    originals take their place as the first of their hash), comparing fewer pairs than banding the whole pool."""
    from clipmill.components.filter import neardup

    mapped, partials, fresh = grown_pool(order)
    params = FilterParams(near_duplicate_distance=0.025)
    earlier = [i for i, f in enumerate(fresh) if not f]
    previous = NearDupStep.combine(params, lambda: iter([partials[i] for i in earlier]),
                                   lambda: iter([mapped[i] for i in earlier]))
    compared = []
    monkeypatch.setattr(neardup, "hamming", lambda a, b: compared.append(len(a)) or hamming(a, b))
    whole = NearDupStep.combine(params, lambda: iter(partials), lambda: iter(mapped))
    whole_compared, compared[:] = sum(compared), []
    added = NearDupStep.combine_more(params, previous, lambda: iter(partials), lambda: iter(mapped), fresh)
    assert added is not None and sum(compared) < whole_compared
    for key in ("losers", "pairs"):
        pd.testing.assert_frame_equal(added[key], whole[key])
    pairs = set(zip(*[whole["pairs"][c] for c in neardup.PAIR_COLUMNS]))
    assert len(whole["losers"]) >= 40 and len(pairs) > len(set(zip(*[previous["pairs"][c]
                                                                    for c in neardup.PAIR_COLUMNS])))
    # new exact copies of earlier pictures are linked to them
    copies = mapped[fresh.index(True)]
    assert any(copies["uid"].isin(whole["losers"]["uid"]) | copies["uid"].isin(whole["losers"]["winner"]))


def test_a_pool_whose_banding_changed_is_banded_whole(monkeypatch):
    from clipmill.components.filter import neardup
    from clipmill.components.filter.neardup import fresh_candidate_pairs

    mapped, partials, fresh = grown_pool("after")
    params = FilterParams(near_duplicate_distance=0.025)
    previous = NearDupStep.combine(params, lambda: iter(partials[:4]), lambda: iter(mapped[:4]))
    assert fresh_candidate_pairs(lambda: iter(partials), fresh, max_bits=40) is not None
    # beyond the driver's bound, and the new images' signature words (78 x 32 bytes) too
    assert fresh_candidate_pairs(lambda: iter(partials), fresh, max_bits=40, memory=1000) is None
    assert NearDupStep.combine_more(params, {"losers": previous["losers"]}, lambda: iter(partials),
                                    lambda: iter(mapped), fresh) is None  # a state stored without its pairs
    real = neardup.banding
    # the earlier pool (103 images) and the grown one (181) band differently
    monkeypatch.setattr(neardup, "banding", lambda pool, c: Banding(20, 26) if pool > 150 else real(pool, c))
    assert NearDupStep.combine_more(params, previous, lambda: iter(partials), lambda: iter(mapped), fresh) is None


@pytest.mark.parametrize("order", ["after", "before", "between"])
def test_new_shards_of_a_pool_beyond_memory_are_added_one_band_at_a_time(monkeypatch, order):
    """A pool whose signatures exceed the driver's bound is banded one band at a time from spilled buckets; adding
    new shards there finds the same candidates and demoted images as in memory, compares only pairs with a new
    image (past band 0, spilling only the rows of the new images' band values), and with the earlier pool's pairs
    gives the candidates of the whole pool."""
    from clipmill.components.filter import neardup
    from clipmill.components.filter.neardup import candidate_pairs, fresh_candidate_pairs

    _, partials, fresh = grown_pool(order)
    frames = lambda: iter(partials)  # noqa: E731
    bits, gap = candidate_bits(0.95), neardup.mean_gap(0.025)
    compared, spilled_rows = [], []
    monkeypatch.setattr(neardup, "hamming", lambda a, b: compared.append(len(a)) or hamming(a, b))
    real_spill = neardup._spill_band

    def counted_spill(*args):
        paths = real_spill(*args)
        spilled_rows.append(sum(p.stat().st_size for p in paths) // neardup.SPILL_ROW.itemsize)
        return paths

    monkeypatch.setattr(neardup, "_spill_band", counted_spill)
    in_memory = fresh_candidate_pairs(frames, fresh, bits, max_mean_gap=gap)
    compared[:] = []
    # the pool's 181 signatures beyond the bound (2 buckets a band), the new ones' words within it
    spilled = fresh_candidate_pairs(frames, fresh, bits, memory=20_000, max_mean_gap=gap)
    spilled_compared, compared[:] = sum(compared), []
    added_rows, spilled_rows[:] = spilled_rows[:], []
    whole = candidate_pairs(frames, bits, memory=20_000, max_mean_gap=gap)
    # band 0 spills the whole pool in both; after it, the added path spills the new images' band values alone
    assert added_rows[0] == spilled_rows[0] == 181 == min(spilled_rows[1:])
    assert sum(added_rows[1:]) < 0.7 * sum(spilled_rows[1:])  # 78 of the 181 images are new
    assert spilled is not None and sorted(spilled[0]) == sorted(in_memory[0]) and spilled[1] == in_memory[1]
    assert 0 < spilled_compared < sum(compared)
    earlier = [p for p, f in zip(partials, fresh) if not f]
    before = candidate_pairs(lambda: iter(earlier), bits, memory=10_000, max_mean_gap=gap)
    demoted = spilled[1]
    kept = [p for p in before if not demoted & set(p)]
    assert sorted(set(kept) | set(spilled[0])) == sorted(whole)
    assert (len(demoted) > 0) == (order != "after")  # new exact copies before their originals stand for them
