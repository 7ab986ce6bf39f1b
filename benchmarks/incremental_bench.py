"""Increments, not recomputation: a weekly run that appends new URLs against the first run, on the demo crawl.

Run 1 downloads and curates the demo crawl (``--pairs`` URLs). Run 2 appends a new batch of the synthetic crawl
(``--new-fraction`` of that, same sites and defect rates) and runs download + curate again in the same output
directories: only the new list is fetched, only the new shards are ruled, scored, matched and rewritten, and
the pool steps recombine their partials. A third, from-scratch curation of run 2's download checks that the
increment gives exactly the same kept uids, scores and entry counts. Each stage runs as its own process
(`clipmill stage ...`, interpreter start included), as `dvc repro` runs it.

    python -m benchmarks.incremental_bench [--pairs 4000] [--new-fraction 0.25] [--out reports/bench/incremental.json]
        [-S download.processes_count=16] [--workdir DIR]

A ``--workdir`` that holds the crawl of an earlier run with the same ``--pairs``, ``--new-fraction``, seed and
``demo_corpus`` params is used again as it is (generating 192,000 pairs takes minutes); its download and curation
outputs are made anew.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]


def _clipmill(*args: str, params: Path, cwd: Path) -> float:
    """Seconds of one `clipmill` command in its own process."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "clipmill.cli", *args[:2], "--params", str(params), *args[2:]],
                   cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def _run(work: Path, params: Path, curate_out: str, download: bool = True) -> tuple[dict, dict]:
    """(seconds of each stage's process, where they went: img2dataset's share of the download and each curation
    step's, as the stages record them in ``download/run.json`` and ``<curate_out>/timings.json``)."""
    seconds, parts = {}, {}
    if download:
        seconds["download"] = _clipmill("stage", "download", "--urls", "crawl/urls.parquet", "--additions",
                                        "additions", "--out", "download", "--overwrite", params=params, cwd=work)
        record = json.loads((work / "download" / "run.json").read_text())
        parts["download"] = {"fetch_and_finish": record["download_seconds"], "stage": record["wall_seconds"]}
    seconds["curate"] = _clipmill("stage", "curate", "--manifest", "download/manifest.parquet", "--shards",
                                  "download/shards", "--bootstrap-model", "scorer", "--out", curate_out,
                                  params=params, cwd=work)
    timings = json.loads((work / curate_out / "timings.json").read_text())
    parts["curate"] = {"split": timings["split_seconds"], "stage": timings["wall_seconds"],
                       **{step: t["wall_seconds"] for step, t in timings["steps"].items()}}
    # how each pool step's state was made (stored, added to, or combined whole) and its seconds
    parts["combines"] = {step: t["combine"] for step, t in timings["steps"].items() if "combine" in t}
    return seconds, parts


def _excess_table(second: dict, scratch: dict, share: float) -> list[str]:
    """Run 2's curation per step against its share of the from-scratch curation of the union (``share``: the new
    URLs' fraction of it): what the increment pays beyond its own samples."""
    lines = [f"run 2's curation per step, against {share:.2f} x the from-scratch run's (s):"]
    for step, seconds in second.items():
        own = share * scratch.get(step, 0.0)
        lines.append(f"  {step:<10} {seconds:7.2f}  share {own:7.2f}  excess {seconds - own:+7.2f}")
    return lines


def _tables(curate_dir: Path) -> dict[str, pd.DataFrame]:
    from clipmill.components.common.curation import read_step_table

    summary = json.loads((curate_dir / "summary.json").read_text())
    out = {}
    for step in (s["step"] for s in summary["steps"]):
        table = read_step_table(curate_dir, step)
        out[step] = table.drop(columns=[c for c in ("rewrite_dropped",) if c in table]).sort_values("uid") \
            .reset_index(drop=True).astype(str)
    counts = curate_dir / "steps" / "balance" / "entry_counts.parquet"
    if counts.exists():
        out["entry_counts"] = pd.read_parquet(counts).sort_values("entry").reset_index(drop=True)
    return out


RUN_OUTPUTS = ("additions", "download", "curate", "curate_scratch")


def _prepare(work: Path, pairs: int, new_pairs: int, overrides: list[str]) -> tuple[Path, bool]:
    """The runs' params (params.yaml with ``overrides``) and the crawl, generated unless ``work`` holds the same one
    already (True then); the outputs of earlier runs in ``work`` are removed."""
    import torch

    from clipmill.components.ablate.variants import apply_overrides
    from clipmill.components.common.model import create_clip, export_local_dir
    from clipmill.components.demo_corpus.corpus import generate_crawl_batch, generate_demo_corpus
    from clipmill.params import parse_params

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["tracking"] = {"enabled": False}
    data["balance"]["metadata"] = str(REPO / data["balance"]["metadata"])
    data["download"]["mirrors"][0]["dir"] = "crawl/web"  # the runs' working directory is ``work``
    apply_overrides(data, overrides)
    params = parse_params(data, "params.yaml with -S overrides")  # a bad override stops here, before any work
    crawl = {"pairs": pairs, "new_pairs": new_pairs, "seed": params.project.seed,  # what the crawl is made from
             "demo_corpus": params.demo_corpus.model_dump(mode="json"), "scorer": params.score.bootstrap.model}
    stamp = work / "crawl.json"
    reused = stamp.is_file() and json.loads(stamp.read_text()) == crawl
    for name in RUN_OUTPUTS:
        shutil.rmtree(work / name, ignore_errors=True)
    if not reused:
        stamp.unlink(missing_ok=True)
        corpus = params.demo_corpus.model_copy(update={"num_pairs": pairs, "zeroshot_per_class": 1,
                                                       "retrieval_size": 1, "trusted_size": 1})
        generate_demo_corpus(corpus, params.project.seed, work / "crawl", work / "eval", work / "trusted")
        generate_crawl_batch(corpus, params.project.seed, 1, new_pairs, work / "batch1")
        torch.manual_seed(0)
        export_local_dir(create_clip(params.score.bootstrap.model), work / "scorer")
        stamp.write_text(json.dumps(crawl) + "\n")
    (work / "additions").mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(data))
    return work / "params.yaml", reused


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4000, help="URLs of the first run's crawl")
    parser.add_argument("--new-fraction", type=float, default=0.25, help="new URLs appended for run 2, as a fraction")
    parser.add_argument("--workdir", default=None, help="keep the crawl and the runs here; a crawl made there before "
                        "with the same settings is used again (default: a temporary directory)")
    parser.add_argument("--out", default="reports/bench/incremental.json", help="results JSON")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param of both runs, e.g. -S download.processes_count=16 (repeatable)")
    args = parser.parse_args(argv)
    from clipmill.components.download.additions import append_url_list

    with tempfile.TemporaryDirectory(prefix="clipmill-incremental-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        new_pairs = int(round(args.pairs * args.new_fraction))
        params, reused = _prepare(work, args.pairs, new_pairs, args.overrides)
        first, first_parts = _run(work, params, "curate")
        append_url_list(work / "batch1" / "urls.parquet", work / "additions",
                        now=dt.datetime(2026, 12, 7, 3, 0, tzinfo=dt.UTC))
        second, second_parts = _run(work, params, "curate")
        scratch, scratch_parts = _run(work, params, "curate_scratch", download=False)
        incremental, from_scratch = _tables(work / "curate"), _tables(work / "curate_scratch")
        equal = {name: bool(incremental[name].equals(from_scratch[name])) for name in from_scratch}
        summary = json.loads((work / "curate" / "summary.json").read_text())
        download = json.loads((work / "download" / "summary.json").read_text())
        result = {
            "pairs": args.pairs, "new_pairs": new_pairs, "overrides": args.overrides, "crawl_reused": reused,
            "first_s": first, "second_s": second,
            "scratch_curate_s": scratch["curate"],
            "ratio_total": sum(second.values()) / sum(first.values()),
            "ratio_download": second["download"] / first["download"],
            "ratio_curate": second["curate"] / first["curate"],
            "ratio_curate_vs_scratch": second["curate"] / scratch["curate"],
            "equal_to_from_scratch": equal, "lists_fetched": download["lists_fetched"],
            "lists_reused": download["lists_reused"], "shards": summary["shards"], "kept": summary["kept"],
            "first_parts_s": first_parts, "second_parts_s": second_parts, "scratch_parts_s": scratch_parts,
        }
    print(f"run 1 ({args.pairs} URLs): download {first['download']:.1f} s, curate {first['curate']:.1f} s")
    print(f"run 2 (+{new_pairs} URLs): download {second['download']:.1f} s, curate {second['curate']:.1f} s "
          f"-> ratio {result['ratio_total']:.3f} of run 1 (download {result['ratio_download']:.3f}, curate "
          f"{result['ratio_curate']:.3f}); from-scratch curate {scratch['curate']:.1f} s")
    print("increment equals from-scratch: " + ", ".join(f"{k}={v}" for k, v in equal.items()))
    print("\n".join(_excess_table(second_parts["curate"], scratch_parts["curate"],
                                  new_pairs / (args.pairs + new_pairs))))
    print("run 2's pool-step states: " + ", ".join(f"{step} {c['how']} in {c['seconds']:.2f} s"
                                                   for step, c in second_parts["combines"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
