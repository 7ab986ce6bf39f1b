"""The near-duplicate step: images that are the same picture re-encoded, rescaled or slightly edited.

Map: a tiny-image thumbnail of each image (read from the download shards by shard and key): squeezed to
``WORK_SIDE`` px, blurred (Gaussian, ``BLUR`` px) and averaged down to ``THUMB_SIDE`` x ``THUMB_SIDE`` RGB, 192
bytes; and its ``SIGNATURE_BITS``-bit SimHash (the signs of fixed random projections of the mean-centred thumbnail,
whose Hamming distance estimates the angle between two thumbnails; a blank one, that of its grey level). The blur
makes a copy whose objects moved by a pixel or two, or that was rescaled or re-encoded, look like its source; a
perceptual hash of the fine detail does not (on the demo crawl a 256-bit pHash puts shifted copies 58 bits from
their source, median, and unrelated pictures 30 bits from their nearest neighbour, 0.5th percentile).
Partial: the shard's (uid, signature, channel means and standard deviations) rows, 80 bytes a sample. Combine, in
two passes, never comparing all pairs:
(1) locality-sensitive banding: only images that share the value of a band (a fixed subset of the signature's bits)
are compared, and those within ``candidate_bits`` of each other, whose thumbnails' channel means and standard
deviations are close enough for the check below to pass (``mean_gap``: a bound, so no pair that would link is
lost), become candidates; the signatures and moments come from the partials, the thumbnails are not read in this
pass. A pool of fewer than
2**16 signatures is cut into 16 bands of ``BAND_BITS`` bits; a larger one gets bands of ceil(log2(pool)) bits
(slices of fixed random permutations of the bits) and as many of them as keep the chance that a pair at the least
correlation shares a band at least as high (``banding``): with a fixed band width, the pairs that share a band value
by chance grow with the square of the pool (16 x pool**2 / 2**17 comparisons: 1.2 x 10**12 at 10**8 images), with
log2(pool) bits they stay below pool / 2 a band. The partials are read once when the pool's signatures fit in
``COMBINE_MEMORY`` bytes (about 1.8 million images); a larger pool is worked through one band at a time: one pass
over the partials spills each row (pool position, signature, moments) to the bucket of its band value (as many
buckets as keep each within that bound, in a temporary folder), then each bucket is banded on its own, and a last
pass names the candidates' uids. The candidates do not depend on which way was taken;
(2) each candidate pair is checked on its thumbnails (streamed from the map outputs, kept only for candidates):
both their RMS difference is at most ``filter.near_duplicate_distance`` (the colours match) and their correlation
at least ``filter.near_duplicate_min_correlation`` (the layout matches: low-contrast pictures are close in RMS
without being alike). Linked images form clusters (connected components); the state keeps the linked pairs and
each cluster's losers. Decide: every cluster keeps its smallest uid; the others are dropped as
``near_duplicate_image``. An image that does not decode gets no thumbnail and is kept here (the score step drops it
with its own reason).
New shards are added to a stored state without banding the whole pool again (``combine_more``): a pair of two
earlier images was a candidate of the earlier pool exactly when it is one of the grown pool (same banding, same
first image of each identical hash), so only the candidates with a new image are found (the band values that new
images have; of those rows, pairs with a new image) and checked, and the stored pairs are kept, less those of an
earlier image that a new identical one now stands for. When the pool's size changes its banding, the whole pool is
banded again.
"""
from __future__ import annotations

import functools
import itertools
import math
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageFilter

from clipmill.components.common.images import ImageError, decode_image
from clipmill.components.common.log import get_logger
from clipmill.components.common.shards import ShardReader, shard_file_name
from clipmill.components.common.steps import PoolStep, decisions

NEAR_DUPLICATE_REASON = "near_duplicate_image"
WORK_SIDE = 64           # every image is first squeezed to 64 x 64 (the demo's download size)
BLUR = 4.0               # Gaussian radius at 64 px: a shift of 1-3 px changes the thumbnail little
THUMB_SIDE = 8           # 8 x 8 RGB = 192 values
THUMB_BYTES = THUMB_SIDE * THUMB_SIDE * 3
SIGNATURE_BITS = 256     # SimHash of the centred thumbnail
WORDS = SIGNATURE_BITS // 64
BAND_BITS = 16           # 16 bands of 16 bits: a pair at correlation 0.95 shares a band with probability ~0.96
BANDS = SIGNATURE_BITS // BAND_BITS
BAND_SEED = 20240616     # the bit subsets of bands wider than BAND_BITS (a larger pool's)
COMBINE_MEMORY = 256 * 2**20  # bytes of signatures (and their uids) the driver holds at a time
MEAN_COLUMNS = ["mean_r", "mean_g", "mean_b"]
STD_COLUMNS = ["std_r", "std_g", "std_b"]
MOMENT_COLUMNS = MEAN_COLUMNS + STD_COLUMNS  # a thumbnail's channel means and standard deviations (values 0-1)
ENTRY_BYTES = WORDS * 8 + 6 * 8 + 72  # one image's signature, channel moments, uid (a short str) and its pointer
# a row of the out-of-core combine's spill files: the image's position in the pool, signature and channel moments
SPILL_ROW = np.dtype([("position", np.int64), ("words", np.uint64, (WORDS,)), ("means", np.float64, (6,))])
CHECK_CHUNK = 2048  # candidate pairs whose thumbnails are compared at once (~8 MB of arithmetic; larger is slower)
HASH_COLUMNS = [f"sig{i}" for i in range(WORDS)]
PAIR_COLUMNS = ["uid", "linked_uid"]  # a linked pair in the state: the smaller uid, the larger
FLAT_STD = 1.0 / 255     # a thumbnail whose values vary less than this is flat (blank): it has no layout
_PLANES = np.random.default_rng(20240614).standard_normal((SIGNATURE_BITS, THUMB_BYTES)).astype(np.float32)
FLAT_LEVEL_STEP = 4      # blank images within one bin of 4 grey levels differ by less than the distance 0.025
_FLAT_SIGNATURES = np.random.default_rng(20240615).integers(0, 2**63, (256 // FLAT_LEVEL_STEP, WORDS), dtype=np.uint64)

log = get_logger("neardup")


def thumbnail(data: bytes) -> np.ndarray | None:
    """The blurred THUMB_SIDE x THUMB_SIDE RGB thumbnail of encoded image ``data`` as THUMB_BYTES uint8 values;
    None when it does not decode."""
    try:
        image = decode_image(data)
    except ImageError as e:
        log.warning("image skipped: %s", e)
        return None
    small = image.resize((WORK_SIDE, WORK_SIDE), Image.Resampling.BOX).filter(ImageFilter.GaussianBlur(BLUR))
    return np.asarray(small.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX), dtype=np.uint8).reshape(-1)


def centred(thumbs: np.ndarray) -> np.ndarray:
    """Each thumbnail (rows of uint8) as values in [0, 1] minus its own mean."""
    values = thumbs.astype(np.float32) / 255
    return values - values.mean(axis=1, keepdims=True)


def flat(values: np.ndarray) -> np.ndarray:
    """Which centred thumbnails vary less than FLAT_STD (blank: no layout to correlate)."""
    return np.linalg.norm(values, axis=1) < FLAT_STD * math.sqrt(THUMB_BYTES)


def signatures(thumbs: np.ndarray) -> np.ndarray:
    """The SimHash of each thumbnail (n x THUMB_BYTES uint8) as n x WORDS uint64 words. A flat thumbnail has no
    layout to project: it gets the fixed random signature of its grey level's FLAT_LEVEL_STEP-wide bin, so blank
    images of one level share a signature (and are compared once each) and other levels' do not come near it."""
    values = centred(thumbs)
    words = np.packbits((values @ _PLANES.T) > 0, axis=1).view(">u8").astype(np.uint64)
    blank = flat(values)
    levels = thumbs[blank].mean(axis=1).astype(np.int64) // FLAT_LEVEL_STEP
    words[blank] = _FLAT_SIGNATURES[levels]
    return words


def candidate_bits(min_correlation: float) -> int:
    """Signature bits within which a pair at ``min_correlation`` falls with near certainty (its expected Hamming
    distance plus four standard deviations): a looser bound costs only thumbnail checks."""
    p = math.acos(max(min(min_correlation, 1.0), -1.0)) / math.pi
    return min(SIGNATURE_BITS, math.ceil(SIGNATURE_BITS * p + 4 * math.sqrt(SIGNATURE_BITS * p * (1 - p))) + 1)


def similar(a: np.ndarray, b: np.ndarray, max_distance: float, min_correlation: float) -> np.ndarray:
    """Which rows of thumbnails ``a`` and ``b`` (uint8) are near-duplicates: RMS difference (values in [0, 1]) at
    most ``max_distance`` and correlation at least ``min_correlation`` (two flat thumbnails correlate fully, a flat
    and a varied one not at all)."""
    ca, cb = centred(a), centred(b)
    rms = np.sqrt((((a.astype(np.float32) - b.astype(np.float32)) / 255) ** 2).mean(axis=1))
    na, nb = np.linalg.norm(ca, axis=1), np.linalg.norm(cb, axis=1)
    flat_a, flat_b = flat(ca), flat(cb)
    correlation = (ca * cb).sum(axis=1) / np.maximum(na * nb, 1e-12)
    correlation = np.where(flat_a | flat_b, (flat_a & flat_b).astype(np.float32), correlation)
    return (rms <= max_distance) & (correlation >= min_correlation)


def hamming(words: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Bit differences between each row of ``words`` (n x WORDS uint64) and ``other`` (one row, or n rows)."""
    return np.bitwise_count(words ^ other).sum(axis=1, dtype=np.int64)


@dataclass(frozen=True)
class Banding:
    """How the signatures are banded: ``bands`` bands of ``bits`` bits each."""

    bits: int = BAND_BITS
    bands: int = BANDS


def banding(pool: int, min_correlation: float) -> Banding:
    """The banding of a pool of ``pool`` signatures: 16 bands of 16 bits below 2**16 signatures; above, bands of
    ceil(log2(pool)) bits (so that unrelated pairs share a band value about pool / 2 times a band, not pool**2 /
    2**17), as many as keep the chance that a pair at ``min_correlation`` shares a band at least that of the 16 x
    16 bits: a bit agrees with probability s = 1 - acos(min_correlation) / pi, a band with s**bits, and some band
    of b with 1 - (1 - s**bits)**b."""
    bits = max(BAND_BITS, math.ceil(math.log2(max(pool, 2))))
    if bits == BAND_BITS:
        return Banding()
    bits = min(bits, 62)
    s = 1 - math.acos(max(min(min_correlation, 1.0), -1.0)) / math.pi
    if s >= 1.0:  # min_correlation 1: only identical signatures link, and they share any band
        return Banding(bits, BANDS)
    bands = math.ceil(BANDS * math.log1p(-s ** BAND_BITS) / math.log1p(-s ** bits) - 1e-9)
    return Banding(bits, max(bands, BANDS))


def band_positions(bits: int, band: int) -> np.ndarray:
    """The signature bits that make up ``band`` of a ``bits``-bit banding (bit k is bit k % 64 of word k // 64):
    16 consecutive bits at 16 bits a band; wider bands are consecutive slices of fixed random permutations of the
    signature's bits, 256 // bits bands to a permutation, so that the bands of one permutation share no bit (as the
    16 x 16 bits do: a pair's differing bits spoil fewer of them than of overlapping bands)."""
    if bits == BAND_BITS:
        return np.arange(band * BAND_BITS, (band + 1) * BAND_BITS)
    group, slot = divmod(band, SIGNATURE_BITS // bits)
    return np.random.default_rng([BAND_SEED, bits, group]).permutation(SIGNATURE_BITS)[slot * bits:(slot + 1) * bits]


@functools.lru_cache(maxsize=1024)
def _band_mask(bits: int, band: int) -> np.ndarray:
    """The WORDS words with the bits of ``band`` set."""
    mask = np.zeros(WORDS, dtype=np.uint64)
    for k in band_positions(bits, band):
        mask[k // 64] |= np.uint64(1) << np.uint64(k % 64)
    return mask


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 whose every output bit depends on every input bit."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def band_values(words: np.ndarray, band: int, bits: int = BAND_BITS) -> np.ndarray:
    """The value of ``band`` of every signature: at 16 bits a band, its 16 bits (``band_positions``); a wider band's
    value is a 63-bit hash of its bits (the masked words chained through splitmix64's mixer), two dozen array passes
    instead of four per bit. Equal bits give equal values; unequal ones collide with probability about 2**-63, which
    would only add a comparison, as the Hamming bound still decides a candidate."""
    if bits == BAND_BITS:
        per_word = 64 // BAND_BITS
        word, shift = divmod(band, per_word)
        return ((words[:, word] >> np.uint64(shift * BAND_BITS)) & np.uint64((1 << BAND_BITS) - 1)).astype(np.int64)
    mask = _band_mask(bits, band)
    value = words[:, 0] & mask[0]
    for i in range(1, WORDS):
        value = _mix(value) ^ (words[:, i] & mask[i])
    return (_mix(value) >> np.uint64(1)).astype(np.int64)


def _identical_rows(words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows with identical hashes: (the first row of each copy's hash, the copy's row) as two arrays, and the first
    row of each hash (sorted), which alone go on to the banding."""
    if not len(words):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    _, first, inverse = np.unique(words, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    copies = np.flatnonzero(first[inverse] != np.arange(len(words)))
    return first[inverse[copies]], copies, np.sort(first)


def identical_copies(uids: np.ndarray, words: np.ndarray) -> tuple[list[tuple[str, str]], np.ndarray]:
    """Images with identical hashes: (first uid, copy uid) for every copy, and the positions of the first of each
    hash (sorted), which alone go on to the banding."""
    firsts, copies, distinct = _identical_rows(words)
    return list(zip(uids[firsts], uids[copies])), distinct


def _close_rows(words: np.ndarray, keys: np.ndarray, max_distance: int, means: np.ndarray | None = None,
                max_mean_gap: float = math.inf, fresh: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every two rows sharing a value of ``keys`` and differing in at most ``max_distance`` bits (and, with
    ``means``, at most ``max_mean_gap`` apart in squared distance of those), as two arrays of row numbers.

    Vectorised over the groups of equal keys: with the keys sorted, the pairs at offset d within a group are the
    positions i with keys[i] == keys[i + d], so a group of s images costs s - 1 array passes, not s Python loops.
    With ``means``, a group is also sorted by its rows' brightness (the sum of the first three columns, the channel
    means): two rows within ``max_mean_gap`` differ in it by at most sqrt(3 x max_mean_gap), so each row is compared
    only with the later rows of its group up to that difference (a crawl's look-alike layouts share band values by
    the hundred, mostly in other colours: about a quarter of their pairs are compared). With ``fresh`` (a flag per
    row), only pairs with at least one fresh row are compared and returned.
    """
    window = math.sqrt(3 * max_mean_gap) * (1 + 1e-9) + 1e-12 if means is not None else math.inf
    if math.isfinite(window):
        level = means[:, :3].sum(axis=1)
        order = np.lexsort((level, keys))  # by key, then by brightness within a key
        level = level[order]
    else:
        order = np.argsort(keys)  # every pair within a group is compared: their order there does not matter
    keys, words = keys[order], words[order]
    means = means[order] if means is not None else None
    fresh = fresh[order] if fresh is not None else None
    at = np.flatnonzero(keys[:-1] == keys[1:])  # i whose group goes on at i + 1
    offset, first, second = 1, [], []
    while len(at):
        if math.isfinite(window):  # brightness grows along a group: a row past the window stays past it
            at = at[level[at + offset] - level[at] <= window]
        compared = at if fresh is None else at[fresh[at] | fresh[at + offset]]
        close = compared[hamming(words[compared], words[compared + offset]) <= max_distance]
        if means is not None:
            close = close[((means[close] - means[close + offset]) ** 2).sum(axis=1) <= max_mean_gap]
        first.append(order[close])
        second.append(order[close + offset])
        offset += 1
        at = at[at + offset < len(keys)]
        at = at[keys[at] == keys[at + offset]]
    if not first:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(first), np.concatenate(second)


def linked_pairs(uids: np.ndarray, words: np.ndarray, keys: np.ndarray, max_distance: int,
                 means: np.ndarray | None = None, max_mean_gap: float = math.inf,
                 distinct: bool = False) -> list[tuple[str, str]]:
    """(uid, uid) pairs that link every two images sharing a band value in ``keys`` and differing in at most
    ``max_distance`` bits (images with identical hashes are linked to the first of them, then compared once; with
    ``distinct``, the caller has done that already: no two rows have identical hashes); with ``means`` (n x 3
    channel means of the thumbnails), also at most ``max_mean_gap`` apart in squared distance of those means."""
    if not len(uids):
        return []
    if distinct:
        pairs, keep = [], np.arange(len(uids))
    else:
        firsts, copies, keep = _identical_rows(words)
        pairs = list(zip(uids[firsts], uids[copies]))
    first, second = _close_rows(words[keep], keys[keep], max_distance,
                                means[keep] if means is not None else None, max_mean_gap)
    return pairs + list(zip(uids[keep[first]], uids[keep[second]]))


def _pair_keys(first: np.ndarray, second: np.ndarray, size: int) -> np.ndarray:
    """Unordered pairs of row numbers below ``size`` as one int64 each (smaller * size + larger)."""
    return np.minimum(first, second).astype(np.int64) * size + np.maximum(first, second)


def clusters(pairs: list[tuple[str, str]]) -> pd.DataFrame:
    """uid -> winner (the smallest uid of its connected component) for every uid in a linked pair, winners too."""
    parent: dict[str, str] = {}

    def root(u: str) -> str:
        while parent.setdefault(u, u) != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the root of a component is its smallest uid
    uids = sorted(parent)
    return pd.DataFrame({"uid": uids, "winner": [root(u) for u in uids]}, columns=["uid", "winner"])


def _band_keys(words: np.ndarray, means: np.ndarray | None, max_bits: int, max_mean_gap: float,
               scheme: Banding = Banding()) -> np.ndarray:
    """Candidate pairs among the rows of ``words`` in every band of ``scheme``, as sorted distinct ``_pair_keys``."""
    # Identical hashes share every band value (and so every bucket): they are linked once, here, not per band.
    size = len(words)
    firsts, copies, distinct = _identical_rows(words)
    found = [_pair_keys(firsts, copies, size)]
    words = words[distinct]
    means = means[distinct] if means is not None else None
    for band in range(scheme.bands):
        first, second = _close_rows(words, band_values(words, band, scheme.bits), max_bits, means, max_mean_gap)
        found.append(_pair_keys(distinct[first], distinct[second], size))
    return np.unique(np.concatenate(found))


def _band_pairs(uids: np.ndarray, words: np.ndarray, means: np.ndarray | None, max_bits: int, max_mean_gap: float,
                scheme: Banding = Banding()) -> set[tuple[str, str]]:
    """Candidate pairs among ``uids``/``words`` in every band of ``scheme``, as (smaller, larger) uid pairs."""
    return set(_named(_band_keys(words, means, max_bits, max_mean_gap, scheme), len(uids), uids))


def _read_signatures(frames) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    uids, words, means = [], [], []
    for frame in frames:
        uids.append(frame["uid"].to_numpy(object))
        words.append(frame[HASH_COLUMNS].to_numpy(np.uint64))
        if MEAN_COLUMNS[0] in frame:
            means.append(frame[[c for c in MOMENT_COLUMNS if c in frame]].to_numpy(np.float64))
    if not uids:
        return np.array([], dtype=object), np.zeros((0, WORDS), dtype=np.uint64), None
    return np.concatenate(uids), np.concatenate(words), np.concatenate(means) if means else None


def signature_frame(mapped: pd.DataFrame) -> pd.DataFrame:
    """A map output's images with a thumbnail, as uid, signature words and the thumbnail's three channel means and
    three channel standard deviations (values 0-1), the thumbnails themselves left behind."""
    rows = mapped[mapped["hashed"].astype(bool)]
    thumbs = np.frombuffer(b"".join(rows["thumb"]), dtype=np.uint8).reshape(len(rows), THUMB_SIDE ** 2, 3) / 255
    moments = np.concatenate([thumbs.mean(axis=1), thumbs.std(axis=1)], axis=1)
    return pd.DataFrame({"uid": rows["uid"].to_numpy(), **{c: rows[c].to_numpy(np.uint64) for c in HASH_COLUMNS},
                         **{c: moments[:, i] for i, c in enumerate(MOMENT_COLUMNS)}})


def mean_gap(max_distance: float) -> float:
    """The largest squared distance of two thumbnails' channel moments (means and standard deviations, 0-1) at which
    their RMS difference can be ``max_distance``. Per channel of 64 values, the mean squared difference is the
    squared difference of the means plus the mean squared difference of the centred values, which is at least the
    squared difference of the standard deviations (triangle inequality); averaged over the three channels,
    (sum of the six squared moment differences) / 3 <= RMS^2. So the six add up to at most 3 x max_distance^2
    (with room for float rounding: a bound, never a test)."""
    return 3 * max_distance ** 2 * (1 + 1e-4) + 1e-9


def candidate_pairs(frames: Callable[[], Iterator[pd.DataFrame]], max_bits: int, memory: int = COMBINE_MEMORY,
                    max_mean_gap: float = math.inf, min_correlation: float = 0.95) -> list[tuple[str, str]]:
    """Pairs whose signatures share a band value (``banding`` of the pool's size and ``min_correlation``) and differ
    in at most ``max_bits`` bits (each pair once, as (smaller, larger) uids, in pool order); where the frames carry
    channel moments (``MOMENT_COLUMNS``), also at most ``max_mean_gap`` apart in them.

    ``frames`` yields per shard uid, the signature words and optionally the moments (the partials). They are read once
    while their signatures fit in ``memory`` bytes; a larger pool is worked through one band at a time
    (``_spilled_keys``), and a last pass names the candidates' uids."""
    held, fits = _held(frames, memory)
    if fits:
        uids, words, means = _read_signatures(held)
        scheme = banding(len(uids), min_correlation)
        return _named(_band_keys(words, means, max_bits, max_mean_gap, scheme), len(uids), uids)
    has_means = MEAN_COLUMNS[0] in held[0]
    held.clear()
    total = sum(len(frame) for frame in frames())
    keys, _ = _spilled_keys(frames, total, banding(total, min_correlation), memory, has_means, max_bits,
                            max_mean_gap)
    return _named(keys, total, _uids_at(frames, _key_rows(keys, total), total))


def _spilled_keys(frames: Callable[[], Iterator[pd.DataFrame]], total: int, scheme: Banding, memory: int,
                  has_means: bool, max_bits: int, max_mean_gap: float, new: np.ndarray | None = None,
                  new_words: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The candidates of a pool larger than ``memory``, one band at a time: a pass over the frames spills each row
    (its position in the pool, signature and moments: 88 bytes) to the bucket of its band value, as many buckets as
    keep each within ``memory``, then each bucket is banded alone. The frames are read once per band, each row
    written and read once a band. Returns sorted distinct ``_pair_keys`` of pool positions, and the positions of
    the images that are no longer the first of their identical hash.

    With ``new`` (a flag per pool position) and ``new_words`` (the new images' signatures, in pool order), only
    candidates with a new image are found, as ``fresh_candidate_pairs`` finds them in memory: a bucket holds every
    row of its band values (and band 0's, every copy of its hashes), so the rule holds bucket by bucket. Band 0
    spills every row (it finds the copies of every hash); the bands after it spill only the rows whose value a new
    image that is the first of its hash has, which the rest of the pool shares with them a few times a band at
    most. Without ``new``, no image is demoted."""
    buckets = math.ceil(total * ENTRY_BYTES / memory)
    log.info("near-duplicate combine: %d signatures%s, %d bands of %d bits, %d bucket(s) per band", total,
             f" ({int(new.sum())} new)" if new is not None else "", scheme.bands, scheme.bits, buckets)
    found: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]  # pair keys (``_pair_keys`` of pool positions)
    copies: list[np.ndarray] = []  # positions of rows whose signature an earlier row has (found in band 0)
    demoted: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    with tempfile.TemporaryDirectory(prefix="clipmill-neardup-") as spill:
        for band in range(scheme.bands):
            wanted = skipped = None
            if band == 1:  # band 0 found every copy: sorted once for the bands after it
                later = np.sort(np.concatenate(copies)) if copies else np.zeros(0, dtype=np.int64)
                if new is not None:  # the new images that stand for their hash
                    new_firsts = new_words[~np.isin(np.flatnonzero(new), later, assume_unique=True)]
            if band > 0 and new is not None:
                # a hash index of the new images' values: each shard's rows are looked up in it, not sorted with it
                wanted, skipped = pd.Index(np.unique(band_values(new_firsts, band, scheme.bits))), later
            for path in _spill_band(frames, band, scheme.bits, buckets, Path(spill), wanted, skipped):
                rows = np.fromfile(path, dtype=SPILL_ROW)  # in pool order: spilled frame by frame, stably
                path.unlink()
                position = rows["position"]
                if band == 0:  # identical signatures share every band value: linked once, then left out
                    firsts, copy_rows, first = _identical_rows(rows["words"])
                    linked = slice(None) if new is None else new[position[firsts]] | new[position[copy_rows]]
                    found.append(_pair_keys(position[firsts][linked], position[copy_rows][linked], total))
                    copies.append(np.setdiff1d(position, position[first], assume_unique=True))
                    if new is not None:  # first among the earlier images, not among all: a new copy came before
                        earlier = np.flatnonzero(~new[position])
                        demoted.append(np.setdiff1d(position[earlier[_identical_rows(rows["words"][earlier])[2]]],
                                                    position[first], assume_unique=True))
                    rows = rows[first]
                else:
                    rows = rows[~np.isin(rows["position"], later, assume_unique=True)]
                values = band_values(rows["words"], band, scheme.bits)
                fresh = None
                if new is not None:  # the rows of the band values that a new image has
                    mine = np.isin(values, values[new[rows["position"]]])
                    rows, values = rows[mine], values[mine]
                    fresh = new[rows["position"]]
                a, b = _close_rows(rows["words"], values, max_bits, rows["means"] if has_means else None,
                                   max_mean_gap, fresh=fresh)
                found.append(_pair_keys(rows["position"][a], rows["position"][b], total))
    return np.unique(np.concatenate(found)), np.sort(np.concatenate(demoted))


def _key_rows(keys: np.ndarray, total: int) -> np.ndarray:
    """The pool positions that ``_pair_keys`` below ``total`` name, sorted."""
    return np.unique(np.concatenate([keys // total, keys % total]))


def _uids_at(frames: Callable[[], Iterator[pd.DataFrame]], wanted: np.ndarray, total: int) -> np.ndarray:
    """One pass over the frames: the uids at the pool positions ``wanted`` (sorted), in an array over the pool
    (None elsewhere)."""
    uids = np.empty(total, dtype=object)
    start = 0
    for frame in frames():
        mine = wanted[(wanted >= start) & (wanted < start + len(frame))]
        uids[mine] = frame["uid"].to_numpy(object)[mine - start]
        start += len(frame)
    return uids


def _held(frames: Callable[[], Iterator[pd.DataFrame]], memory: int) -> tuple[list[pd.DataFrame], bool]:
    """The frames read while their signatures fit in ``memory`` bytes, and whether all of them did (else the list
    ends with the first frame past the bound)."""
    held, size = [], 0
    for frame in frames():
        held.append(frame)
        size += len(frame) * ENTRY_BYTES
        if size > memory:
            return held, False
    return held, True


def fresh_candidate_pairs(frames: Callable[[], Iterator[pd.DataFrame]], fresh: Sequence[bool], max_bits: int,
                          memory: int = COMBINE_MEMORY, max_mean_gap: float = math.inf, min_correlation: float = 0.95
                          ) -> tuple[list[tuple[str, str]], set[str]] | None:
    """The ``candidate_pairs`` of the pool that have at least one image of a fresh frame (``fresh`` flags each frame
    of ``frames``), and the uids of the earlier frames' images that are no longer the first of their identical hash
    in the pool (a fresh image before them has it): the pairs of the earlier images alone are those of the earlier
    pool, less every pair with one of those. None when the pool's banding differs from the earlier pool's, or the
    pool's signatures do not fit in ``memory`` and the fresh images' signature words alone (32 bytes each: 8
    million images in 256 MB) do not either (the whole pool is banded again). A pool beyond ``memory`` is worked
    through one band at a time (``_spilled_keys``), with the same result.

    The first image of each identical hash (in pool order) stands for it in the bands: an earlier image stays first
    unless a fresh one comes before it, and an earlier image that was not first cannot become first. A band's rows
    are those whose value a fresh first image has; of them, only pairs with a fresh image are compared."""
    held, fits = _held(frames, memory)
    if not fits:
        has_means = MEAN_COLUMNS[0] in held[0]
        held.clear()
        sizes, new_words = [], []  # the new images' signatures are held (the increment, not the pool, in memory)
        for frame, is_new in zip(frames(), itertools.chain(fresh, itertools.repeat(False))):
            sizes.append(len(frame))
            if is_new:
                new_words.append(frame[HASH_COLUMNS].to_numpy(np.uint64))
        if len(sizes) != len(fresh):
            raise ValueError(f"{len(fresh)} fresh flags for {len(sizes)} frames")
        new = np.repeat(np.asarray(fresh, dtype=bool), sizes)
        total = len(new)
        scheme = banding(total, min_correlation)
        if banding(int((~new).sum()), min_correlation) != scheme or new.sum() * WORDS * 8 > memory:
            return None
        words = np.concatenate(new_words) if new_words else np.zeros((0, WORDS), dtype=np.uint64)
        keys, demoted = _spilled_keys(frames, total, scheme, memory, has_means, max_bits, max_mean_gap, new, words)
        uids = _uids_at(frames, np.union1d(_key_rows(keys, total), demoted), total)
        return _named(keys, total, uids), set(uids[demoted].tolist())
    if len(held) != len(fresh):
        raise ValueError(f"{len(fresh)} fresh flags for {len(held)} frames")
    uids, words, means = _read_signatures(held)
    new = np.repeat(np.asarray(fresh, dtype=bool), [len(frame) for frame in held])
    scheme = banding(len(uids), min_correlation)
    if banding(int((~new).sum()), min_correlation) != scheme:
        return None
    earlier = np.flatnonzero(~new)
    firsts, copies, distinct = _identical_rows(words)
    demoted = np.setdiff1d(earlier[_identical_rows(words[earlier])[2]], distinct, assume_unique=True)
    linked = new[firsts] | new[copies]
    found = [_pair_keys(firsts[linked], copies[linked], len(uids))]
    words, fresh_rows = words[distinct], new[distinct]
    means = means[distinct] if means is not None else None
    for band in range(scheme.bands):
        values = band_values(words, band, scheme.bits)
        rows = np.flatnonzero(np.isin(values, values[fresh_rows]))
        first, second = _close_rows(words[rows], values[rows], max_bits, means[rows] if means is not None else None,
                                    max_mean_gap, fresh=fresh_rows[rows])
        found.append(_pair_keys(distinct[rows[first]], distinct[rows[second]], len(uids)))
    return _named(np.unique(np.concatenate(found)), len(uids), uids), set(uids[demoted].tolist())


def _named(keys: np.ndarray, size: int, uids: np.ndarray) -> list[tuple[str, str]]:
    """Pairs of pool positions (sorted ``_pair_keys`` below ``size``) as (smaller, larger) uid pairs, in the order
    of their positions in the pool."""
    if not len(keys):
        return []
    a, b = uids[keys // size], uids[keys % size]
    swap = np.asarray(a > b, dtype=bool)
    return list(zip(np.where(swap, b, a).tolist(), np.where(swap, a, b).tolist()))


def _spill_band(frames: Callable[[], Iterator[pd.DataFrame]], band: int, bits: int, buckets: int,
                folder: Path, wanted: pd.Index | None = None, skipped: np.ndarray | None = None) -> list[Path]:
    """One pass over ``frames``: each row's pool position, signature and means (zero without them) appended as a
    ``SPILL_ROW`` to the file of its bucket (its ``band`` value modulo ``buckets``) in ``folder``; returns the
    files written, by bucket. With ``wanted`` (distinct band values), only rows with one of them are spilled, and
    with ``skipped`` (sorted pool positions), those rows are not."""
    files: dict[int, object] = {}
    start = 0
    try:
        for frame in frames():
            words = frame[HASH_COLUMNS].to_numpy(np.uint64)
            values = band_values(words, band, bits)
            mine = slice(None)  # the frame's rows that are spilled
            if wanted is not None or skipped is not None:  # chosen before the rows are built: most are not spilled
                mine = np.ones(len(frame), dtype=bool) if wanted is None else wanted.get_indexer(values) >= 0
                if skipped is not None:  # the skipped positions within this frame's
                    low, high = np.searchsorted(skipped, [start, start + len(frame)])
                    mine[skipped[low:high] - start] = False
                mine = np.flatnonzero(mine)
                words, values = words[mine], values[mine]
            rows = np.zeros(len(words), dtype=SPILL_ROW)
            rows["position"] = np.arange(start, start + len(frame))[mine]
            rows["words"] = words
            if MEAN_COLUMNS[0] in frame:
                moments = frame[[c for c in MOMENT_COLUMNS if c in frame]].to_numpy(np.float64)[mine]
                rows["means"][:, :moments.shape[1]] = moments
            start += len(frame)
            bucket_of = values % buckets
            order = np.argsort(bucket_of, kind="stable")
            for part in np.split(order, np.flatnonzero(np.diff(bucket_of[order])) + 1) if len(order) else []:
                bucket = int(bucket_of[part[0]])
                if bucket not in files:
                    files[bucket] = open(folder / f"{bucket}.rows", "wb")  # noqa: SIM115 (closed below)
                files[bucket].write(rows[part].tobytes())
    finally:
        for file in files.values():
            file.close()
    return [folder / f"{bucket}.rows" for bucket in sorted(files)]


def checked_pairs(pairs: list[tuple[str, str]], mapped: Callable[[], Iterator[pd.DataFrame]], max_distance: float,
                  min_correlation: float) -> list[tuple[str, str]]:
    """The candidate ``pairs`` whose thumbnails are ``similar`` (the thumbnails of candidates only are read, in one
    pass over the map outputs)."""
    if not pairs:
        return []
    both = np.array(pairs, dtype=object).reshape(len(pairs), 2)
    wanted = pd.Index(pd.unique(both.ravel()))  # its hash table is built once, not per shard
    thumbs = np.zeros((len(wanted), THUMB_BYTES), dtype=np.uint8)
    for frame in mapped():
        at = wanted.get_indexer(frame["uid"])
        mine = frame["hashed"].astype(bool).to_numpy() & (at >= 0)
        if mine.any():
            thumbs[at[mine]] = np.frombuffer(b"".join(frame["thumb"][mine]), dtype=np.uint8).reshape(-1, THUMB_BYTES)
    first, second = wanted.get_indexer(both[:, 0]), wanted.get_indexer(both[:, 1])
    keep = np.zeros(len(pairs), dtype=bool)
    for start in range(0, len(pairs), CHECK_CHUNK):  # a chunk at a time: the arithmetic holds ~4 KB a pair
        end = start + CHECK_CHUNK
        keep[start:end] = similar(thumbs[first[start:end]], thumbs[second[start:end]], max_distance, min_correlation)
    return [pairs[i] for i in np.flatnonzero(keep)]


def linked_state(pairs: list[tuple[str, str]]) -> dict:
    """A near-duplicate state: every linked pair (``pairs``, (smaller, larger) uids, as ``PAIR_COLUMNS`` sorted) and
    the ``losers`` of their clusters (uid and winner, by uid). The pairs let new shards be added to it."""
    table = clusters(pairs)
    linked = sorted(set(pairs))
    return {"losers": table[table["uid"] != table["winner"]].reset_index(drop=True),
            "pairs": pd.DataFrame({PAIR_COLUMNS[0]: pd.Series([a for a, _ in linked], dtype=object),
                                   PAIR_COLUMNS[1]: pd.Series([b for _, b in linked], dtype=object)})}


class NearDupStep(PoolStep):
    """Near-duplicate images across the whole pool (blurred thumbnails, SimHash banding, a check on both
    thumbnails); the smallest uid of each cluster is kept. ``filter.near_duplicate_distance: null`` keeps
    everything."""

    name = "neardup"
    section = "filter"
    reasons = (NEAR_DUPLICATE_REASON,)
    needs = ("shard", "key")
    map_columns = {c: pa.uint64() for c in HASH_COLUMNS} | {"thumb": pa.binary(), "hashed": pa.bool_()}
    # The banding grows with the pool (``banding``); pools below 2**16 signatures band as 16 x 16 bits did alone.
    combine_method = {"banding": "16 x 16 bits below 2**16 signatures, else log2(pool) bits",
                      "state": "losers and linked pairs"}
    _losers: tuple[dict, pd.Series] | None = None

    def __init__(self, params, context):
        super().__init__(params, context)
        self.shards = ShardReader(context.shards_dir)

    @classmethod
    def fingerprint(cls, params, context, phase="apply"):
        distance = params.near_duplicate_distance
        # The thumbnails depend only on whether the step looks at images at all; the decisions on the thresholds.
        part = ({"hashing": distance is not None, "partial": ["signature", "channel_means", "channel_stds"]}
                if phase == "map" else
                {"near_duplicate_distance": distance, "min_correlation": params.near_duplicate_min_correlation})
        method = {"work_side": WORK_SIDE, "blur": BLUR, "thumb_side": THUMB_SIDE, "signature_bits": SIGNATURE_BITS,
                  "band_bits": BAND_BITS, "flat_level_step": FLAT_LEVEL_STEP}
        return super().fingerprint({**part, **method}, context, phase)

    def map(self, batch: pd.DataFrame) -> pd.DataFrame:
        thumbs = np.zeros((len(batch), THUMB_BYTES), dtype=np.uint8)
        hashed = np.zeros(len(batch), dtype=bool)
        if self.params.near_duplicate_distance is not None:
            for i, (shard, key) in enumerate(zip(batch["shard"], batch["key"])):
                value = thumbnail(self.shards.read(shard_file_name(shard), key, "jpg"))
                if value is not None:
                    thumbs[i], hashed[i] = value, True
        words = np.where(hashed[:, None], signatures(thumbs), np.uint64(0))
        stored = [row.tobytes() if ok else b"" for row, ok in zip(thumbs, hashed)]
        return pd.DataFrame({"uid": batch["uid"].to_numpy(), **{c: words[:, i] for i, c in enumerate(HASH_COLUMNS)},
                             "thumb": stored, "hashed": hashed})

    def partial(self, mapped: pd.DataFrame) -> pd.DataFrame:
        """The shard's images with a thumbnail: uid, signature words and the thumbnail's channel moments."""
        return signature_frame(mapped)

    @classmethod
    def combine(cls, params, partials: Callable[[], Iterator[pd.DataFrame]],
                mapped: Callable[[], Iterator[pd.DataFrame]]) -> dict:
        """The winner of every uid in a near-duplicate cluster: candidates by banding, then the thumbnail check."""
        if params.near_duplicate_distance is None:
            return {}
        # The candidates are also pruned by the thumbnails' channel means and standard deviations, which two images
        # within near_duplicate_distance cannot differ by more than mean_gap (the check below would reject those
        # pairs; with them in, a crawl of look-alike layouts has many candidates). Only the check reads thumbnails.
        pairs = candidate_pairs(partials,
                                candidate_bits(params.near_duplicate_min_correlation),
                                max_mean_gap=mean_gap(params.near_duplicate_distance),
                                min_correlation=params.near_duplicate_min_correlation)
        pairs = checked_pairs(pairs, mapped, params.near_duplicate_distance, params.near_duplicate_min_correlation)
        return linked_state(pairs)

    @classmethod
    def combine_more(cls, params, previous: dict, partials: Callable[[], Iterator[pd.DataFrame]],
                     mapped: Callable[[], Iterator[pd.DataFrame]], fresh: Sequence[bool]) -> dict | None:
        """The earlier pool's linked pairs (``previous``), less those of an image no longer first of its identical
        hash, plus the checked candidates with a new image (``fresh_candidate_pairs``): the pairs, and so the
        clusters, of the whole pool, at the cost of the new images' comparisons (in memory or, for a pool beyond the
        driver's bound, one band at a time). None (band the whole pool) when the pool's banding changed with its
        size."""
        if params.near_duplicate_distance is None or "pairs" not in previous:
            return None
        found = fresh_candidate_pairs(partials, fresh, candidate_bits(params.near_duplicate_min_correlation),
                                      max_mean_gap=mean_gap(params.near_duplicate_distance),
                                      min_correlation=params.near_duplicate_min_correlation)
        if found is None:
            return None
        candidates, demoted = found
        pairs = checked_pairs(candidates, mapped, params.near_duplicate_distance,
                              params.near_duplicate_min_correlation)
        earlier = previous["pairs"]
        kept = ~(earlier[PAIR_COLUMNS[0]].isin(demoted) | earlier[PAIR_COLUMNS[1]].isin(demoted)).to_numpy()
        return linked_state(list(zip(earlier[PAIR_COLUMNS[0]][kept], earlier[PAIR_COLUMNS[1]][kept])) + pairs)

    def decide(self, mapped: pd.DataFrame, state: dict) -> pd.DataFrame:
        if "losers" not in state:
            return decisions(mapped["uid"], [None] * len(mapped))
        if self._losers is None or self._losers[0] is not state:  # indexed once per state and process
            self._losers = (state, state["losers"].set_index("uid")["winner"])
        # the index's hash table is built once per state (isin would hash every loser again for each shard)
        loser = self._losers[1].index.get_indexer(mapped["uid"]) >= 0
        return decisions(mapped["uid"], np.where(loser, NEAR_DUPLICATE_REASON, None))

    @classmethod
    def expectations(cls, params, table: pd.DataFrame, step_dir: str) -> list:
        """A near-duplicate drop never takes a whole cluster: the kept winner of each dropped uid reached the step
        and was kept (checked from the stored state)."""
        import great_expectations as gx

        from clipmill.components.common.storage import location, read_frame

        losers_path = location(step_dir) / "state" / "losers.parquet"
        if params.near_duplicate_distance is None or not losers_path.exists():
            return []
        losers = read_frame(losers_path)
        kept = set(table.loc[table["keep"].astype(bool), "uid"])
        check = pd.DataFrame({"uid": losers["uid"], "winner_kept": losers["winner"].isin(kept)})
        return [("near_duplicate_winners", check, [
            gx.expectations.ExpectColumnValuesToBeInSet(column="winner_kept", value_set=[True]),
        ])]
