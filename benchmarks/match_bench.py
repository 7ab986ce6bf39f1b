"""MetaCLIP matching throughput: the balance stage's Aho-Corasick matcher next to MetaCLIP's plain loop.

Two metadata lists: the shipped default (components/balance/metadata/default.txt) and a synthetic 500k-entry
list (the size of MetaCLIP's metadata.json). Both matchers run in the same process on the same captions; the
plain loop (every " entry " tested with ``in`` against the spaced text) runs on a prefix of the captions, since
it is slow, and its matches are checked to be identical to the automaton's.

    python -m benchmarks.match_bench [--texts 20000] [--loop-texts 300] [--out reports/bench/match.json]
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from clipmill.components.balance.matching import EntryMatcher, read_metadata
from clipmill.components.balance.params import DEFAULT_METADATA
from clipmill.components.common.text import spaced_text

SYNTHETIC_ENTRIES = 500_000
FILLER = ["a", "the", "on", "of", "with", "in", "and", "photo", "image", "-", ",", ".", "|", "IMG_0042.jpg"]


def captions(entries: list[str], n: int, seed: int = 0) -> list[str]:
    """Web-like captions: 6-20 tokens drawn from the entries' words and filler, with punctuation."""
    rng = random.Random(seed)
    words = [w for e in entries[:20000] for w in e.split()]
    return [" ".join(rng.choice(words) if rng.random() < 0.6 else rng.choice(FILLER)
                     for _ in range(rng.randint(6, 20))) for _ in range(n)]


def synthetic_entries(base: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` distinct entries: the base list, then random word bigrams and trigrams of it."""
    rng = random.Random(seed)
    words = [e for e in base if " " not in e]
    entries = dict.fromkeys(base)
    while len(entries) < n:
        entries[" ".join(rng.choice(words) for _ in range(rng.choice((2, 2, 3))))] = None
    return list(entries)[:n]


def plain_loop(texts: list[str], entries: list[str]) -> list[list[int]]:
    spaced_entries = [f" {e} " for e in entries]
    out = []
    for text in texts:
        spaced = spaced_text(text)
        out.append([i for i, e in enumerate(spaced_entries) if e in spaced])
    return out


def bench(name: str, entries: list[str], texts: list[str], loop_texts: int) -> dict:
    started = time.perf_counter()
    matcher = EntryMatcher(entries)
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    automaton_matches = [matcher.match(t) for t in texts]
    automaton_s = time.perf_counter() - started
    subset = texts[:loop_texts]
    started = time.perf_counter()
    loop_matches = plain_loop(subset, entries)
    loop_s = time.perf_counter() - started
    if loop_matches != automaton_matches[:loop_texts]:
        raise AssertionError(f"{name}: the automaton and the plain loop disagree")
    result = {
        "metadata": name, "entries": len(entries), "automaton_build_s": round(build_s, 3),
        "automaton_texts": len(texts), "automaton_texts_per_s": round(len(texts) / automaton_s, 1),
        "loop_texts": len(subset), "loop_texts_per_s": round(len(subset) / loop_s, 1),
        "mean_matches_per_text": round(sum(map(len, automaton_matches)) / len(texts), 2),
    }
    result["speedup"] = round(result["automaton_texts_per_s"] / result["loop_texts_per_s"], 1)
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=20000, help="captions matched by the automaton")
    parser.add_argument("--loop-texts", type=int, default=300, help="captions matched by the plain loop")
    parser.add_argument("--out", default="reports/bench/match.json", help="results (JSON)")
    args = parser.parse_args(argv)
    default = read_metadata(DEFAULT_METADATA)
    texts = captions(default, args.texts)
    results = [bench("default", default, texts, args.loop_texts),
               bench(f"synthetic-{SYNTHETIC_ENTRIES // 1000}k", synthetic_entries(default, SYNTHETIC_ENTRIES), texts,
                     max(1, args.loop_texts // 10))]
    for r in results:
        print(f"{r['metadata']:>15}: {r['entries']:>7} entries | automaton {r['automaton_texts_per_s']:>10.1f} texts/s "
              f"(build {r['automaton_build_s']} s) | plain loop {r['loop_texts_per_s']:>8.1f} texts/s | "
              f"speedup x{r['speedup']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
