"""The download stage: every URL list of the crawl -> img2dataset webdataset shards -> manifest and summary.

Each URL list (the base list ``crawl`` and every appended one) downloads into a place of its own, once: a later
run that finds a list finished (same list content, same earlier lists, same download params) does not fetch
it again, so appending a list costs only its own download. Output directory (``out``):
- ``lists/<list>/run.json``: what the list's download is (its fingerprint); a rerun with the same fingerprint
  resumes or skips it, a different one is refused unless ``overwrite`` (then the list is downloaded again);
- ``lists/<list>/requests.parquet``: the checked list as downloaded (uid, url, caption, passthrough columns) with
  the refusal reason of each URL that was not fetched; reused on resume so shard assignment never changes;
- ``shards/<list>/``: img2dataset's ``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json`` per shard, made
  canonical once checked (``shards.canonicalize_shard``: key order, listed URLs, no times; by the worker that
  downloaded it, as it finishes), so a reproduction of the download gives the same bytes;
- ``lists/<list>/manifest.parquet``, ``lists/<list>/summary.json``: written last; the list is finished;
- ``manifest.parquet``, ``summary.json``: every list's manifest in crawl order and the totals, written last;
  ``run.json``: this run's record (lists fetched, shards resumed or repaired, durations, speed), apart from the
  counts, which depend on the inputs alone.
A manifest row's ``shard`` names its tar relative to ``shards/`` (``crawl/00000.tar``).
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clipmill.components.common.errors import ClipmillError, InputError
from clipmill.components.common.io import (
    atomic_path,
    check_replaceable,
    mark_output,
    read_json,
    remove_dead_writes,
    write_json,
    write_parquet,
)
from clipmill.components.common.log import Progress, get_logger
from clipmill.components.common.mirror import check_mirror, serve_mirror, under_prefix
from clipmill.components.common.params import RayParams, TrackingParams
from clipmill.components.common.storage import unreadable_parquet
from clipmill.components.common.tracking import stage_run

from .additions import Crawl, read_crawl
from .fetch import FetchPolicy
from .params import DownloadParams, MirrorParams
from .reasons import error_reason
from .safety import INVALID_URL, PRIVATE_HOST, UNRESOLVABLE_HOST, UNSUPPORTED_SCHEME, refusal_reasons
from .shards import canonicalize_shard, check_shard, finished_shards, is_canonical, shard_files

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
    UNRESOLVABLE_HOST: "the host name does not resolve",
}
_IMG2DATASET_INPUT = ".img2dataset_urls.parquet"
REQUESTS_FILE = "requests.parquet"  # a list's requests: uid, URL as listed, caption, refusal, ...
MANIFEST_ROW_GROUP = 16384  # rows per row group of the crawl's manifest


DOWNLOAD_OWNER = "download"  # the output marker's owner (``clipmill.components.common.io``)
LISTS_DIR = "lists"
SHARDS_DIR = "shards"
RUN_RECORD = "run.json"  # this run's durations and resumed shards (summary.json: the crawl's counts)
OUTPUTS = (LISTS_DIR, SHARDS_DIR, "manifest.parquet", "summary.json", RUN_RECORD)


def _describe_differences(previous: dict, current: dict) -> list[str]:
    out = []
    if previous.get("urls_sha256") != current["urls_sha256"]:
        out.append(f"the URL list {current['list']} differs (was {previous.get('urls')})")
    if previous.get("earlier") != current["earlier"]:
        out.append("the lists before it in the crawl differ")
    before, now = previous.get("params", {}), current["params"]
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            out.append(f"download.{key}: {before.get(key)!r} -> {now.get(key)!r}")
    return out


def claim_output_root(out: Path, overwrite: bool) -> None:
    """``out`` must be empty or a download output (only ``lists/``, ``shards/`` and the manifest and summary);
    anything else is an ``InputError`` naming it, unless ``overwrite`` (then it is removed)."""
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS and not p.name.startswith("."))
    if not foreign:
        return
    if not overwrite:
        raise InputError(out, f"holds files that are not part of a download output ({', '.join(foreign[:5])}); "
                              "pass --overwrite to replace them")
    check_replaceable(out, DOWNLOAD_OWNER)  # --overwrite never empties a checkout, an inbox or another output
    for name in foreign:
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def claim_output_dir(out: Path, run_info: dict, overwrite: bool, shards_dir: Path | None = None) -> bool:
    """Make ``out`` (one list's directory) this run's; returns True when it resumes an earlier run with the same
    fingerprint.

    A directory holding another run's data (or files without ``run.json``) is an ``InputError`` naming the
    directory and what differs, unless ``overwrite`` (then it and the list's ``shards_dir`` are removed first).
    """
    run_file = out / "run.json"
    resuming = out.is_dir() and any(out.iterdir())
    if resuming:
        problem = None
        if not run_file.is_file():
            problem = "holds files but no run.json, so it is not a download output"
        else:
            try:
                differences = _describe_differences(read_json(run_file), run_info)
            except ClipmillError as e:
                differences = [str(e)]
            if differences:
                problem = f"holds a different download run ({'; '.join(differences)})"
            elif damaged := unreadable_parquet(out / REQUESTS_FILE):
                problem = f"holds a damaged requests.parquet ({damaged}), so its shards cannot be matched to URLs"
        if problem and not overwrite:
            raise InputError(out, f"{problem}; pass --overwrite to replace it")
        if problem:
            shutil.rmtree(out)
            if shards_dir is not None and shards_dir.exists():
                shutil.rmtree(shards_dir)
            resuming = False
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("manifest.parquet", "summary.json"):
        (out / stale).unlink(missing_ok=True)
    write_json(run_info, run_file)
    return resuming


def mirrors_used(mirrors: list[MirrorParams], urls: pd.Series) -> list[MirrorParams]:
    """The mirrors (``download.mirrors``) that answer at least one of ``urls``."""
    return [m for m in mirrors if under_prefix(urls, m.prefix).any()]


def build_requests(table: pd.DataFrame, mirrors: list[MirrorParams], allow_private_hosts: bool) -> pd.DataFrame:
    """A URL list's rows with a ``refusal`` column: why a URL is not fetched, or None.

    URLs under a mirror's prefix are exempt from the host check: the stage serves them itself.
    """
    served_locally = pd.Series(False, index=table.index)
    for mirror in mirrors:
        served_locally |= under_prefix(table["url"], mirror.prefix)
    refusal = pd.Series([None] * len(table), index=table.index, dtype=object)
    checked = ~served_locally
    refusal[checked] = refusal_reasons(table.loc[checked, "url"], allow_private_hosts)
    return table.assign(refusal=refusal)


def fetch_policy(params: DownloadParams, trusted_origins: frozenset = frozenset()) -> FetchPolicy:
    """How each URL is fetched (``fetch.py``); ``trusted_origins``: the mirror servers started here, if any."""
    token = (params.user_agent_token or "").strip().lower() or None
    return FetchPolicy(timeout=params.timeout, max_body_bytes=params.max_body_bytes,
                       max_redirects=params.max_redirects, allow_private_hosts=params.allow_private_hosts,
                       trusted_origins=trusted_origins, user_agent_token=token,
                       disallowed_directives=frozenset(d.strip().lower() for d in params.disallowed_header_directives))


def _lists_under(paths: dict[str, str], prefix: str) -> set[str]:
    """The lists (name -> URL list file) with a URL under ``prefix``, their url columns streamed."""
    used = set()
    for name, path in paths.items():
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536, columns=["url"]):
            if under_prefix(batch.column("url").to_pandas(), prefix).any():
                used.add(name)
                break
    return used


def _mirror_dirs(mirror: MirrorParams, crawl: Crawl) -> list[Path]:
    """The mirror's directory, then the web/ directories of the appended lists with URLs under its prefix."""
    paths = {entry["name"]: entry["path"] for entry in crawl.lists if entry["name"] in crawl.web_dirs}
    used = _lists_under(paths, mirror.prefix)
    return [Path(mirror.dir)] + [web for name, web in crawl.web_dirs.items() if name in used]


@contextmanager
def _fetch_urls(crawl: Crawl, mirrors: list[MirrorParams], routes: dict[str, dict[str, dict]]
                ) -> Iterator[tuple[Callable[[pd.Series], pd.Series], frozenset]]:
    """How listed URLs become the URLs img2dataset fetches: as listed, or with a mirror's prefix swapped for the
    address of a mirror server started here (one per mirror, serving the routes ``check_mirror`` gave for it:
    ``routes[prefix]``). Also yields the (address, port) of those servers: the private origins the fetch may
    connect to."""
    with ExitStack() as stack:
        bases = {}
        for mirror in mirrors:
            dirs = _mirror_dirs(mirror, crawl)
            bases[mirror.prefix] = stack.enter_context(serve_mirror(dirs, slow_seconds=mirror.slow_seconds,
                                                                    routes=routes[mirror.prefix]))
            log.info("URLs under %s: serving %s at %s", mirror.prefix, ", ".join(map(str, dirs)),
                     bases[mirror.prefix])

        def fetch_urls(urls: pd.Series) -> pd.Series:
            out = urls.copy()
            for prefix, base_url in bases.items():
                mirrored = under_prefix(urls, prefix)
                out[mirrored] = base_url + urls[mirrored].str.slice(len(prefix))
            return out

        origins = frozenset((urlsplit(b).hostname, urlsplit(b).port) for b in bases.values())
        yield fetch_urls, origins


@contextmanager
def _ray_session(params: DownloadParams, ray_params: RayParams) -> Iterator[None]:
    if params.distributor != "ray":
        yield
        return
    from clipmill.components.common.engine import ray_session

    # img2dataset's Ray tasks run img2dataset's code (no package shipped); their progress is echoed here
    with ray_session(ray_params, ship_code=False, worker_logs=True):
        yield


# The module img2dataset's workers import (``workers.forkserver_distributor``'s preload), named here so that the
# server can start before this process imports it.
WORKER_MODULE = f"{__package__}.workers"


def start_worker_server(params: DownloadParams) -> None:
    """Start the server that img2dataset's workers fork from now, so that it imports img2dataset (seconds) while
    this process imports it too, rather than after: the multiprocessing distributor with more than one process."""
    if params.distributor != "multiprocessing" or params.processes_count <= 1:
        return
    from clipmill.components.common.engine import start_forkserver

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations' import checks for updates otherwise
    start_forkserver([WORKER_MODULE])


def start_stagger(policy: FetchPolicy, retries: int, processes: int, pending: int | None) -> float:
    """Seconds between the first shards' starts of a pool of ``processes`` workers with ``pending`` shards: where
    there are more shards than workers, their first shards' ends are spread over the longest one URL can take (every
    attempt timing out), so that their waits on slow URLs fall at different times; none for one wave of shards."""
    if processes <= 1 or pending is None or pending <= processes:
        return 0.0
    return policy.timeout * (retries + 1) / processes


def run_img2dataset(url_list: Path, shards_dir: Path, params: DownloadParams, extra_columns: list[str],
                    policy: FetchPolicy | None = None, pending: int | None = None,
                    requests_file: Path | None = None) -> None:
    """One img2dataset run over ``url_list`` (parquet: url, caption, extra columns), resuming finished shards,
    fetching with ``fetch.fetch`` under ``policy`` and decoding with ``decode.decode_image``.

    ``pending`` (the shards left to download, when known) caps the processes: a worker without a shard would
    only pay img2dataset's import; one process runs its shards here rather than in a spawned worker. With
    ``requests_file`` (the list's uids and listed URLs), each worker checks its shards and makes them canonical
    as it finishes them."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # inherited by the workers: no network check at import
    # OpenCV's own pixel limit, for formats whose header PIL cannot read (inherited by the workers)
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(params.max_image_area)
    import img2dataset

    from .workers import patched_img2dataset

    processes = max(1, min(params.processes_count, pending if pending is not None else params.processes_count))
    in_process = params.distributor == "multiprocessing" and processes == 1
    policy = policy or fetch_policy(params)
    previous_handler = signal.getsignal(signal.SIGINT)
    try:
        with patched_img2dataset(policy, in_process, None if requests_file is None else str(requests_file),
                                 start_stagger(policy, params.retries, processes, pending)):
            img2dataset.download(
                url_list=str(url_list), input_format="parquet", url_col="url", caption_col="caption",
                save_additional_columns=extra_columns, output_folder=str(shards_dir), output_format="webdataset",
                image_size=params.image_size, resize_mode=params.resize_mode,
                resize_only_if_bigger=params.resize_only_if_bigger, encode_quality=params.encode_quality,
                number_sample_per_shard=params.number_sample_per_shard, processes_count=processes,
                thread_count=params.thread_count, distributor=params.distributor, timeout=params.timeout,
                retries=params.retries, max_shard_retry=params.max_shard_retry,
                user_agent_token=params.user_agent_token,
                disallowed_header_directives=list(params.disallowed_header_directives),
                max_image_area=params.max_image_area,
                compute_hash="sha256", incremental_mode="incremental", extract_exif=False, enable_wandb=False,
            )
    except SystemExit:
        # img2dataset's SIGINT handler calls sys.exit(0): an interrupted download must not look like a success
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGINT, previous_handler)


def _check_shards(shards_dir: Path, shard_ids) -> tuple[dict[int, tuple[pd.DataFrame, dict]], dict[int, str]]:
    """(results and tar index of the good shards, problem of each bad one)."""
    good, bad = {}, {}
    for shard_id in shard_ids:
        try:
            good[shard_id] = check_shard(shards_dir, shard_id)
        except InputError as e:
            bad[shard_id] = str(e)
    return good, bad


def _remove_shards(shards_dir: Path, bad: dict[int, str]) -> None:
    log.warning("downloading %d bad shard(s) again: %s", len(bad), "; ".join(bad.values()))
    for shard_id in bad:
        for f in shard_files(shards_dir, shard_id):
            f.unlink(missing_ok=True)


def download_shards(requests: pd.DataFrame, fetch_urls: pd.Series, list_dir: Path, shards_dir: Path,
                    params: DownloadParams, passthrough: list[str],
                    policy: FetchPolicy | None = None) -> tuple[pd.DataFrame, dict]:
    """Run img2dataset on the URLs that are not refused and check every shard. Finished shards of an earlier
    run are checked first; a bad shard (truncated, unreadable, counts that do not add up) is deleted and
    downloaded again, at most twice in all.

    Returns (per-URL results of all shards, run statistics).
    """
    sent = requests["refusal"].isna()
    shard_ids = range(math.ceil(int(sent.sum()) / params.number_sample_per_shard))
    remove_dead_writes(shards_dir)  # a killed run's workers may have been rewriting a shard
    _, bad = _check_shards(shards_dir, sorted(finished_shards(shards_dir) & set(shard_ids)))
    if bad:
        _remove_shards(shards_dir, bad)
    done_before = finished_shards(shards_dir) & set(shard_ids)
    stats = {"shards": len(shard_ids), "resumed_shards": len(done_before), "repaired_shards": len(bad),
             "download_seconds": 0.0}
    if not len(shard_ids):
        return pd.DataFrame(columns=["uid", *RESULT_COLUMNS]), stats
    input_file = list_dir / _IMG2DATASET_INPUT
    columns = ["uid", *passthrough]
    try:
        write_parquet(requests.loc[sent, ["caption", *columns]].assign(url=fetch_urls[sent]), input_file)
        for attempt in range(2):
            started = time.perf_counter()
            pending = len(shard_ids) - len(finished_shards(shards_dir) & set(shard_ids))
            if pending:  # every shard finished before: they are only checked
                run_img2dataset(input_file, shards_dir, params, columns, policy, pending,
                                list_dir / REQUESTS_FILE)
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
    listed = dict(zip(requests.loc[sent, "uid"], requests.loc[sent, "url"]))
    rows = {}
    for shard_id in shard_ids:
        rows[shard_id], index = good[shard_id]
        if not is_canonical(shards_dir, shard_id):
            rows[shard_id] = canonicalize_shard(shards_dir, shard_id, listed, index)
    results = pd.concat([rows[i] for i in shard_ids], ignore_index=True)
    new_shards = [i for i in shard_ids if i not in done_before]
    stats["new_successes"] = int(sum((rows[i]["status"] == "success").sum() for i in new_shards))
    stats["new_urls"] = int(sum(len(rows[i]) for i in new_shards))
    return results, stats


def build_manifest(requests: pd.DataFrame, results: pd.DataFrame, list_name: str) -> pd.DataFrame:
    """One row per input uid, in input order: img2dataset's result for fetched URLs, ``refused`` for the rest.

    ``key`` and ``shard`` locate the image of a success (null for every other status; ``shard`` relative to the
    shards directory: ``<list_name>/NNNNN.tar``); ``url`` and ``caption`` are those of the URL list (a mirror
    server's address never leaks into the manifest).
    """
    sent = requests.loc[requests["refusal"].isna(), "uid"]
    duplicated = results["uid"][results["uid"].duplicated()]
    if len(duplicated):
        raise ClipmillError(f"uid {duplicated.iloc[0]!r} appears in more than one shard row "
                            f"({len(duplicated)} duplicates)")
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
    manifest.loc[~refused, "error_reason"] = [
        error_reason(s, m) for s, m in zip(manifest.loc[~refused, "status"], manifest.loc[~refused, "error_message"])]
    failed = manifest["status"] != "success"
    manifest.loc[failed, ["key", "shard"]] = None
    manifest.loc[~failed, "shard"] = list_name + "/" + manifest.loc[~failed, "shard"].astype(str)
    for column in SIZE_COLUMNS:
        manifest[column] = manifest[column].astype("Int64")
    return manifest[MANIFEST_COLUMNS].reset_index(drop=True)


# What describes one run of the stage rather than the crawl (resumed and repaired shards, durations, speed): it
# goes to ``run.json``, apart from the counts in ``summary.json``, which depend on the inputs alone.
RUN_COUNTERS = ("resumed_shards", "repaired_shards", "new_successes", "new_urls", "download_seconds")


def summarize(manifest: pd.DataFrame, entry: dict, stats: dict) -> dict:
    """One list's counts: URLs by status and reason, and shards."""
    by_status = {s: int(n) for s, n in manifest["status"].value_counts().items()}
    return {
        "name": entry["name"], "urls": len(manifest), "duplicates": entry["duplicates"],
        "by_status": {s: by_status.get(s, 0) for s in STATUSES},
        "by_reason": {str(r): int(n) for r, n in Counter(manifest["error_reason"].dropna()).most_common()},
        "captions_cleaned": entry["captions_cleaned"], "captions_missing": entry["captions_missing"],
        "captions_truncated": entry.get("captions_truncated", 0), "duplicate_urls": entry.get("duplicate_urls", 0),
        "shards": stats["shards"],
    }


def run_record(lists: list[dict], wall_seconds: float) -> dict:
    """This run of the stage: the lists it fetched (their ``RUN_COUNTERS``), durations and speed."""
    download_seconds = sum(r["download_seconds"] for r in lists)
    totals = {k: sum(r.get(k, 0) for r in lists) for k in RUN_COUNTERS}
    return {
        "lists": lists, **totals,
        "images_per_s": totals["new_successes"] / download_seconds if download_seconds else 0.0,
        "urls_per_s": totals["new_urls"] / download_seconds if download_seconds else 0.0,
        "wall_seconds": wall_seconds,
    }


def combine_summaries(crawl: Crawl, lists: list[dict], fetched: list[str]) -> dict:
    """The crawl's counts from its lists' summaries."""
    total = {k: sum(s[k] for s in lists) for k in ("urls", "captions_cleaned", "captions_missing", "shards")}
    by_status = {st: sum(s["by_status"][st] for s in lists) for st in STATUSES}
    by_reason: Counter = Counter()
    for s in lists:
        by_reason.update(s["by_reason"])
    return {
        **total,
        "urls_listed": total["urls"] + crawl.duplicates,  # duplicates: uids an earlier list had, not fetched again
        "duplicates": crawl.duplicates,
        "captions_truncated": crawl.captions_truncated,  # cut to download.max_caption_chars
        "duplicate_urls": crawl.duplicate_urls,  # URLs listed again with another caption or uid (fetched)
        "url_lists": [{**entry, "downloaded": s["by_status"]["success"]} for entry, s in zip(crawl.lists, lists)],
        "lists_fetched": len(fetched), "lists_reused": len(lists) - len(fetched),
        "by_status": by_status,
        "by_reason": dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
        "success_rate": by_status["success"] / total["urls"] if total["urls"] else 0.0,
    }


def list_run_info(name: str, path: str, sha256: str, earlier: list[str], params: DownloadParams) -> dict:
    """A list's fingerprint: its content, the lists before it, the download params."""
    return {"list": name, "urls": path, "urls_sha256": sha256, "earlier": list(earlier),
            "params": params.fingerprint()}


LIST_COUNTS = ("urls", "duplicates", "captions_cleaned", "captions_missing", "shards")


def list_summary(list_dir: Path) -> dict | None:
    """A list's ``summary.json`` (written last, it marks the list finished), or None when it is missing or damaged
    (not valid JSON, or without its counts): the list is then downloaded again, resuming its finished shards."""
    path = list_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = read_json(path)
    except ClipmillError:
        summary = None
    if (isinstance(summary, dict) and isinstance(summary.get("by_status"), dict)
            and isinstance(summary.get("by_reason"), dict) and all(_count(summary.get(k)) for k in LIST_COUNTS)
            and all(_count(summary["by_status"].get(s)) for s in STATUSES)
            and all(_count(v) for v in summary["by_reason"].values())):
        return summary
    log.warning("%s: damaged (not a list summary this stage wrote); the list is downloaded again, resuming its "
                "finished shards", path)
    return None


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def list_finished(list_dir: Path, run_info: dict) -> bool:
    """Whether ``list_dir`` holds a finished download with the fingerprint ``run_info`` (its run record matches
    and its summary is whole)."""
    run_file = list_dir / "run.json"
    if not run_file.is_file() or list_summary(list_dir) is None:
        return False
    if unreadable_parquet(list_dir / "manifest.parquet"):  # said once a run, by ``pending_lists``
        return False
    try:
        return not _describe_differences(read_json(run_file), run_info)
    except ClipmillError:  # damaged: the list's directory is claimed again (claim_output_dir says how)
        return False


def pending_lists(plans: list[ListDownload]) -> list[ListDownload]:
    """The lists not finished; a list downloaded again because its manifest was damaged after it finished is said
    here, once a run (``list_finished`` is asked twice a run, so it says nothing itself)."""
    pending = [p for p in plans if not p.finished()]
    for plan in pending:
        manifest = plan.list_dir / "manifest.parquet"
        damaged = unreadable_parquet(manifest) if list_summary(plan.list_dir) is not None else None
        if damaged:
            log.warning("%s: %s; the list is downloaded again, resuming its finished shards", manifest, damaged)
    return pending


def recorded_lists(out: Path, params: DownloadParams) -> Callable[[str, str, str, list[str]], dict | None]:
    """``read_crawl``'s ``recorded``: the crawl's record of a list this output finished downloading with the same
    fingerprint (from the list's summary), so that the list is not read and checked again."""
    def recorded(name: str, path: str, sha256: str, earlier: list[str]) -> dict | None:
        list_dir = out / LISTS_DIR / name
        if not list_finished(list_dir, list_run_info(name, path, sha256, earlier, params)):
            return None
        summary = list_summary(list_dir)
        return {"name": name, "path": path, "sha256": sha256, "urls": summary["urls"] + summary["duplicates"],
                **{k: summary.get(k, 0) for k in ("duplicates", "captions_cleaned", "captions_missing",
                                                   "captions_truncated", "duplicate_urls")}}
    return recorded


@dataclass(frozen=True, eq=False)
class ListDownload:
    """One URL list of the crawl and where its download lives."""

    entry: dict           # the crawl's record of the list (name, path, sha256, counts)
    crawl: Crawl
    list_dir: Path
    shards_dir: Path
    run_info: dict

    @property
    def name(self) -> str:
        return self.entry["name"]

    @property
    def table(self) -> pd.DataFrame:
        """Its URLs that no earlier list had (read from the list now)."""
        return self.crawl.table(self.name)

    def finished(self) -> bool:
        return list_finished(self.list_dir, self.run_info)


def plan_lists(crawl: Crawl, out: Path, params: DownloadParams) -> list[ListDownload]:
    """Each list of the crawl with its fingerprint (``list_run_info``)."""
    plans, earlier = [], []
    for entry in crawl.lists:
        name = entry["name"]
        plans.append(ListDownload(entry, crawl, out / LISTS_DIR / name, out / SHARDS_DIR / name,
                                  list_run_info(name, entry["path"], entry["sha256"], earlier, params)))
        earlier.append(entry["sha256"])
    return plans


def download_list(plan: ListDownload, fetch: Callable[[pd.Series], pd.Series], params: DownloadParams,
                  passthrough: list[str], mirrors: list[MirrorParams], overwrite: bool,
                  policy: FetchPolicy | None = None) -> dict:
    """Download one list (resuming its finished shards); writes its manifest and then its summary."""
    started = time.perf_counter()
    resuming = claim_output_dir(plan.list_dir, plan.run_info, overwrite, plan.shards_dir)
    requests_file = plan.list_dir / REQUESTS_FILE
    if resuming and requests_file.is_file():
        requests = pd.read_parquet(requests_file)
        log.info("%s: resuming the download in %s", plan.name, plan.list_dir)
    else:
        requests = build_requests(plan.table, mirrors, params.allow_private_hosts)
        write_parquet(requests, requests_file)
    refused = int(requests["refusal"].notna().sum())
    if refused:
        log.warning("%s: %d of %d URLs refused: %s", plan.name, refused, len(requests),
                    dict(Counter(requests["refusal"].dropna())))
    results, stats = download_shards(requests, fetch(requests["url"]), plan.list_dir, plan.shards_dir, params,
                                     passthrough, policy)
    manifest = build_manifest(requests, results, plan.name)
    summary = summarize(manifest, plan.entry, stats)
    write_parquet(manifest, plan.list_dir / "manifest.parquet")
    write_json(summary, plan.list_dir / "summary.json")
    run = {"name": plan.name, **{k: stats.get(k, 0) for k in RUN_COUNTERS},
           "wall_seconds": time.perf_counter() - started}
    log.info("%s: downloaded %d of %d URLs in %.1f s (%.1f images/s)", plan.name, summary["by_status"]["success"],
             summary["urls"], run["wall_seconds"], run["new_successes"] / max(run["download_seconds"], 1e-9))
    return run


def write_crawl_manifest(plans: list[ListDownload], path: Path) -> None:
    """Every list's manifest, in crawl order, streamed into one parquet file (written atomically) in row groups of
    ``MANIFEST_ROW_GROUP`` rows, so that readers can take it one small piece at a time."""
    with atomic_path(path) as tmp:
        writer = None
        try:
            for plan in plans:
                source = pq.ParquetFile(plan.list_dir / "manifest.parquet")
                if writer is None:
                    writer = pq.ParquetWriter(tmp, source.schema_arrow)
                for batch in source.iter_batches(batch_size=MANIFEST_ROW_GROUP):
                    writer.write_table(pa.Table.from_batches([batch]).cast(writer.schema),
                                       row_group_size=MANIFEST_ROW_GROUP)
        finally:
            if writer is not None:
                writer.close()


def _remove_dropped_lists(out: Path, plans: list[ListDownload]) -> None:
    """Downloads of lists that are no longer in the crawl go."""
    names = {p.name for p in plans}
    for folder in (out / LISTS_DIR, out / SHARDS_DIR):
        for entry in folder.iterdir() if folder.is_dir() else ():
            if entry.is_dir() and entry.name not in names:
                log.info("removing %s: its list is no longer in the crawl", entry)
                shutil.rmtree(entry)


def _log_metrics(summary: dict, record: dict) -> None:
    import mlflow

    metrics = {k: summary[k] for k in ("success_rate", "captions_cleaned", "captions_missing", "captions_truncated",
                                        "duplicate_urls", "shards", "urls", "lists_fetched", "lists_reused")}
    metrics.update({k: record[k] for k in ("images_per_s", "urls_per_s", "wall_seconds", *RUN_COUNTERS)})
    metrics.update({f"status.{k}": v for k, v in summary["by_status"].items()})
    metrics.update(samples_in=summary["urls_listed"], samples_out=summary["by_status"]["success"],
                   duplicates=summary["duplicates"], url_lists=len(summary["url_lists"]))
    metrics.update({f"reason.{k}": v for k, v in summary["by_reason"].items()})
    mlflow.log_metrics(metrics)


# What a list's folder holds besides its shards: copied from object storage to the staging folder, so that the
# local stage sees which lists are finished without fetching their shards.
LIST_RECORDS = ("run.json", "summary.json", "manifest.parquet")


def _download_to_store(params: DownloadParams, urls: str | Path, out: str, **kwargs) -> dict:
    """``download`` into object storage: lists finished on the store are reused from their records; the others are
    downloaded into a local staging folder (``.clipmill/staging/``, kept, so a killed run resumes there) and
    published, shards first and each list's ``summary.json`` last; then the crawl's manifest and summary."""
    from clipmill.components.common.hashing import hash_obj
    from clipmill.components.common.storage import location, publish_dir, remove_tree

    store = location(out)
    staging = Path(".clipmill") / "staging" / f"download-{hash_obj(str(store))[:16]}"
    for summary_file in (store / LISTS_DIR).glob("*/summary.json") if (store / LISTS_DIR).is_dir() else ():
        name = summary_file.parent.name
        local = staging / LISTS_DIR / name
        if not (local / "summary.json").is_file() or (local / "run.json").read_bytes() != \
                (store / LISTS_DIR / name / "run.json").read_bytes():
            remove_tree(local)
            local.mkdir(parents=True)
            for record in LIST_RECORDS:
                (local / record).write_bytes((store / LISTS_DIR / name / record).read_bytes())
            (staging / SHARDS_DIR / name).mkdir(parents=True, exist_ok=True)
    summary = download(params, urls, staging, **kwargs)
    names = [entry["name"] for entry in summary["url_lists"]]
    for name in names:
        stored = store / LISTS_DIR / name / "run.json"
        if stored.is_file() and stored.read_bytes() == (staging / LISTS_DIR / name / "run.json").read_bytes():
            continue  # published before
        remove_tree(store / LISTS_DIR / name)
        publish_dir(staging / SHARDS_DIR / name, store / SHARDS_DIR / name)
        publish_dir(staging / LISTS_DIR / name, store / LISTS_DIR / name, last="summary.json")
        remove_tree(staging / SHARDS_DIR / name)  # the store holds them now; the records stay for the next run
        (staging / SHARDS_DIR / name).mkdir(parents=True)
    for folder in (LISTS_DIR, SHARDS_DIR):  # lists no longer in the crawl
        for entry in (store / folder).iterdir() if (store / folder).is_dir() else ():
            if entry.name not in names:
                remove_tree(entry)
    for name in ("manifest.parquet", RUN_RECORD, "summary.json"):
        store.fs.put_file(str(staging / name), f"{store.path}/{name}")
    return summary


def download(params: DownloadParams, urls: str | Path, out: str | Path, *, tracking: TrackingParams,
             ray_params: RayParams, additions: str | Path | None = None,
             overwrite: bool = False) -> dict:
    """Download the crawl (the URL list ``urls`` followed by the lists appended under ``additions``) into ``out``
    (see the module docstring): each list not finished before is fetched; returns the crawl's summary.

    Every input problem is an ``InputError`` raised before anything is written.
    """
    from clipmill.components.common.storage import is_url

    if is_url(out):
        return _download_to_store(params, urls, str(out), tracking=tracking, ray_params=ray_params,
                                  additions=additions, overwrite=overwrite)
    started = time.perf_counter()
    urls, out = Path(urls), Path(out)
    crawl = read_crawl(urls, additions, max_caption_chars=params.max_caption_chars,
                       recorded=recorded_lists(out, params))
    claim_output_root(out, overwrite)
    plans = plan_lists(crawl, out, params)
    pending = pending_lists(plans)
    if pending:
        start_worker_server(params)
    # the mirrors that answer a URL to fetch (each pending list read once more, one at a time)
    used = {m.prefix for p in pending for m in mirrors_used(params.mirrors, p.table["url"])}
    mirrors = [m for m in params.mirrors if m.prefix in used]
    routes = {m.prefix: check_mirror(_mirror_dirs(m, crawl)) for m in mirrors}
    inputs = [urls] + ([Path(additions)] if additions is not None else [])
    with stage_run("download", tracking, params, inputs) as run:
        for stale in ("manifest.parquet", "summary.json", RUN_RECORD):
            (out / stale).unlink(missing_ok=True)
        for plan in plans:
            if plan.name not in {p.name for p in pending}:
                log.info("%s: downloaded before (%s), not fetched again", plan.name, plan.list_dir)
        runs = []
        if pending:
            with _fetch_urls(crawl, mirrors, routes) as (fetch, trusted), \
                    _ray_session(params, ray_params):
                with Progress("download", len(pending), "URL lists") as bar:
                    for plan in pending:
                        runs.append(download_list(plan, fetch, params, crawl.passthrough, mirrors, overwrite,
                                                  fetch_policy(params, trusted)))
                        bar.update(1, samples=runs[-1]["new_successes"])
        _remove_dropped_lists(out, plans)
        summary = combine_summaries(crawl, [list_summary(p.list_dir) for p in plans],
                                    [p.name for p in pending])
        record = run_record(runs, time.perf_counter() - started)
        write_crawl_manifest(plans, out / "manifest.parquet")
        write_json(record, out / RUN_RECORD)
        write_json(summary, out / "summary.json")
        mark_output(out, DOWNLOAD_OWNER)
        log.info("downloaded %d of %d URLs (%.1f%%) in %.1f s; %d list(s) fetched, %d reused; %s",
                 summary["by_status"]["success"], summary["urls"], 100 * summary["success_rate"],
                 record["wall_seconds"], summary["lists_fetched"], summary["lists_reused"], summary["by_reason"])
        if run is not None:
            _log_metrics(summary, record)
            import mlflow

            mlflow.log_artifact(str(out / "summary.json"))
            mlflow.log_artifact(str(out / RUN_RECORD))
    return {**summary, **{k: v for k, v in record.items() if k != "lists"}}
