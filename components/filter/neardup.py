"""The near-duplicate step: images that are the same picture re-encoded, rescaled or slightly edited.

Map: a perceptual hash of each image (``imagehash.phash`` with ``HASH_SIZE`` x ``HASH_SIZE`` bits, images read
from the download shards by shard and key). Partial: the shard's (uid, hash) rows. Combine: locality-sensitive
banding: the hash is cut into ``BAND_BITS``-bit bands and only images that share a band are compared (never all
pairs); pairs within ``filter.near_duplicate_distance`` bits are linked, and the linked images form clusters
(connected components). The combine works one band and one band-value bucket at a time, so the driver holds a
``1/COMBINE_BUCKETS`` share of the pool's hashes, not all of them. Decide: every cluster keeps its smallest uid;
the others are dropped as ``near_duplicate_image``. An image that does not decode gets no hash and is kept here
(the score step drops it with its own reason).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import imagehash
import numpy as np
import pandas as pd
import pyarrow as pa

from clipmill.components.common.images import ImageError, decode_image
from clipmill.components.common.log import get_logger
from clipmill.components.common.shards import ShardReader, shard_file_name
from clipmill.components.common.steps import PoolStep, decisions

NEAR_DUPLICATE_REASON = "near_duplicate_image"
HASH_SIZE = 16           # pHash of 16 x 16 = 256 bits
WORDS = HASH_SIZE * HASH_SIZE // 64
BAND_BITS = 16           # 16 bands of 16 bits: a pair within 24 bits shares a band with probability ~0.98
COMBINE_BUCKETS = 8
HASH_COLUMNS = [f"phash{i}" for i in range(WORDS)]
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

log = get_logger("neardup")


def image_hash(data: bytes) -> np.ndarray | None:
    """The 256-bit perceptual hash of encoded image ``data`` as WORDS uint64 words; None when it does not decode."""
    try:
        image = decode_image(data)
    except ImageError as e:
        log.warning("image skipped: %s", e)
        return None
    bits = imagehash.phash(image, hash_size=HASH_SIZE).hash.flatten()
    return np.packbits(bits).view(">u8").astype(np.uint64)


def hamming(words: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Bit differences between each row of ``words`` (n x WORDS uint64) and the row ``other``."""
    diff = np.ascontiguousarray(words ^ other).view(np.uint8)
    return _POPCOUNT[diff].reshape(len(words), -1).sum(axis=1)


def band_values(words: np.ndarray, band: int) -> np.ndarray:
    """The value of ``band`` (BAND_BITS bits) of every hash."""
    per_word = 64 // BAND_BITS
    word, shift = divmod(band, per_word)
    return ((words[:, word] >> np.uint64(shift * BAND_BITS)) & np.uint64((1 << BAND_BITS) - 1)).astype(np.int64)


def linked_pairs(uids: np.ndarray, words: np.ndarray, keys: np.ndarray, max_distance: int) -> list[tuple[str, str]]:
    """(uid, uid) pairs that link every two images sharing a band value in ``keys`` and differing in at most
    ``max_distance`` bits (images with identical hashes are linked to the first of them, then compared once)."""
    pairs = []
    if not len(uids):
        return pairs
    _, first, inverse = np.unique(words, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    copies = np.flatnonzero(first[inverse] != np.arange(len(uids)))
    pairs.extend(zip(uids[first[inverse[copies]]], uids[copies]))
    keep = np.sort(first)
    order = keep[np.argsort(keys[keep], kind="stable")]
    keys, uids, words = keys[order], uids[order], words[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    for start, end in zip(starts, ends):
        for i in range(start, end - 1):
            close = np.flatnonzero(hamming(words[i + 1:end], words[i]) <= max_distance) + i + 1
            pairs.extend((uids[i], uids[j]) for j in close)
    return pairs


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


class NearDupStep(PoolStep):
    """Near-duplicate images across the whole pool (perceptual hash + banding); the smallest uid of each cluster
    is kept. ``filter.near_duplicate_distance: null`` keeps everything."""

    name = "neardup"
    section = "filter"
    reasons = (NEAR_DUPLICATE_REASON,)
    needs = ("shard", "key")
    map_columns = {c: pa.uint64() for c in HASH_COLUMNS} | {"hashed": pa.bool_()}
    _losers: tuple[dict, pd.Series] | None = None

    def __init__(self, params, context):
        super().__init__(params, context)
        self.shards = ShardReader(context.shards_dir)

    @classmethod
    def fingerprint(cls, params, context, phase="apply"):
        distance = params.near_duplicate_distance
        # The hashes depend only on whether the step hashes at all; the decisions on the distance (and the state).
        part = {"hashing": distance is not None} if phase == "map" else {"near_duplicate_distance": distance}
        return super().fingerprint({**part, "hash_size": HASH_SIZE, "band_bits": BAND_BITS}, context, phase)

    def map(self, batch: pd.DataFrame) -> pd.DataFrame:
        words = np.zeros((len(batch), WORDS), dtype=np.uint64)
        hashed = np.zeros(len(batch), dtype=bool)
        if self.params.near_duplicate_distance is not None:
            for i, (shard, key) in enumerate(zip(batch["shard"], batch["key"])):
                value = image_hash(self.shards.read(shard_file_name(shard), key, "jpg"))
                if value is not None:
                    words[i], hashed[i] = value, True
        return pd.DataFrame({"uid": batch["uid"].to_numpy(), **{c: words[:, i] for i, c in enumerate(HASH_COLUMNS)},
                             "hashed": hashed})

    def partial(self, mapped: pd.DataFrame) -> pd.DataFrame:
        """The shard's hashed images: uid and hash words (32 bytes a sample)."""
        return mapped.loc[mapped["hashed"], ["uid", *HASH_COLUMNS]].reset_index(drop=True)

    @classmethod
    def combine(cls, params, partials: Callable[[], Iterator[pd.DataFrame]],
                mapped: Callable[[], Iterator[pd.DataFrame]]) -> dict:
        """The winner of every uid in a near-duplicate cluster, one (band, bucket) at a time."""
        if params.near_duplicate_distance is None:
            return {}
        pairs: list[tuple[str, str]] = []
        for band in range(HASH_SIZE * HASH_SIZE // BAND_BITS):
            for bucket in range(COMBINE_BUCKETS):
                uids, words, keys = [], [], []
                for partial in partials():
                    part_words = partial[HASH_COLUMNS].to_numpy(np.uint64)
                    values = band_values(part_words, band)
                    mine = values % COMBINE_BUCKETS == bucket
                    uids.append(partial["uid"].to_numpy(object)[mine])
                    words.append(part_words[mine])
                    keys.append(values[mine])
                if uids:
                    pairs += linked_pairs(np.concatenate(uids), np.concatenate(words), np.concatenate(keys),
                                          params.near_duplicate_distance)
        table = clusters(pairs)
        return {"losers": table[table["uid"] != table["winner"]].reset_index(drop=True)}

    def decide(self, mapped: pd.DataFrame, state: dict) -> pd.DataFrame:
        if "losers" not in state:
            return decisions(mapped["uid"], [None] * len(mapped))
        if self._losers is None or self._losers[0] is not state:  # indexed once per state and process
            self._losers = (state, state["losers"].set_index("uid")["winner"])
        loser = mapped["uid"].isin(self._losers[1].index).to_numpy()
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
