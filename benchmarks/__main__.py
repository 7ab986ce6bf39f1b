"""`make bench`: every throughput benchmark, each a ratio of clipmill's stage to the bare library in one run.

    python -m benchmarks            # all of them (the download and rewrite_llm ones need the demo's outputs: run
                                    # `make demo` first; the gpu one runs only where torch sees a CUDA device)
    python -m benchmarks.<name> -h  # one of them, with its options
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from . import (
    curate_bench,
    download_bench,
    gpu_bench,
    incremental_bench,
    match_bench,
    neardup_bench,
    rewrite_llm_bench,
    score_bench,
    train_bench,
)

BENCHES = {"match": match_bench, "score": score_bench, "train": train_bench, "download": download_bench,
           "curate": curate_bench, "incremental": incremental_bench, "neardup": neardup_bench, "gpu": gpu_bench,
           "rewrite_llm": rewrite_llm_bench}


def main() -> int:
    results = {}
    for name, module in BENCHES.items():
        if name == "download" and not Path("data/crawl/urls.parquet").exists():
            print("download: skipped (no data/crawl/urls.parquet; run `make demo` first)", file=sys.stderr)
            continue
        if name == "rewrite_llm" and not Path("data/curate/steps/balance/crawl").is_dir():
            print("rewrite_llm: skipped (no data/curate/steps/balance/crawl; run `make demo` first)", file=sys.stderr)
            continue
        if name == "gpu" and not torch.cuda.is_available():
            print("gpu: skipped (no CUDA device; `python -m benchmarks.gpu_bench -h` has a CPU smoke run)",
                  file=sys.stderr)
            continue
        print(f"== {name}", file=sys.stderr)
        results[name] = module.main([])
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
