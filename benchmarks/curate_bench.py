"""Curation cost growth with crawl size: time per sample and driver memory at x1, x4 and x16 of a base crawl.

A synthetic download output (manifest with the download manifest's columns, captions written like the demo
crawl's: Zipf-distributed concepts, synonyms, boilerplate, filenames, SEO spam, mismatched and boilerplate-only
captions, failed downloads and a few % exact-duplicate images) is cut into shards of ``--shard-rows`` rows; x1,
x4 and x16 are prefixes of one generated crawl. Each size runs as a fresh ``clipmill stage curate`` process
(tracking off, local executor) over the steps that need no pixels (rules, spam, langid, dedup, balance,
rewrite); the sizes in ``--image-scales`` also get webdataset shards of small JPEGs and run the full list (with
neardup and score, by a randomly initialised clipmill-tiny export).

Measured per run: wall and CPU time; per step the seconds per 1,000 of its input samples, both as task time (the
seconds of its per-shard work, over every phase) and as the step's wall time (both from the run's
``timings.json``); the driver's serial seconds (the manifest split before the steps, and each step's
wall time outside its parallel phases: combine, state, summary); the peak RSS (VmHWM) of the driver process and
of its largest worker. Reported: the fitted exponent b of seconds ~ samples^b per step, for the driver's serial
parts and overall (target: b <= 1.05), and the driver's peak RSS at the largest size over the smallest (target:
<= 1.2). In the same process, after each run, bare-library versions of the same work on the same rows: the rules
as plain pandas/re, dedup as a pandas sort + duplicated, the balance matches as a plain pyahocorasick loop
(``ratio`` = bare seconds / the step's task seconds; the score step's ratio to a bare open_clip loop is
score_bench's). Other work on the machine shows in the timings: ``load`` is the 1-minute load average before and
after each run. ``--runs N`` runs every size N times, the sizes in turn (x1, x4, x16, x1, ...: a slow spell of the
machine falls on every size), and reports per step its fastest task time of the N (best of N, as timeit does) and
per size the run with the shortest stage wall time for the rest.

    python -m benchmarks.curate_bench [--base 12000] [--scales 1 4 16] [--image-scales 1 4] [--scale 1.0]
    python -m benchmarks.curate_bench --scale 0.25 --image-scales   # quick: x1 = 3,000 rows, no pixels
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from clipmill.components.download.stage import (
    MANIFEST_ROW_GROUP,  # the synthetic manifests are laid out as the stage writes them
)

ROOT = Path(__file__).resolve().parents[1]
NO_PIXEL_STEPS = ["rules", "spam", "langid", "dedup", "balance", "rewrite"]
LIST_NAME = "crawl"  # shards live under <shards>/crawl/, as the download stage writes them
IMAGE_PX = 64
# Failed downloads: (share of rows, status, error_message, error_reason), as img2dataset and the download stage
# report them.
FAILURES = (
    (0.04, "failed_to_download", "HTTP Error 404: Not Found", "http_404"),
    (0.01, "failed_to_download", "HTTP Error 503: Service Unavailable", "http_5xx"),
    (0.01, "failed_to_download", "The read operation timed out", "timeout"),
    (0.01, "failed_to_download", "IncompleteRead(512 bytes read, 1024 more expected)", "truncated"),
    (0.01, "failed_to_resize", "Image decoding error", "not_an_image"),
)
SMALL_IMAGE, ELONGATED_IMAGE = 0.02, 0.01  # shares of rows the image-side and aspect-ratio rules see


# ---- the synthetic crawl ------------------------------------------------------------------------------------

def _draw(scene) -> bytes:
    """A cheap 64 px JPEG of the scene: its background colour and each object as a filled shape."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (IMAGE_PX, IMAGE_PX), scene.background.colors[0])
    pen = ImageDraw.Draw(img)
    for obj in scene.objects:
        x, y, r = obj.cx * IMAGE_PX, obj.cy * IMAGE_PX, max(2.0, obj.radius * IMAGE_PX)
        if obj.shape in ("square", "cross", "hexagon"):
            pen.rectangle((x - r, y - r, x + r, y + r), fill=obj.rgb)
        elif obj.shape in ("triangle", "star", "diamond", "heart"):
            pen.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=obj.rgb)
        else:
            pen.ellipse((x - r, y - r, x + r, y + r), fill=obj.rgb)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _scenes(rng, probs, rows: int, demo) -> tuple[list, list]:
    """Each row's scene and native size (a few tiny and elongated images for the rules step)."""
    from clipmill.components.demo_corpus.scenes import sample_scene, sample_size

    scenes, sizes = [], []
    for _ in range(rows):
        u = rng.random()
        size = ((int(rng.integers(24, 60)), int(rng.integers(24, 60))) if u < SMALL_IMAGE else
                (int(rng.integers(300, 400)), int(rng.integers(60, 90))) if u < SMALL_IMAGE + ELONGATED_IMAGE else
                sample_size(rng, demo.min_px, demo.max_px))
        sizes.append(size)
        scenes.append(sample_scene(rng, probs, size, demo.max_objects))
    return scenes, sizes


def _captions(scenes: list, rng, text_rng: random.Random, demo) -> list[str]:
    """Web captions with the demo's planted defects: mismatched (another row's caption) and boilerplate-only."""
    from clipmill.components.demo_corpus.captions import boilerplate_only_caption, web_caption

    rows = len(scenes)
    honest = [web_caption(scene, text_rng, demo.caption_noise)[0] for scene in scenes]
    captions = list(honest)
    defect = rng.random(rows)
    mismatched, boilerplate = demo.caption_defects.mismatched, demo.caption_defects.boilerplate_only
    for i in np.flatnonzero(defect < mismatched):
        captions[i] = honest[(i + int(rng.integers(1, rows))) % rows] if rows > 1 else honest[i]
    for i in np.flatnonzero((defect >= mismatched) & (defect < mismatched + boilerplate)):
        captions[i] = boilerplate_only_caption(text_rng)
    return captions


def _image_ids(rng, first: int, rows: int, demo) -> np.ndarray:
    """Exact duplicates: the image of an earlier row of the crawl (any shard), so dedup works across shards."""
    image_id = np.arange(first, first + rows)
    duplicate = (rng.random(rows) < demo.image_defects.exact_duplicate) & (image_id > 0)
    image_id[duplicate] = rng.integers(0, image_id[duplicate])
    return image_id


def _manifest_row(index: int, i: int, url: str, caption: str, size: tuple, digest: str, kind: int) -> dict:
    """One manifest row: a success, or the failure ``FAILURES[kind]`` (no image, no shard)."""
    from clipmill.components.common.hashing import make_uid

    row = {"uid": make_uid(url, caption), "key": f"{index:05d}{i:04d}", "shard": f"{LIST_NAME}/{index:05d}.tar",
           "status": "success", "error_message": None, "error_reason": None, "width": IMAGE_PX, "height": IMAGE_PX,
           "original_width": size[0], "original_height": size[1], "sha256": digest, "caption": caption, "url": url,
           "url_list": LIST_NAME}
    if kind < len(FAILURES):
        _, status, message, reason = FAILURES[kind]
        row.update(status=status, error_message=message, error_reason=reason, key=None, shard=None, width=None,
                   height=None, original_width=None, original_height=None, sha256=None)
    return row


def _add_sample(tar: tarfile.TarFile, row: dict, scene) -> None:
    """A webdataset sample: <key>.jpg, <key>.txt, <key>.json."""
    for field, data in (("jpg", _draw(scene)), ("txt", row["caption"].encode()),
                        ("json", json.dumps({"uid": row["uid"], "url": row["url"]}).encode())):
        member = tarfile.TarInfo(f"{row['key']}.{field}")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))


def make_shard(job: tuple) -> pd.DataFrame:
    """Manifest rows of download shard ``index`` (and its tar of images when ``images``), from (seed, index) only."""
    from clipmill.components.demo_corpus.params import DemoCorpusParams
    from clipmill.components.demo_corpus.scenes import concept_probabilities
    from clipmill.components.demo_corpus.vocabulary import CONCEPTS

    index, rows, seed, images, shards_dir, demo = job
    demo = DemoCorpusParams.model_validate(demo)
    probs = concept_probabilities(np.random.default_rng([seed, 0]).permutation(len(CONCEPTS)), demo.zipf_exponent)
    rng = np.random.default_rng([seed, 1, index])
    text_rng = random.Random(seed * 1_000_003 + index)
    scenes, sizes = _scenes(rng, probs, rows, demo)
    captions = _captions(scenes, rng, text_rng, demo)
    first = index * rows
    image_id = _image_ids(rng, first, rows, demo)
    failure = rng.random(rows)
    bounds = np.cumsum([f[0] for f in FAILURES])
    tar = None
    if images:
        (Path(shards_dir) / LIST_NAME).mkdir(parents=True, exist_ok=True)
        tar = tarfile.open(Path(shards_dir) / LIST_NAME / f"{index:05d}.tar", "w")
    out = []
    for i in range(rows):
        url = f"http://crawl.bench.test/s{int(rng.integers(demo.num_sites)):03d}/images/{first + i:09d}.jpg"
        digest = hashlib.sha256(f"image:{seed}:{image_id[i]}".encode()).hexdigest()
        row = _manifest_row(index, i, url, captions[i], sizes[i], digest,
                            int(np.searchsorted(bounds, failure[i], side="right")))
        if row["status"] == "success" and tar is not None:
            _add_sample(tar, row, scenes[i])
        out.append(row)
    table = pd.DataFrame(out)
    for column in ("width", "height", "original_width", "original_height"):
        table[column] = table[column].astype("Int64")
    if tar is not None:
        tar.close()
        # img2dataset's table beside the tar (the score step reads each image's null caption from it)
        table[["uid", "key", "caption", "url", "status", "error_message"]].to_parquet(
            Path(shards_dir) / LIST_NAME / f"{index:05d}.parquet", index=False)
    return table


def make_crawl(root: Path, shards: int, image_shards: int, rows: int, seed: int, demo: dict,
               workers: int) -> pd.DataFrame:
    """Every shard's manifest rows, in shard order (images for the first ``image_shards`` shards)."""
    jobs = [(i, rows, seed, i < image_shards, str(root / "shards"), demo) for i in range(shards)]
    if workers <= 1:
        return pd.concat(map(make_shard, jobs), ignore_index=True)
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return pd.concat(pool.map(make_shard, jobs, chunksize=4), ignore_index=True)


# ---- one curate run, measured -------------------------------------------------------------------------------

def _hwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        pass
    except Exception:  # the process went away between two reads
        return []
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent = int(fh.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def run_curate(run_dir: Path, params_path: Path, manifest: Path, shards: Path, scorer: Path,
               poll_s: float = 0.1) -> dict:
    """A fresh ``clipmill stage curate`` process: its wall and CPU time, the driver's and the largest worker's peak RSS.

    Peak RSS is each process's VmHWM, read every ``poll_s`` (the children's ``ru_maxrss`` would count the pages of
    this process that the fork copied before the exec)."""
    out_dir = run_dir / "curate"
    shutil.rmtree(out_dir, ignore_errors=True)
    log_path = run_dir / "curate.log"
    command = [sys.executable, "-m", "clipmill", "stage", "curate", "--params", str(params_path),
               "--manifest", str(manifest), "--shards", str(shards), "--bootstrap-model", str(scorer),
               "--out", str(out_dir)]
    driver_kb, worker_kb = 0, 0
    load_before = os.getloadavg()[0]
    with open(log_path, "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        while True:
            driver_kb = max(driver_kb, _hwm_kb(process.pid) or 0)
            for child in _descendants(process.pid):
                worker_kb = max(worker_kb, _hwm_kb(child) or 0)
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(poll_s)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"clipmill stage curate failed (exit {process.returncode}):\n{tail}")
    return {"out_dir": out_dir, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "driver_peak_rss_mb": driver_kb / 1024, "worker_peak_rss_mb": worker_kb / 1024,
            "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def units_of(out_dir: Path) -> list[str]:
    """The units of a curate run ('crawl/00012': download shards may sit in one folder per URL list)."""
    folder = out_dir / "units"
    return sorted(p.relative_to(folder).as_posix()[:-len(".done")] for p in folder.rglob("*.done"))


def step_costs(out_dir: Path) -> dict:
    """Per step: its input samples, task seconds (every phase's work, summed over shards), wall seconds and driver
    seconds, from the run's ``timings.json``.

    A step's driver seconds are its wall time outside its parallel phases: combine, state, summary. ``split_s`` is
    the stage's split of the manifest into units, before the steps.
    """
    summary = json.loads((out_dir / "summary.json").read_text())
    timings = json.loads((out_dir / "timings.json").read_text())
    steps = {}
    for s in summary["steps"]:
        t = timings["steps"][s["step"]]
        map_s = t["phases"].get("map", {}).get("task_seconds", 0.0)
        decide_s = sum(p["task_seconds"] for name, p in t["phases"].items() if name != "map")
        driver_s = max(0.0, t["wall_seconds"] - sum(p["wall_seconds"] for p in t["phases"].values()))
        steps[s["step"]] = {"input": s["input"], "kept": s["kept"], "task_s": map_s + decide_s, "map_task_s": map_s,
                            "decide_task_s": decide_s, "wall_s": t["wall_seconds"], "driver_s": driver_s}
    return {"samples": summary["samples"], "shards": summary["shards"], "kept": summary["kept"],
            "stage_wall_s": timings["wall_seconds"], "split_s": timings["split_seconds"], "steps": steps}


# ---- the same work with the bare libraries ------------------------------------------------------------------

def _read_units(folder: Path, units: list[str], columns: list[str] | None = None) -> pd.DataFrame:
    """Every unit's table under ``folder`` (``<unit>.parquet``), concatenated in unit order."""
    return pd.concat([pd.read_parquet(folder / f"{unit}.parquet", columns=columns) for unit in units],
                     ignore_index=True)


def _best(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def bare_rules(rows: pd.DataFrame, filt: dict) -> np.ndarray:
    """DataComp's basic rules with pandas and re: True where a row is dropped."""
    caption = rows["caption"].fillna("").astype(str)
    width = rows["original_width"].astype("float64").to_numpy()
    height = rows["original_height"].astype("float64").to_numpy()
    drop = np.zeros(len(rows), dtype=bool)
    if filt.get("max_caption_chars") is not None:
        drop |= (caption.str.len() > filt["max_caption_chars"]).to_numpy()
    if filt.get("min_words") is not None:
        drop |= (caption.str.split().str.len() < filt["min_words"]).to_numpy()
    if filt.get("min_chars") is not None:
        drop |= (caption.str.strip().str.len() < filt["min_chars"]).to_numpy()
    if filt.get("boilerplate_patterns"):
        patterns = [re.compile(p) for p in filt["boilerplate_patterns"]]
        drop |= np.array([any(p.search(" ".join(t.split())) for p in patterns) for t in caption], dtype=bool)
    if filt.get("min_image_side") is not None:
        drop |= np.minimum(width, height) < filt["min_image_side"]
    if filt.get("max_aspect_ratio") is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            drop |= np.maximum(width, height) / np.minimum(width, height) > filt["max_aspect_ratio"]
    return drop


def bare_dedup(rows: pd.DataFrame) -> int:
    """Exact-duplicate images with pandas: every row but the smallest uid of each sha256; returns the count."""
    return int(rows.sort_values("uid").duplicated("sha256").sum())


def bare_automaton(entries: list[str]):
    """pyahocorasick's automaton of the metadata entries, spaced as MetaCLIP matches them (built once, as the
    step builds its matcher once per worker)."""
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for index, entry in enumerate(entries):
        automaton.add_word(f" {entry} ", index)
    automaton.make_automaton()
    return automaton


def bare_matches(automaton, captions: list[str]) -> list[int]:
    """MetaCLIP matching as a plain pyahocorasick loop: the number of distinct entries per caption."""
    out = []
    for text in captions:
        text = f" {text} "
        for mark in ",.;:?!`":
            text = text.replace(mark, f" {mark} ")
        text = text.replace("\t", " ").replace("\n", " ").replace("\r", " ")
        out.append(len({index for _, index in automaton.iter(text)}))
    return out


def baselines(out_dir: Path, params: dict, costs: dict, repeats: int) -> dict:
    """Bare-library seconds for the rules, dedup and the balance matches over the rows the stage's steps saw."""
    from clipmill.components.balance.matching import read_metadata

    steps = costs["steps"]
    names = units_of(out_dir)
    units = _read_units(out_dir / "units", names)
    result = {}
    if "rules" in steps:
        rules_s, drop = _best(lambda: bare_rules(units, params["filter"]), repeats)
        stage_dropped = steps["rules"]["input"] - steps["rules"]["kept"]
        if int(drop.sum()) != stage_dropped or len(units) != steps["rules"]["input"]:
            raise AssertionError(f"rules: pandas/re drops {int(drop.sum())}, the step {stage_dropped}")
        result["rules"] = {"bare": "pandas+re", "bare_s": rules_s, "stage_task_s": steps["rules"]["task_s"]}
        units = units[~drop]
    if "dedup" in steps and params["filter"].get("dedup_images", True):
        rows = units[units["uid"].isin(_read_units(out_dir / "steps" / "dedup" / "map", names, ["uid"])["uid"])]
        dedup_s, dropped = _best(lambda: bare_dedup(rows[["uid", "sha256"]]), repeats)
        stage_dropped = steps["dedup"]["input"] - steps["dedup"]["kept"]
        if dropped != stage_dropped:
            raise AssertionError(f"dedup: pandas drops {dropped}, the step {stage_dropped}")
        result["dedup"] = {"bare": "pandas sort+duplicated", "bare_s": dedup_s,
                           "stage_task_s": steps["dedup"]["task_s"]}
    if "balance" in steps:
        mapped = _read_units(out_dir / "steps" / "balance" / "map", names,
                             ["uid", "matched_entries"])
        captions = units.set_index("uid")["caption"].reindex(mapped["uid"]).fillna("").astype(str).tolist()
        automaton = bare_automaton(read_metadata(ROOT / params["balance"]["metadata"]))
        match_s, counts = _best(lambda: bare_matches(automaton, captions), repeats)
        if counts != mapped["matched_entries"].map(len).tolist():
            raise AssertionError("balance: the plain pyahocorasick loop and the step's matches disagree")
        result["balance.map"] = {"bare": "pyahocorasick loop", "bare_s": match_s,
                                 "stage_task_s": steps["balance"]["map_task_s"]}
    for r in result.values():
        r["ratio"] = round(r["bare_s"] / r["stage_task_s"], 3) if r["stage_task_s"] else None
        r["bare_s"], r["stage_task_s"] = round(r["bare_s"], 4), round(r["stage_task_s"], 4)
    return result


# ---- the benchmark ------------------------------------------------------------------------------------------

def fit_exponent(samples: list[float], seconds: list[float]) -> float | None:
    """b of seconds ~ samples^b (least squares in log-log); None with fewer than two distinct sizes."""
    pairs = [(n, s) for n, s in zip(samples, seconds) if n > 0 and s > 0]
    if len({n for n, _ in pairs}) < 2:
        return None
    x, y = np.log([n for n, _ in pairs]), np.log([s for _, s in pairs])
    return round(float(np.polyfit(x, y, 1)[0]), 3)


def write_params(path: Path, steps: list[str], workers: int, device: str | None) -> dict:
    """The run's params.yaml (the demo's, tracking off, ``steps`` on the local executor); returns every section
    with the schema's defaults filled in (params.yaml states only the demo's choices)."""
    from clipmill.params import load_params

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.setdefault("tracking", {})["enabled"] = False
    params.setdefault("curate", {}).update(steps=steps, executor="local", workers=workers)
    if device:
        params.setdefault("score", {})["device"] = device
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return load_params(path).model_dump(mode="json")


def summarize_run(kind: str, scale: int, rows: int, run: dict, costs: dict, bare: dict) -> dict:
    per_step = {}
    for name, s in costs["steps"].items():
        k = s["input"] / 1000 if s["input"] else float("nan")
        per_step[name] = {"input": s["input"], "kept": s["kept"], "task_s": round(s["task_s"], 3),
                          **({"map_task_s": round(s["map_task_s"], 3), "decide_task_s": round(s["decide_task_s"], 3)}
                             if s["map_task_s"] else {}),
                          "wall_s": round(s["wall_s"], 3),
                          "driver_s": None if s["driver_s"] is None else round(s["driver_s"], 3),
                          "task_s_per_1k": round(s["task_s"] / k, 4), "wall_s_per_1k": round(s["wall_s"] / k, 4)}
    drivers = [s["driver_s"] for s in costs["steps"].values()]
    driver_s = None if None in drivers else sum(drivers)
    per_1k = costs["samples"] / 1000
    return {"run": kind, "scale": scale, "rows": rows, "samples": costs["samples"], "shards": costs["shards"],
            "kept": costs["kept"], "wall_s": round(run["wall_s"], 2), "stage_wall_s": round(costs["stage_wall_s"], 2),
            "cpu_s": round(run["cpu_s"], 2), "wall_s_per_1k": round(run["wall_s"] / per_1k, 4),
            "split_s": round(costs["split_s"], 3), "split_s_per_1k": round(costs["split_s"] / per_1k, 4),
            "steps_driver_s": None if driver_s is None else round(driver_s, 3),
            "steps_driver_s_per_1k": None if driver_s is None else round(driver_s / per_1k, 4),
            "driver_peak_rss_mb": round(run["driver_peak_rss_mb"], 1),
            "worker_peak_rss_mb": round(run["worker_peak_rss_mb"], 1), "loadavg_1min": run["loadavg_1min"],
            "steps": per_step, "bare": bare}


def growth(runs: list[dict]) -> dict:
    """Exponents per step and overall, and the RSS ratios.

    Per step: task and wall seconds against the samples the step got (its input) and against the crawl's
    samples (a step after balance gets a smaller share of a larger pool, since balance.t is fixed). The time
    target is judged on the task exponents against the step's input.
    """
    out: dict = {"steps": {}}
    names = list(dict.fromkeys(n for r in runs for n in r["steps"]))
    for name in names:
        have = [r for r in runs if name in r["steps"]]
        n, crawl = [r["steps"][name]["input"] for r in have], [r["samples"] for r in have]
        task, wall = [r["steps"][name]["task_s"] for r in have], [r["steps"][name]["wall_s"] for r in have]
        out["steps"][name] = {"task_exponent": fit_exponent(n, task), "wall_exponent": fit_exponent(n, wall),
                              "task_exponent_vs_crawl": fit_exponent(crawl, task),
                              "wall_exponent_vs_crawl": fit_exponent(crawl, wall)}
    samples = [r["samples"] for r in runs]
    # The driver's serial parts, against the crawl's samples: the split of the manifest, and the steps' time
    # outside their parallel phases (combine, state, summary).
    out["driver"] = {"split_exponent": fit_exponent(samples, [r["split_s"] for r in runs]),
                     "steps_driver_exponent": None if any(r["steps_driver_s"] is None for r in runs) else
                     fit_exponent(samples, [r["steps_driver_s"] for r in runs])}
    out["overall_wall_exponent"] = fit_exponent(samples, [r["wall_s"] for r in runs])
    out["overall_stage_wall_exponent"] = fit_exponent(samples, [r["stage_wall_s"] for r in runs])
    out["overall_cpu_exponent"] = fit_exponent(samples, [r["cpu_s"] for r in runs])
    out["overall_task_exponent"] = fit_exponent(samples, [sum(s["task_s"] for s in r["steps"].values()) for r in runs])
    small, large = min(runs, key=lambda r: r["scale"]), max(runs, key=lambda r: r["scale"])
    out["sizes"] = f"x{large['scale']}/x{small['scale']}"
    out["driver_rss_ratio"] = round(large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"], 3)
    out["worker_rss_ratio"] = round(large["worker_peak_rss_mb"] / small["worker_peak_rss_mb"], 3)
    exponents = [s["task_exponent"] for s in out["steps"].values() if s["task_exponent"] is not None]
    exponents += [e for e in out["driver"].values() if e is not None]
    out["max_step_exponent"] = max(exponents) if exponents else None
    # None: a single size, nothing to fit
    out["time_target_met"] = None if out["max_step_exponent"] is None else out["max_step_exponent"] <= 1.05
    out["memory_target_met"] = None if large is small else out["driver_rss_ratio"] <= 1.2
    return out


def _verdict(met: bool | None) -> str:
    return "n/a (one size)" if met is None else "met" if met else "NOT met"


def print_table(kind: str, runs: list[dict], fit: dict) -> None:
    names = list(dict.fromkeys(n for r in runs for n in r["steps"]))
    head = (f"{'scale':>5} {'rows':>8} {'samples':>8} {'wall s':>7} {'cpu s':>7} "
            + " ".join(f"{n + ' s/1k':>16}" for n in names) + f" {'split|drv s/1k':>15} {'driver MB':>9} "
            f"{'worker MB':>9} {'load':>9}")
    print(f"\n{kind}: per step s/1k of its input samples as task|wall; split|drv: the driver's serial s/1k crawl "
          f"samples (manifest split | combine, state and summary of every step)")
    print(head)
    for r in runs:
        cells = " ".join(f"{r['steps'][n]['task_s_per_1k']:.3f}|{r['steps'][n]['wall_s_per_1k']:.3f}".rjust(16)
                         if n in r["steps"] else f"{'-':>16}" for n in names)
        load = "{:.1f}>{:.1f}".format(*r["loadavg_1min"])
        driver = r["steps_driver_s_per_1k"]
        serial = f"{r['split_s_per_1k']:.3f}|" + ("-" if driver is None else f"{driver:.3f}")
        print(f"{'x' + str(r['scale']):>5} {r['rows']:>8} {r['samples']:>8} {r['wall_s']:>7.1f} {r['cpu_s']:>7.1f} "
              f"{cells} "
              f"{serial:>15} {r['driver_peak_rss_mb']:>9.1f} {r['worker_peak_rss_mb']:>9.1f} {load:>9}")
    exps = "; ".join(f"{n} {fit['steps'][n]['task_exponent']}|{fit['steps'][n]['wall_exponent']}" for n in names)
    crawl = "; ".join(f"{n} {fit['steps'][n]['task_exponent_vs_crawl']}|{fit['steps'][n]['wall_exponent_vs_crawl']}"
                      for n in names)
    print(f"exponent b of seconds ~ (step input)^b, task|wall: {exps}; driver, vs crawl samples: split "
          f"{fit['driver']['split_exponent']}, steps' serial part {fit['driver']['steps_driver_exponent']} "
          f"-> every b <= 1.05: {_verdict(fit['time_target_met'])}")
    print(f"exponent b of seconds ~ (crawl samples)^b, task|wall: {crawl}")
    print(f"overall b: process wall {fit['overall_wall_exponent']}, stage wall {fit['overall_stage_wall_exponent']}, "
          f"CPU {fit['overall_cpu_exponent']}, task {fit['overall_task_exponent']}")
    print(f"peak RSS {fit['sizes']}: driver {fit['driver_rss_ratio']} (target <= 1.2: "
          f"{_verdict(fit['memory_target_met'])}), worker {fit['worker_rss_ratio']}")
    for r in runs:
        if r["bare"]:
            print(f"  x{r['scale']} vs bare: " + "; ".join(
                f"{n} ({b['bare']}) {b['bare_s']:.3f} s vs step {b['stage_task_s']:.3f} s, ratio {b['ratio']}"
                for n, b in r["bare"].items()))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=int, default=12000, help="manifest rows at x1")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies --base (e.g. 0.25 for a quick run)")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16], help="crawl sizes, multiples of x1")
    parser.add_argument("--image-scales", type=int, nargs="*", default=[1, 4],
                        help="sizes that also run the full list with score over real images (none: skip)")
    parser.add_argument("--shard-rows", type=int, default=1000, help="manifest rows per download shard")
    parser.add_argument("--workers", type=int, default=2, help="curate.workers of the runs")
    parser.add_argument("--device", default=None, help="score.device of the runs (default: params.yaml's)")
    parser.add_argument("--runs", type=int, default=1,
                        help="curate runs per size, the sizes in turn; per step the fastest is reported")
    parser.add_argument("--repeats", type=int, default=3, help="bare-library timings: best of this many")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep the crawl and the runs here (default: a temp dir)")
    parser.add_argument("--out", default="reports/bench/curate.json", help="results (JSON)")
    return parser.parse_args(argv)


def _write_manifests(args, work: Path, sizes: list[int], total_shards: int, image_shards: int,
                     base_shards: int) -> tuple[dict[int, Path], float]:
    """The synthetic crawl, cut into one manifest per crawl size: ({scale: manifest}, seconds to generate)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    started = time.perf_counter()
    crawl = make_crawl(work, total_shards, image_shards, args.shard_rows, args.seed, params["demo_corpus"],
                       args.workers)
    generate_s = time.perf_counter() - started
    print(f"crawl: {len(crawl)} rows in {total_shards} shards of {args.shard_rows} "
          f"({(crawl['status'] == 'success').mean():.1%} downloaded, "
          f"{crawl['sha256'].dropna().duplicated().sum()} duplicate images; images for {image_shards} shards) "
          f"in {generate_s:.1f} s", file=sys.stderr)
    manifests = {}
    for scale in sizes:
        manifests[scale] = work / f"manifest_x{scale}.parquet"
        crawl.iloc[:base_shards * scale * args.shard_rows].to_parquet(manifests[scale], index=False,
                                                                      row_group_size=MANIFEST_ROW_GROUP)
    return manifests, generate_s


def _random_scorer(work: Path) -> Path:
    import torch

    from clipmill.components.common.model import create_clip, export_local_dir

    scorer = work / "scorer"
    if not scorer.is_dir():
        torch.manual_seed(0)
        export_local_dir(create_clip("clipmill-tiny"), scorer)
    return scorer


def _size_runs(args, kind: str, steps: list[str], scale: int, base_shards: int, work: Path, manifest: Path,
               scorer: Path) -> Callable[[int], dict]:
    """A function that does one curate run of one crawl size (its attempt number given) and returns its summary."""
    run_dir = work / f"{kind}_x{scale}"
    run_dir.mkdir(parents=True, exist_ok=True)
    run_params = write_params(run_dir / "params.yaml", steps, args.workers, args.device)

    def once(attempt: int) -> dict:
        print(f"== {kind} x{scale}: clipmill stage curate over {base_shards * scale} shards"
              + (f" (run {attempt + 1} of {args.runs})" if args.runs > 1 else ""), file=sys.stderr)
        run = run_curate(run_dir, run_dir / "params.yaml", manifest, work / "shards", scorer)
        costs = step_costs(run["out_dir"])
        bare = baselines(run["out_dir"], run_params, costs, args.repeats)
        return summarize_run(kind, scale, base_shards * scale * args.shard_rows, run, costs, bare)
    return once


def best_of(tries: list[dict]) -> dict:
    """One size's runs as one: the run with the shortest stage wall time, with each step's fastest task time of
    all the runs (best of N, as timeit reports; a step's input is the same in every run)."""
    best = dict(min(tries, key=lambda r: r["stage_wall_s"]))
    best["steps"] = {name: min((t["steps"][name] for t in tries), key=lambda s: s["task_s"]) for name in best["steps"]}
    best["stage_wall_s_of_runs"] = [r["stage_wall_s"] for r in tries]
    return best


def measure_sizes(args, kind: str, steps: list[str], sizes: list[int], base_shards: int, work: Path,
                  manifests: dict, scorer: Path) -> list[dict]:
    """``args.runs`` runs of every size, taken in turn (x1, x4, x16, x1, ...: a slow spell of the machine falls on
    every size, not on the last one), each size's runs made one by ``best_of``."""
    runners = [_size_runs(args, kind, steps, scale, base_shards, work, manifests[scale], scorer) for scale in sizes]
    tries: list[list[dict]] = [[] for _ in sizes]
    for attempt in range(max(1, args.runs)):
        for runner, done in zip(runners, tries):
            done.append(runner(attempt))
    return [best_of(done) for done in tries]


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    base_shards = max(1, round(args.base * args.scale / args.shard_rows))
    scales = sorted(set(args.scales))
    image_scales = sorted(set(args.image_scales or []))
    total_shards = base_shards * max(scales + image_scales)
    image_shards = base_shards * max(image_scales, default=0)
    with tempfile.TemporaryDirectory(prefix="curate-bench-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        manifests, generate_s = _write_manifests(args, work, sorted(set(scales + image_scales)), total_shards,
                                                 image_shards, base_shards)
        scorer = _random_scorer(work) if image_scales else work / "scorer"
        results: dict = {"base_rows": base_shards * args.shard_rows, "shard_rows": args.shard_rows,
                         "workers": args.workers, "cpus": os.cpu_count(), "generate_s": round(generate_s, 1)}
        plans = [("no-pixels", NO_PIXEL_STEPS, scales)]
        if image_scales:
            from clipmill.components.common.curation import STEP_NAMES

            plans.append(("full", list(STEP_NAMES), image_scales))
        for kind, steps, sizes in plans:
            runs = measure_sizes(args, kind, steps, sizes, base_shards, work, manifests, scorer)
            fit = growth(runs)
            print_table(kind, runs, fit)
            results[kind] = {"steps": steps, "runs": runs, "growth": fit}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
