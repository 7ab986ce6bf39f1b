"""CLIP-scoring throughput: the score step's map next to a bare open_clip inference loop.

Both score the same image-caption pairs with the same model (an open_clip ``local-dir`` export) and batch size,
in the same process, after a warm-up, interleaved batch by batch (alternating which goes first) over
``--repeats`` passes, so both see the same background load. The step (built once, as a curation worker builds
it) reads the images from webdataset shards in its ``map``; the bare loop gets the image bytes already in memory
and does only decode, open_clip preprocessing, ``encode_image``/``encode_text`` and the cosine. Target: ratio >= 0.9.

    python -m benchmarks.score_bench [--model clipmill-tiny] [--images 512] [--batch-size 64] [--device cpu]
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import torch
from PIL import Image

from clipmill.components.common.model import create_clip, export_local_dir
from clipmill.components.common.shards import ShardReader, shard_file_name
from clipmill.components.common.steps import StepContext
from clipmill.components.score.params import ScoreParams
from clipmill.components.score.step import ScoreStep
from tests.curation_fixtures import make_download


def bare_loop(model, preprocess, tokenizer, images: list[bytes], captions: list[str], batch_size: int,
              device: str) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB"))
                                  for b in images[i:i + batch_size]])
            image_features = model.encode_image(pixels.to(device), normalize=True)
            text_features = model.encode_text(tokenizer(captions[i:i + batch_size]).to(device), normalize=True)
            out.append((image_features * text_features).sum(-1).float().cpu())
    return torch.cat(out).numpy()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="clipmill-tiny",
                        help="open_clip config (randomly initialised; nothing is downloaded)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="reports/bench/score.json", help="results (JSON)")
    return parser.parse_args(argv)


def _interleaved(work: pd.DataFrame, run_stage, run_bare, batch_size: int, repeats: int) -> tuple:
    """Stage and bare loop over the same batches, alternating which goes first: (stage s, bare s, their scores)."""
    stage_s, bare_s = 0.0, 0.0
    stage_parts, bare_parts = [], []
    for repeat in range(repeats):
        for number, start in enumerate(range(0, len(work), batch_size)):
            rows = work.iloc[start:start + batch_size]
            for name in (("stage", "bare") if (repeat + number) % 2 == 0 else ("bare", "stage")):
                started = time.perf_counter()
                output = run_stage(rows) if name == "stage" else run_bare(rows)
                elapsed = time.perf_counter() - started
                if name == "stage":
                    stage_s += elapsed
                    stage_parts += [output["clip_score"].to_numpy()] if repeat == 0 else []
                else:
                    bare_s += elapsed
                    bare_parts += [output] if repeat == 0 else []
    return stage_s, bare_s, np.concatenate(stage_parts), np.concatenate(bare_parts)


def _measure(args, tmp: Path) -> tuple:
    """(rows scored, stage s, bare s, max |score difference|) over a synthetic download of ``args.images``."""
    torch.manual_seed(0)
    export = export_local_dir(create_clip(args.model), tmp / "model")
    download = make_download(tmp / "download", n=args.images, per_shard=256)
    table = download["table"]
    table = table[table["status"] == "success"].sort_values(["shard", "key"]).reset_index(drop=True)
    with ShardReader(download["shards"]) as reader:
        images = [reader.read(shard_file_name(shard), key, "jpg") for shard, key in zip(table["shard"], table["key"])]
    step = ScoreStep(ScoreParams(scorer=f"local-dir:{export}", device=args.device, batch_size=args.batch_size),
                     StepContext(shards_dir=str(download["shards"])))
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}", device=args.device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    work = table[["uid", "shard", "key", "caption"]]

    def run_stage(rows: pd.DataFrame) -> pd.DataFrame:
        return step.map(rows.reset_index(drop=True))

    def run_bare(rows: pd.DataFrame) -> np.ndarray:
        return bare_loop(model, preprocess, tokenizer, images[rows.index[0]:rows.index[-1] + 1],
                         rows["caption"].tolist(), args.batch_size, args.device)

    run_stage(work), run_bare(work)  # warm-up: first-call allocations and lazy initialisation
    stage_s, bare_s, stage_scores, bare_scores = _interleaved(work, run_stage, run_bare, args.batch_size, args.repeats)
    return table, stage_s, bare_s, float(np.abs(stage_scores - bare_scores).max())


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="score-bench-") as tmp:
        table, stage_s, bare_s, max_diff = _measure(args, Path(tmp))
    result = {
        "model": args.model, "device": args.device, "images": len(table), "batch_size": args.batch_size,
        "stage_images_per_s": round(args.repeats * len(table) / stage_s, 1),
        "bare_open_clip_images_per_s": round(args.repeats * len(table) / bare_s, 1),
        "max_abs_score_difference": max_diff,
    }
    result["ratio"] = round(result["stage_images_per_s"] / result["bare_open_clip_images_per_s"], 3)
    print(f"{args.model} on {args.device}, {len(table)} images, batch {args.batch_size}: stage "
          f"{result['stage_images_per_s']} images/s | "
          f"bare open_clip {result['bare_open_clip_images_per_s']} images/s | "
          f"ratio {result['ratio']} | max |score diff| {max_diff:.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
