"""Download throughput: the download stage next to the bare ``img2dataset`` CLI on the same URL list.

Both download the first ``--limit`` URLs of ``--urls`` with the ``download:`` settings of ``--params`` (webdataset,
sha256, same image size, resize mode, processes, threads, timeout, retries, opt-out directives), in the same
script run, alternating which goes first over ``--repeats`` rounds so both see the same background load. A URL
list under the demo base URL is served by a fresh demo server for each run (the stage starts its own; the CLI
gets a rewritten copy of the list). Images/s = successful images over the end-to-end wall time of each run
(the stage's includes its input checks, host checks, shard checks and manifest; the CLI's its interpreter start).

    python -m benchmarks.download_bench [--urls data/crawl/urls.parquet] [--limit 2000] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from clipmill.components.common.params import TrackingParams
from clipmill.components.demo_corpus import DEMO_BASE_URL, serve_web
from clipmill.components.download.params import DownloadParams
from clipmill.components.download.stage import download
from clipmill.params import load_params


def img2dataset_cli_args(url_list: Path, out: Path, params: DownloadParams) -> list[str]:
    """The img2dataset command line equivalent to the stage's settings."""
    flags = {
        "url_list": url_list, "output_folder": out, "input_format": "parquet", "url_col": "url",
        "caption_col": "caption", "output_format": "webdataset", "save_additional_columns": '["uid"]',
        "image_size": params.image_size, "resize_mode": params.resize_mode,
        "resize_only_if_bigger": params.resize_only_if_bigger, "encode_quality": params.encode_quality,
        "number_sample_per_shard": params.number_sample_per_shard, "processes_count": params.processes_count,
        "thread_count": params.thread_count, "distributor": params.distributor, "timeout": params.timeout,
        "retries": params.retries, "max_shard_retry": params.max_shard_retry,
        "user_agent_token": params.user_agent_token,
        "disallowed_header_directives": json.dumps(params.disallowed_header_directives),
        "compute_hash": "sha256", "incremental_mode": "incremental", "extract_exif": False, "enable_wandb": False,
    }
    return [str(Path(sys.executable).parent / "img2dataset")] + [f"--{k}={v}" for k, v in flags.items()]


def successes(shards: Path) -> int:
    return sum(json.loads(p.read_text())["successes"] for p in shards.glob("*_stats.json"))


def run_cli(urls: Path, web: Path | None, out: Path, params: DownloadParams, slow_seconds: float) -> tuple[int, float]:
    table = pd.read_parquet(urls)
    started = time.perf_counter()
    if web is None:
        subprocess.run(img2dataset_cli_args(urls, out, params), check=True, capture_output=True)
    else:
        with serve_web(web, slow_seconds=slow_seconds) as base_url:
            rewritten = urls.with_name("rewritten.parquet")
            table.assign(url=table["url"].str.replace(DEMO_BASE_URL, base_url, n=1, regex=False)).to_parquet(rewritten)
            subprocess.run(img2dataset_cli_args(rewritten, out, params), check=True, capture_output=True)
    return successes(out), time.perf_counter() - started


def run_stage(urls: Path, out: Path, params, slow_seconds: float) -> tuple[int, float]:
    started = time.perf_counter()
    mirrors = [m.model_copy(update={"slow_seconds": slow_seconds}) for m in params.download.mirrors]
    summary = download(params.download.model_copy(update={"urls": str(urls), "mirrors": mirrors}), urls, out,
                       tracking=TrackingParams(enabled=False), ray_params=params.ray)
    return summary["by_status"]["success"], time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file whose download: section is used")
    parser.add_argument("--urls", default=None, help="URL list (default: download.urls in params)")
    parser.add_argument("--limit", type=int, default=2000, help="first N URLs of the list")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="reports/bench/download.json", help="results (JSON)")
    args = parser.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    params = load_params(args.params)
    source = Path(args.urls or params.download.urls)
    web = source.parent / "web"
    mirrors = params.download.mirrors
    slow_seconds = mirrors[0].slow_seconds if mirrors else params.demo_server.slow_seconds
    runs: dict[str, list[tuple[int, float]]] = {"stage": [], "img2dataset": []}
    with tempfile.TemporaryDirectory(prefix="download-bench-") as tmp:
        tmp = Path(tmp)
        urls = tmp / "urls.parquet"
        table = pd.read_parquet(source).head(args.limit)
        table.to_parquet(urls, index=False)
        demo = table["url"].str.startswith(DEMO_BASE_URL).any()
        if demo:  # the stage serves the web/ directory beside its URL list
            (tmp / "web").symlink_to(web.resolve())
        for repeat in range(args.repeats):
            order = ["stage", "img2dataset"] if repeat % 2 == 0 else ["img2dataset", "stage"]
            for name in order:
                out = tmp / f"{name}-{repeat}"
                if name == "stage":
                    runs[name].append(run_stage(urls, out, params, slow_seconds))
                else:
                    runs[name].append(run_cli(urls, web if demo else None, out / "shards", params.download,
                                              slow_seconds))
                images, seconds = runs[name][-1]
                print(f"round {repeat}: {name:11s} {images} images in {seconds:6.1f} s "
                      f"= {images / seconds:7.1f} images/s")
    result = {name: {"images": sum(i for i, _ in r), "seconds": sum(s for _, s in r)} for name, r in runs.items()}
    for r in result.values():
        r["images_per_s"] = r["images"] / r["seconds"]
    result.update(urls=len(table), repeats=args.repeats, cpus=os.cpu_count(),
                  ratio=result["stage"]["images_per_s"] / result["img2dataset"]["images_per_s"],
                  settings=params.download.model_dump(mode="json"))
    print(f"stage {result['stage']['images_per_s']:.1f} images/s, img2dataset CLI "
          f"{result['img2dataset']['images_per_s']:.1f} images/s, ratio {result['ratio']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
