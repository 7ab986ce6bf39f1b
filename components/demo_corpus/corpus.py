"""The demo_corpus stage: the synthetic crawl, its web server's content, the held-out sets, the trusted seed set.

``generate_demo_corpus`` plans everything from the seed, renders the images (a process pool), and writes
the three output directories atomically.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from clipmill.components.common.errors import ClipmillError
from clipmill.components.common.hashing import hash_obj
from clipmill.components.common.io import atomic_path
from clipmill.components.common.log import get_logger, progress_disabled
from clipmill.components.common.mirror import ROUTES_FILE, ROUTES_FORMAT
from clipmill.components.common.params import TrackingParams
from clipmill.components.common.tracking import stage_run

from .crawl import BEHAVIOURS, CAPTION_DEFECTS, IMAGE_DEFECTS, CrawlPlan, plan_crawl
from .ground_truth import GROUND_TRUTH_COLUMNS
from .heldout import PlannedSample, plan_retrieval, plan_trusted, plan_zeroshot
from .params import DemoCorpusParams
from .render import Encoding, Scene, render_job
from .scenes import zipf_probabilities
from .vocabulary import COLORS, CONCEPTS, SHAPES, ZEROSHOT_TEMPLATES

log = get_logger("demo_corpus")

URL_COLUMNS = ("uid", "url", "caption", "page_url", "crawl_date")
SUITE_FORMAT = 1  # bump when the held-out sets change meaning; the suite version changes with it
HEAD_FRACTION = 0.1  # the "head" of the concept distribution: the most popular 10% of concepts
_TAR_MTIME = 0  # fixed, so equal seeds give byte-identical shards
_CHUNKSIZE = 32


def render_images(jobs: list[tuple[Scene, Encoding]], workers: int) -> Iterator[bytes]:
    """File bytes of every job, in order, rendered by ``workers`` processes (close the iterator when done)."""
    bar = tqdm(total=len(jobs), desc="render", unit="img", disable=progress_disabled())
    start = time.perf_counter()
    pool, done = None, 0
    if workers > 1 and len(jobs) >= 4 * _CHUNKSIZE:
        # spawn: the parent may hold threads (MLflow, tqdm) that a fork would copy mid-lock
        pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        for data in pool.imap(render_job, jobs, chunksize=_CHUNKSIZE) if pool else map(render_job, jobs):
            done += 1
            bar.update()
            yield data
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
        seconds = time.perf_counter() - start
        log.info("rendered %d of %d images in %.1f s (%.0f images/s, %d workers)", done, len(jobs), seconds,
                 done / max(seconds, 1e-9), workers if pool else 1)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_crawl(plan: CrawlPlan, images: Iterator[bytes], out: Path) -> pd.DataFrame:
    """web/ (served files + routes), urls.parquet and ground_truth.parquet; returns the ground truth."""
    served = {route["file"] for route in plan.routes.values() if "file" in route}
    (out / "web" / "images").mkdir(parents=True)
    sha_of = {}
    for name in plan.files:
        data = next(images)
        sha_of[name] = _sha256(data)
        if name in served:
            (out / "web" / name).write_bytes(data)
    (out / "web" / ROUTES_FILE).write_text(json.dumps({"format": ROUTES_FORMAT, "routes": plan.routes},
                                                      sort_keys=True, indent=0) + "\n")
    truth = pd.DataFrame(plan.pairs)
    truth["image_sha256"] = truth["image_file"].map(sha_of)
    truth = truth[list(GROUND_TRUTH_COLUMNS)]
    truth[list(URL_COLUMNS)].to_parquet(out / "urls.parquet", index=False)
    truth.to_parquet(out / "ground_truth.parquet", index=False)
    return truth


def _with_images(samples: list[PlannedSample], images: Iterator[bytes]) -> pd.DataFrame:
    return pd.DataFrame([{**s.row, "image": next(images)} for s in samples])


def _write_eval(zeroshot: pd.DataFrame, retrieval: pd.DataFrame, version_of: dict, out: Path) -> dict:
    out.mkdir(parents=True)
    zeroshot[["uid", "image", "label", "class_name"]].to_parquet(out / "zeroshot.parquet", index=False)
    retrieval[["uid", "image", "captions"]].to_parquet(out / "retrieval.parquet", index=False)
    (out / "zeroshot_classes.json").write_text(
        json.dumps({"classes": list(CONCEPTS), "templates": list(ZEROSHOT_TEMPLATES),
                    # each class is a colour and a shape: acc1_colour and acc1_shape tell which the model gets
                    "attributes": {"colour": [c for c in COLORS for _ in SHAPES],
                                   "shape": [s for _ in COLORS for s in SHAPES]}}, indent=2) + "\n")
    suite = {
        "version": f"demo-{SUITE_FORMAT}-{hash_obj(version_of)[:12]}",
        "sets": {
            "zeroshot": {"file": "zeroshot.parquet", "classes_file": "zeroshot_classes.json",
                         "size": len(zeroshot), "num_classes": len(CONCEPTS)},
            "retrieval": {"file": "retrieval.parquet", "size": len(retrieval),
                          "captions_per_image": int(retrieval["captions"].map(len).min())},
        },
    }
    (out / "suite.json").write_text(json.dumps(suite, indent=2, sort_keys=True) + "\n")
    return suite


def _write_trusted(trusted: pd.DataFrame, shard_size: int, out: Path) -> None:
    """Webdataset shards trusted-000000.tar... (``__key__``=uid, jpg, txt, json {uid}) and manifest.parquet."""
    import webdataset as wds  # imports torch: loaded only when shards are written

    out.mkdir(parents=True)
    shards = []
    with wds.ShardWriter(str(out / "trusted-%06d.tar"), maxcount=shard_size, verbose=0, mtime=_TAR_MTIME) as sink:
        for row in trusted.itertuples():
            sink.write({"__key__": row.uid, "jpg": row.image, "txt": row.caption, "json": {"uid": row.uid}})
            shards.append(Path(sink.fname).name)
    manifest = trusted[["uid", "caption", "width", "height"]].assign(shard=shards, key=trusted["uid"])
    manifest.to_parquet(out / "manifest.parquet", index=False)


def _rates(truth: pd.DataFrame, names: tuple[str, ...], configured: dict[str, float], column: str | None) -> dict:
    n = len(truth)
    out = {}
    for name in names:
        count = int((truth[column] == name).sum()) if column else int(truth[name].sum())
        out[name] = {"count": count, "rate": count / n, "configured": configured.get(name)}
    return out


def crawl_summary(truth: pd.DataFrame, plan: CrawlPlan, params: DemoCorpusParams) -> dict:
    """Realised counts and rates of every behaviour, defect, noise kind and image kind, and the concept head."""
    n = len(truth)
    head = set(plan.concept_ranking[: max(int(len(CONCEPTS) * HEAD_FRACTION), 1)])
    concept_counts = Counter(c for concepts in truth["concepts"] for c in concepts)
    objects = sum(concept_counts.values())
    behaviours = _rates(truth, BEHAVIOURS, {"ok": 1 - sum(params.behaviours.model_dump().values()),
                                            **params.behaviours.model_dump()}, "behaviour")
    defects = _rates(truth, CAPTION_DEFECTS + IMAGE_DEFECTS,
                     {**params.caption_defects.model_dump(), **params.image_defects.model_dump()}, None)
    return {
        "num_pairs": n,
        "num_image_files": int(truth["image_file"].nunique()),
        "num_served_files": len({r["file"] for r in plan.routes.values() if "file" in r}),
        "behaviours": behaviours,
        "defects": defects,
        "caption_matches_image": int(truth["caption_matches_image"].sum()),
        "caption_noise": dict(sorted(Counter(k for kinds in truth["caption_noise"] for k in kinds).items())),
        "images": {
            "formats": dict(sorted(Counter(truth["image_format"]).items())),
            "modes": dict(sorted(Counter(truth["image_mode"]).items())),
            "exif_rotated": int((truth["exif_orientation"] != 1).sum()),
            "oversized": int(truth["oversized"].sum()),
            "backgrounds": dict(sorted(Counter(truth["background"]).items())),
        },
        "concepts": {
            "num_concepts": len(CONCEPTS),
            "num_seen": len(concept_counts),
            "zipf_exponent": params.zipf_exponent,
            "head_concepts": sorted(head),
            "head_share": sum(concept_counts[c] for c in head) / max(objects, 1),
            "head_share_expected": float(zipf_probabilities(len(CONCEPTS), params.zipf_exponent)[: len(head)].sum()),
            "most_common": concept_counts.most_common(10),
        },
    }


def _check_disjoint(crawl_sha: set[str], sets: dict[str, pd.DataFrame]) -> None:
    for name, table in sets.items():
        shared = crawl_sha & set(table["image"].map(_sha256))
        if shared:
            raise ClipmillError(f"demo_corpus: {len(shared)} {name} image(s) also occur in the crawl")


def generate_demo_corpus(params: DemoCorpusParams, seed: int, crawl_out: str | os.PathLike,
                         eval_out: str | os.PathLike, trusted_out: str | os.PathLike) -> dict:
    """Write the crawl (``crawl_out``: urls.parquet, web/, ground_truth.parquet, summary.json), the held-out
    sets (``eval_out``) and the trusted shards (``trusted_out``), all from (seed, params.seed_offset).

    Returns the summary (also written to ``crawl_out/summary.json``).
    """
    plan = plan_crawl(params, seed)
    zeroshot, retrieval, trusted = plan_zeroshot(params, seed), plan_retrieval(params, seed), plan_trusted(params, seed)
    jobs = [(f.scene, f.encoding) for f in plan.files.values()]
    jobs += [(s.scene, s.encoding) for s in zeroshot + retrieval + trusted]
    log.info("planned %d pairs (%d image files), %d zero-shot, %d retrieval, %d trusted images",
             len(plan.pairs), len(plan.files), len(zeroshot), len(retrieval), len(trusted))
    with closing(render_images(jobs, params.workers)) as images, \
            atomic_path(crawl_out, owner="demo_corpus") as crawl_tmp, \
            atomic_path(eval_out, owner="demo_corpus") as eval_tmp, \
            atomic_path(trusted_out, owner="demo_corpus") as trusted_tmp:
        truth = _write_crawl(plan, images, crawl_tmp)
        heldout = {"zeroshot": _with_images(zeroshot, images), "retrieval": _with_images(retrieval, images),
                   "trusted": _with_images(trusted, images)}
        _check_disjoint(set(truth["image_sha256"]), heldout)
        eval_params = {k: getattr(params, k) for k in ("seed_offset", "zeroshot_per_class", "retrieval_size",
                                                       "retrieval_captions", "min_px", "max_px", "max_objects")}
        suite = _write_eval(heldout["zeroshot"], heldout["retrieval"], {"seed": seed, **eval_params}, eval_tmp)
        _write_trusted(heldout["trusted"], params.trusted_shard_size, trusted_tmp)
        summary = crawl_summary(truth, plan, params)
        summary.update(seed=seed, seed_offset=params.seed_offset, suite_version=suite["version"],
                       eval={k: v["size"] for k, v in suite["sets"].items()}, trusted=len(trusted))
        (crawl_tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def summary_metrics(summary: dict) -> dict[str, float]:
    """The summary's realised rates and counts, flattened to MLflow metric names."""
    metrics = {"num_pairs": summary["num_pairs"], "num_image_files": summary["num_image_files"],
               "caption_matches_image": summary["caption_matches_image"],
               "concept_head_share": summary["concepts"]["head_share"]}
    for group in ("behaviours", "defects"):
        metrics.update({f"{group}.{name}.rate": v["rate"] for name, v in summary[group].items()})
    return metrics


def run_demo_corpus(params: DemoCorpusParams, seed: int, tracking: TrackingParams, crawl_out: str | os.PathLike,
                    eval_out: str | os.PathLike, trusted_out: str | os.PathLike) -> dict:
    """``generate_demo_corpus`` recorded as an MLflow stage run (metrics, summary.json and suite.json)."""
    with stage_run("demo_corpus", tracking, params) as run:
        start = time.perf_counter()
        summary = generate_demo_corpus(params, seed, crawl_out, eval_out, trusted_out)
        seconds = time.perf_counter() - start
        log.info("demo corpus: %d pairs in %.1f s (%.0f pairs/s), %.1f%% answer 200 at once",
                 summary["num_pairs"], seconds, summary["num_pairs"] / max(seconds, 1e-9),
                 100 * summary["behaviours"]["ok"]["rate"])
        if run is not None:
            import mlflow

            mlflow.log_param("project.seed", seed)
            mlflow.log_metrics({**summary_metrics(summary), "seconds": seconds, "samples_out": summary["num_pairs"],
                                "pairs_per_second": summary["num_pairs"] / max(seconds, 1e-9)})
            mlflow.log_artifact(str(Path(crawl_out) / "summary.json"))
            mlflow.log_artifact(str(Path(eval_out) / "suite.json"))
    return summary


BATCH_OFFSET_STRIDE = 1000  # batch b of the crawl uses seed_offset + b * stride: no URL repeats an earlier batch's


def generate_crawl_batch(params: DemoCorpusParams, seed: int, batch: int, num_pairs: int,
                         out: str | os.PathLike) -> dict:
    """A later batch of the synthetic crawl in ``out`` (urls.parquet, web/, ground_truth.parquet, summary.json):
    new URLs on the same sites with the same misbehaviour and defect rates, to append to the crawl with
    ``clipmill run full --new-urls out/urls.parquet``. Batch 0 is the crawl itself; batches >= 1 are new.
    """
    if batch < 1:
        raise ClipmillError(f"demo crawl batch {batch}: batches start at 1 (batch 0 is the demo_corpus crawl)")
    batch_params = params.model_copy(update={"num_pairs": num_pairs,
                                             "seed_offset": params.seed_offset + batch * BATCH_OFFSET_STRIDE})
    plan = plan_crawl(batch_params, seed)
    jobs = [(f.scene, f.encoding) for f in plan.files.values()]
    with closing(render_images(jobs, params.workers)) as images, atomic_path(out, owner="demo_urls") as tmp:
        truth = _write_crawl(plan, images, tmp)
        summary = crawl_summary(truth, plan, batch_params)
        summary.update(seed=seed, seed_offset=batch_params.seed_offset, batch=batch)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
