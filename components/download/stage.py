"""The download stage: URL list -> img2dataset webdataset shards -> checked shards -> manifest and summary.

Output directory (``out``):
- ``run.json``: what this directory is a download of (URL list hash + the download params that shape the result);
  a rerun with the same fingerprint resumes, any other run is refused unless ``overwrite``.
- ``requests.parquet``: the checked URL list as downloaded (uid, url, caption, passthrough columns) with the
  refusal reason of each URL that was not fetched; reused on resume so shard assignment never changes.
- ``shards/``: img2dataset's ``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json`` per shard.
- ``manifest.parquet``, ``summary.json``: written last, atomically; their presence means the run finished.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd

from components.common.errors import ClipmillError, InputError
from components.common.hashing import file_sha256
from components.common.io import read_json, write_json, write_parquet
from components.common.log import get_logger
from components.common.params import RayParams, TrackingParams
from components.common.tracking import stage_run
from components.demo_corpus.params import DemoServerParams

from .params import DownloadParams
from .reasons import error_reason
from .safety import INVALID_URL, PRIVATE_HOST, UNSUPPORTED_SCHEME, refusal_reasons
from .shards import finished_shards, read_shard, shard_files
from .additions import Crawl, read_crawl
from .url_list import UrlList

log = get_logger("download")

MANIFEST_COLUMNS = ["uid", "key", "shard", "status", "error_message", "error_reason", "width", "height",
                    "original_width", "original_height", "sha256", "caption", "url", "url_list"]
STATUSES = ("success", "failed_to_download", "failed_to_resize", "refused")
SIZE_COLUMNS = ["width", "height", "original_width", "original_height"]
RESULT_COLUMNS = ["key", "shard", "status", "error_message", *SIZE_COLUMNS, "sha256"]  # taken from the shards
REFUSAL_MESSAGES = {
    PRIVATE_HOST: "host is or resolves to a loopback, private, link-local, reserved or metadata address",
    UNSUPPORTED_SCHEME: "only http and https URLs are downloaded",
    INVALID_URL: "not a valid URL",
}
_IMG2DATASET_INPUT = ".img2dataset_urls.parquet"


def _describe_differences(previous: dict, current: dict) -> list[str]:
    out = []
    if previous.get("urls_sha256") != current["urls_sha256"]:
        out.append(f"the crawl's URL lists differ (was {previous.get('urls')} + {previous.get('additions', 0)} "
                   "appended)")
    before, now = previous.get("params", {}), current["params"]
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            out.append(f"download.{key}: {before.get(key)!r} -> {now.get(key)!r}")
    return out


def claim_output_dir(out: Path, run_info: dict, overwrite: bool) -> bool:
    """Make ``out`` this run's directory; returns True when it resumes an earlier run with the same fingerprint.

    A directory holding another run's data (or files without ``run.json``) is an ``InputError`` naming the
    directory and what differs, unless ``overwrite`` (then it is removed first).
    """
    run_file = out / "run.json"
    if overwrite and out.exists():
        shutil.rmtree(out)
    resuming = out.is_dir() and any(out.iterdir())
    if resuming:
        if not run_file.is_file():
            raise InputError(out, "holds files but no run.json, so it is not a download output; "
                                  "pass --overwrite to replace it")
        try:
            previous = read_json(run_file)
        except ValueError as e:
            raise InputError(run_file, f"not valid JSON ({e}); pass --overwrite to replace the directory") from None
        differences = _describe_differences(previous, run_info)
        if differences:
            raise InputError(out, f"holds a different download run ({'; '.join(differences)}); "
                                  "pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("manifest.parquet", "summary.json"):
        (out / stale).unlink(missing_ok=True)
    write_json(run_info, run_file)
    return resuming


def _demo_base_url(urls: pd.Series) -> str | None:
    """The demo crawl's base URL when the list points at it, else None."""
    from components.demo_corpus import DEMO_BASE_URL

    prefix = DEMO_BASE_URL.rstrip("/") + "/"
    return DEMO_BASE_URL if urls.str.startswith(prefix, na=False).any() else None


def build_requests(url_list: UrlList, demo_base: str | None, allow_private_hosts: bool) -> pd.DataFrame:
    """The URL list with a ``refusal`` column: why a URL is not fetched, or None.

    URLs under the demo base are exempt from the host check: the stage serves them itself.
    """
    table = url_list.table
    served_locally = table["url"].str.startswith(demo_base.rstrip("/") + "/", na=False) if demo_base else \
        pd.Series(False, index=table.index)
    refusal = pd.Series([None] * len(table), index=table.index, dtype=object)
    checked = ~served_locally
    refusal[checked] = refusal_reasons(table.loc[checked, "url"], allow_private_hosts)
    return table.assign(refusal=refusal)


@contextmanager
def _fetch_urls(web_dirs: list[Path], requests: pd.DataFrame, demo_base: str | None,
                demo_server: DemoServerParams) -> Iterator[pd.Series]:
    """The URLs img2dataset fetches: as listed, or with the demo base swapped for a demo server started here
    on the ``web/`` directories of the crawl's lists."""
    if demo_base is None:
        yield requests["url"]
        return
    from components.demo_corpus import serve_web

    with serve_web(web_dirs, slow_seconds=demo_server.slow_seconds) as base_url:
        log.info("URL list points at %s: serving %s at %s", demo_base, ", ".join(map(str, web_dirs)), base_url)
        yield requests["url"].str.replace(demo_base.rstrip("/"), base_url, n=1, regex=False)


@contextmanager
def _ray_session(params: DownloadParams, ray_params: RayParams) -> Iterator[None]:
    if params.distributor != "ray":
        yield
        return
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=ray_params.address) if ray_params.address else ray.init(num_cpus=ray_params.num_cpus)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def run_img2dataset(url_list: Path, shards_dir: Path, params: DownloadParams, extra_columns: list[str]) -> None:
    """One img2dataset run over ``url_list`` (parquet: url, caption, extra columns), resuming finished shards."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # inherited by the workers: no network check at import
    import img2dataset

    previous_handler = signal.getsignal(signal.SIGINT)
    try:
        img2dataset.download(
            url_list=str(url_list), input_format="parquet", url_col="url", caption_col="caption",
            save_additional_columns=extra_columns, output_folder=str(shards_dir), output_format="webdataset",
            image_size=params.image_size, resize_mode=params.resize_mode,
            resize_only_if_bigger=params.resize_only_if_bigger, encode_quality=params.encode_quality,
            number_sample_per_shard=params.number_sample_per_shard, processes_count=params.processes_count,
            thread_count=params.thread_count, distributor=params.distributor, timeout=params.timeout,
            retries=params.retries, max_shard_retry=params.max_shard_retry,
            user_agent_token=params.user_agent_token,
            disallowed_header_directives=list(params.disallowed_header_directives),
            compute_hash="sha256", incremental_mode="incremental", extract_exif=False, enable_wandb=False,
        )
    except SystemExit:
        # img2dataset's SIGINT handler calls sys.exit(0): an interrupted download must not look like a success
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGINT, previous_handler)


def _check_shards(shards_dir: Path, shard_ids) -> tuple[dict[int, pd.DataFrame], dict[int, str]]:
    """(results of the good shards, problem of each bad one)."""
    good, bad = {}, {}
    for shard_id in shard_ids:
        try:
            good[shard_id] = read_shard(shards_dir, shard_id)
        except InputError as e:
            bad[shard_id] = str(e)
    return good, bad


def _remove_shards(shards_dir: Path, bad: dict[int, str]) -> None:
    log.warning("downloading %d bad shard(s) again: %s", len(bad), "; ".join(bad.values()))
    for shard_id in bad:
        for f in shard_files(shards_dir, shard_id):
            f.unlink(missing_ok=True)


def download_shards(requests: pd.DataFrame, fetch_urls: pd.Series, out: Path, params: DownloadParams,
                    passthrough: list[str]) -> tuple[pd.DataFrame, dict]:
    """Run img2dataset on the URLs that are not refused and check every shard. Finished shards of an earlier
    run are checked first; a bad shard (truncated, unreadable, counts that do not add up) is deleted and
    downloaded again, at most twice in all.

    Returns (per-URL results of all shards, run statistics).
    """
    shards_dir = out / "shards"
    sent = requests["refusal"].isna()
    shard_ids = range(math.ceil(int(sent.sum()) / params.number_sample_per_shard))
    _, bad = _check_shards(shards_dir, sorted(finished_shards(shards_dir) & set(shard_ids)))
    if bad:
        _remove_shards(shards_dir, bad)
    done_before = finished_shards(shards_dir) & set(shard_ids)
    stats = {"shards": len(shard_ids), "resumed_shards": len(done_before), "repaired_shards": len(bad),
             "download_seconds": 0.0}
    if not len(shard_ids):
        return pd.DataFrame(columns=["uid", *RESULT_COLUMNS]), stats
    input_file = out / _IMG2DATASET_INPUT
    columns = ["uid", *passthrough]
    try:
        write_parquet(requests.loc[sent, ["caption", *columns]].assign(url=fetch_urls[sent]), input_file)
        for attempt in range(2):
            started = time.perf_counter()
            run_img2dataset(input_file, shards_dir, params, columns)
            stats["download_seconds"] += time.perf_counter() - started
            good, bad = _check_shards(shards_dir, shard_ids)
            if not bad:
                break
            if attempt == 0:
                _remove_shards(shards_dir, bad)
                stats["repaired_shards"] += len(bad)
        else:
            raise ClipmillError(f"{shards_dir}: {len(bad)} shard(s) still bad after downloading them again: "
                                + "; ".join(bad.values()) + ". Rerun the stage to resume.")
    finally:
        input_file.unlink(missing_ok=True)
    results = pd.concat([good[i] for i in shard_ids], ignore_index=True)
    new_shards = [i for i in shard_ids if i not in done_before]
    stats["new_successes"] = int(sum((good[i]["status"] == "success").sum() for i in new_shards))
    stats["new_urls"] = int(sum(len(good[i]) for i in new_shards))
    return results, stats


def build_manifest(requests: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """One row per input uid, in input order: img2dataset's result for fetched URLs, ``refused`` for the rest.

    ``key`` and ``shard`` locate the image of a success (null for every other status); ``url`` and ``caption``
    are those of the URL list (the demo server's address never leaks into the manifest).
    """
    sent = requests.loc[requests["refusal"].isna(), "uid"]
    duplicated = results["uid"][results["uid"].duplicated()]
    if len(duplicated):
        raise ClipmillError(f"uid {duplicated.iloc[0]!r} appears in more than one shard row ({len(duplicated)} duplicates)")
    missing = set(sent) - set(results["uid"])
    unexpected = set(results["uid"]) - set(sent)
    if missing or unexpected:
        raise ClipmillError(f"the shards do not hold exactly the requested uids ({len(missing)} missing, "
                            f"{len(unexpected)} unexpected)")
    fetched = results.set_index("uid").reindex(columns=RESULT_COLUMNS)
    manifest = requests[["uid", "url", "caption", "url_list", "refusal"]].join(fetched, on="uid")
    refused = manifest["refusal"].notna()
    manifest.loc[refused, "status"] = "refused"
    manifest.loc[refused, "error_reason"] = manifest.loc[refused, "refusal"]
    manifest.loc[refused, "error_message"] = manifest.loc[refused, "refusal"].map(REFUSAL_MESSAGES)
    manifest.loc[~refused, "error_reason"] = [error_reason(s, m) for s, m in
                                              zip(manifest.loc[~refused, "status"], manifest.loc[~refused, "error_message"])]
    failed = manifest["status"] != "success"
    manifest.loc[failed, ["key", "shard"]] = None
    for column in SIZE_COLUMNS:
        manifest[column] = manifest[column].astype("Int64")
    return manifest[MANIFEST_COLUMNS].reset_index(drop=True)


def summarize(manifest: pd.DataFrame, crawl: Crawl, stats: dict, wall_seconds: float) -> dict:
    by_status = {s: int(n) for s, n in manifest["status"].value_counts().items()}
    by_reason = {str(r): int(n) for r, n in Counter(manifest["error_reason"].dropna()).most_common()}
    successes = by_status.get("success", 0)
    download_seconds = stats["download_seconds"]
    per_list = manifest.groupby("url_list", sort=False)["status"]
    lists = [{**entry, "downloaded": int(per_list.get_group(entry["name"]).eq("success").sum())
              if entry["name"] in per_list.groups else 0} for entry in crawl.lists]
    return {
        "urls": len(manifest),
        "urls_listed": len(manifest) + crawl.duplicates,  # duplicates: uids an earlier list had, not fetched again
        "duplicates": crawl.duplicates,
        "url_lists": lists,
        "by_status": {s: by_status.get(s, 0) for s in STATUSES},
        "by_reason": by_reason,
        "success_rate": successes / len(manifest),
        "captions_cleaned": crawl.url_list.captions_cleaned,
        "captions_missing": crawl.url_list.captions_missing,
        "shards": stats["shards"],
        "resumed_shards": stats["resumed_shards"],
        "repaired_shards": stats["repaired_shards"],
        "images_per_s": stats.get("new_successes", 0) / download_seconds if download_seconds else 0.0,
        "urls_per_s": stats.get("new_urls", 0) / download_seconds if download_seconds else 0.0,
        "download_seconds": download_seconds,
        "wall_seconds": wall_seconds,
    }


def download(params: DownloadParams, urls: str | Path, out: str | Path, *, tracking: TrackingParams,
             ray_params: RayParams, demo_server: DemoServerParams, additions: str | Path | None = None,
             overwrite: bool = False) -> dict:
    """Download the crawl (the URL list ``urls`` followed by the lists appended under ``additions``) into ``out``
    (see the module docstring); returns the summary.

    Every input problem is an ``InputError`` raised before anything is written.
    """
    started = time.perf_counter()
    urls, out = Path(urls), Path(out)
    crawl = read_crawl(urls, additions)
    url_list = crawl.url_list
    demo_base = _demo_base_url(url_list.table["url"])
    run_info = {"urls": str(urls), "additions": len(crawl.lists) - 1, "urls_sha256": crawl.sha256,
                "params": params.fingerprint()}
    resuming = claim_output_dir(out, run_info, overwrite)
    requests_file = out / "requests.parquet"
    inputs = [urls] + ([Path(additions)] if additions is not None else [])
    with stage_run("download", tracking, params, inputs) as run:
        if resuming and requests_file.is_file():
            requests = pd.read_parquet(requests_file)
            log.info("resuming the download in %s", out)
        else:
            requests = build_requests(url_list, demo_base, params.allow_private_hosts)
            write_parquet(requests, requests_file)
        refused = int(requests["refusal"].notna().sum())
        if refused:
            log.warning("%d of %d URLs refused: %s", refused, len(requests),
                        dict(Counter(requests["refusal"].dropna())))
        with _fetch_urls(crawl.web_dirs, requests, demo_base, demo_server) as fetch_urls, _ray_session(params, ray_params):
            results, stats = download_shards(requests, fetch_urls, out, params, url_list.passthrough)
        manifest = build_manifest(requests, results)
        summary = summarize(manifest, crawl, stats, time.perf_counter() - started)
        write_parquet(manifest, out / "manifest.parquet")
        write_json(summary, out / "summary.json")
        log.info("downloaded %d of %d URLs (%.1f%%) in %.1f s: %.1f images/s; %s", summary["by_status"]["success"],
                 summary["urls"], 100 * summary["success_rate"], summary["wall_seconds"], summary["images_per_s"],
                 summary["by_reason"])
        if run is not None:
            import mlflow

            metrics = {k: summary[k] for k in ("success_rate", "images_per_s", "urls_per_s", "wall_seconds",
                                                "download_seconds", "captions_cleaned", "captions_missing",
                                                "shards", "resumed_shards", "repaired_shards", "urls")}
            metrics.update({f"status.{k}": v for k, v in summary["by_status"].items()})
            metrics.update(samples_in=summary["urls_listed"], samples_out=summary["by_status"]["success"],
                           duplicates=summary["duplicates"], url_lists=len(summary["url_lists"]))
            metrics.update({f"reason.{k}": v for k, v in summary["by_reason"].items()})
            mlflow.log_metrics(metrics)
            mlflow.log_artifact(str(out / "summary.json"))
    return summary
