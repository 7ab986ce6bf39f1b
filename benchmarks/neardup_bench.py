"""The near-duplicate combine as the pool grows: log2(pool)-bit bands against fixed 16-bit bands.

Synthetic partials (random 256-bit signatures, every tenth with a planted near copy 26 bits away: the expected
distance at correlation 0.95) of growing size go through ``candidate_pairs`` twice in the same process: with the
banding the step uses (``banding``: 16 x 16 bits below 2**16 signatures, bands of ceil(log2(pool)) bits above) and
with 16 bands of 16 bits at every size. Reported per size: seconds, Hamming comparisons per signature, the share of
planted pairs found, and the exponent b of seconds ~ pool**b between sizes. No pixels are read: the map's thumbnails
cost the same either way. The largest size also runs through the out-of-core path (a 64 MB bound: a pass per band
spilling rows to buckets) to time it against the in-memory one, and adds its last ``--new-fraction`` of shards to
the earlier pool's candidates out of core (a weekly increment's ``combine_more``) to time that against banding the
whole pool again.

    python -m benchmarks.neardup_bench [--sizes 65536 262144 1048576] [--spill-memory 67108864]
                                       [--new-fraction 0.2] [--out reports/bench/neardup.json]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

PLANTED_FLIPS = 26


def _partials(pool: int, seed: int = 0, shard: int = 10_000) -> tuple[list[pd.DataFrame], int]:
    """Per-shard partials of ``pool`` signatures, a tenth of them planted near copies of another; and how many."""
    from clipmill.components.filter.neardup import HASH_COLUMNS, WORDS

    rng = np.random.default_rng(seed)
    words = rng.integers(0, 2**64, size=(pool, WORDS), dtype=np.uint64)
    planted = pool // 10
    bits = np.unpackbits(words[:planted].view(np.uint8), axis=1, bitorder="little")
    rows = np.arange(planted)[:, None]
    bits[rows, np.argsort(rng.random((planted, 256)), axis=1)[:, :PLANTED_FLIPS]] ^= 1
    words[pool - planted:] = np.packbits(bits, axis=1, bitorder="little").view(np.uint64)
    uids = np.array([f"{i:012d}" for i in range(pool)], dtype=object)
    frame = pd.DataFrame({"uid": uids, **{c: words[:, i] for i, c in enumerate(HASH_COLUMNS)}})
    return [frame.iloc[i:i + shard].reset_index(drop=True) for i in range(0, pool, shard)], planted


def _run(parts: list[pd.DataFrame], planted: int, pool: int, fixed: bool, memory: int | None = None) -> dict:
    from clipmill.components.filter import neardup

    compared = []
    real_hamming, real_banding = neardup.hamming, neardup.banding
    neardup.hamming = lambda a, b: compared.append(len(a)) or real_hamming(a, b)
    if fixed:
        neardup.banding = lambda n, c: neardup.Banding()
    try:
        started = time.perf_counter()
        kwargs = {"memory": memory} if memory else {}
        pairs = neardup.candidate_pairs(lambda: iter(parts), neardup.candidate_bits(0.95), **kwargs)
        seconds = time.perf_counter() - started
        scheme = neardup.banding(pool, 0.95)
    finally:
        neardup.hamming, neardup.banding = real_hamming, real_banding
    found = sum(int(b) - int(a) == pool - planted for a, b in pairs)
    return {"seconds": seconds, "bits": scheme.bits, "bands": scheme.bands, "candidates": len(pairs),
            "comparisons_per_signature": sum(compared) / pool, "planted_found": found / planted}


def _added(parts: list[pd.DataFrame], new_fraction: float, memory: int) -> dict:
    """The out-of-core combine of a weekly increment: the last ``new_fraction`` of the shards added to the earlier
    pool's candidates (``fresh_candidate_pairs``, as ``combine_more`` calls it) against the whole pool banded again;
    the earlier pool's own candidates are found first, untimed, as the last run stored them."""
    from clipmill.components.filter import neardup

    fresh = [i >= len(parts) - max(1, round(new_fraction * len(parts))) for i in range(len(parts))]
    bits = neardup.candidate_bits(0.95)
    earlier = neardup.candidate_pairs(lambda: iter([p for p, f in zip(parts, fresh) if not f]), bits, memory=memory)
    compared = []
    real_hamming = neardup.hamming
    neardup.hamming = lambda a, b: compared.append(len(a)) or real_hamming(a, b)
    try:
        started = time.perf_counter()
        found = neardup.fresh_candidate_pairs(lambda: iter(parts), fresh, bits, memory=memory)
        seconds = time.perf_counter() - started
    finally:
        neardup.hamming = real_hamming
    if found is None:
        return {"skipped": "the earlier pool and the grown one band differently (another --new-fraction)"}
    pairs, demoted = found
    candidates = {p for p in earlier if not demoted & set(p)} | set(pairs)
    pool = sum(len(p) for p in parts)
    return {"seconds": seconds, "new": sum(len(p) for p, f in zip(parts, fresh) if f), "memory": memory,
            "candidates": len(candidates), "comparisons_per_signature": sum(compared) / pool}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[65536, 262144, 1048576], help="pool sizes")
    parser.add_argument("--spill-memory", type=int, default=64 * 2**20,
                        help="the driver's bound in bytes for the out-of-core run of the largest size")
    parser.add_argument("--new-fraction", type=float, default=0.2,
                        help="the share of the largest pool's shards added to its earlier pool out of core")
    parser.add_argument("--out", default="reports/bench/neardup.json", help="results JSON")
    args = parser.parse_args(argv)
    results = []
    for pool in args.sizes:
        parts, planted = _partials(pool)
        row = {"pool": pool, "scaled": _run(parts, planted, pool, fixed=False),
               "fixed_16": _run(parts, planted, pool, fixed=True)}
        results.append(row)
        print(f"pool {pool:>9,}: log2 bands {row['scaled']['bands']} x {row['scaled']['bits']} bits "
              f"{row['scaled']['seconds']:.1f} s ({row['scaled']['comparisons_per_signature']:.1f} comparisons a "
              f"signature, planted found {row['scaled']['planted_found']:.3f}); 16 x 16 bits "
              f"{row['fixed_16']['seconds']:.1f} s ({row['fixed_16']['comparisons_per_signature']:.1f}, "
              f"{row['fixed_16']['planted_found']:.3f})", flush=True)
    for kind in ("scaled", "fixed_16"):
        for small, large in zip(results, results[1:]):
            large[kind]["exponent"] = (math.log(large[kind]["seconds"] / small[kind]["seconds"])
                                       / math.log(large["pool"] / small["pool"]))
    largest = results[-1]["pool"]
    parts, planted = _partials(largest)
    spilled = _run(parts, planted, largest, fixed=False, memory=args.spill_memory)
    spilled["memory"] = args.spill_memory
    spilled["same_candidates"] = spilled["candidates"] == results[-1]["scaled"]["candidates"]
    results[-1]["scaled_out_of_core"] = spilled
    print(f"pool {largest:,} out of core ({args.spill_memory / 2**20:g} MB): {spilled['seconds']:.1f} s, same "
          f"candidates: {spilled['same_candidates']}")
    added = _added(parts, args.new_fraction, args.spill_memory)
    results[-1]["added_out_of_core"] = added
    if "skipped" in added:
        print(f"pool {largest:,} out of core, added: skipped, {added['skipped']}")
    else:
        added["same_candidates"] = added["candidates"] == spilled["candidates"]
        print(f"pool {largest:,} out of core, the last {added['new']:,} signatures added to the earlier pool's "
              f"candidates: {added['seconds']:.1f} s against {spilled['seconds']:.1f} s whole "
              f"({added['comparisons_per_signature']:.1f} comparisons a signature), same candidates: "
              f"{added['same_candidates']}")
    print("exponents (seconds ~ pool^b): " + ", ".join(
        f"{r['pool']:,}: log2 bands {r['scaled']['exponent']:.2f}, 16-bit {r['fixed_16']['exponent']:.2f}"
        for r in results[1:]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return {"sizes": results}


if __name__ == "__main__":
    main()
