"""Tiny learnable image-text data for the training tests: coloured shapes with matching captions.

``write_shape_shards`` writes webdataset shards in clipmill's sample format (jpg, txt, json with uid and
rewrites); ``write_shape_evalsets`` writes the held-out sets in the layout of ``data/eval/``; ``run_stage`` runs
a stage's CLI module as ``clipmill stage <name>`` does. The tests of this module check that the data is what
the training code expects.
"""
from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path
from types import ModuleType

import pandas as pd
import webdataset
from PIL import Image, ImageDraw

from clipmill.components.common.hashing import make_uid

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")
CLASSES = [f"{c} {s}" for c in COLORS for s in SHAPES]
TEMPLATES = ["a photo of a {}.", "a {}."]


def render(color: str, shape: str, rng: random.Random, fmt: str = "JPEG") -> bytes:
    size = rng.randint(56, 80)
    image = Image.new("RGB", (size, size), tuple(rng.randint(225, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    r = rng.randint(size // 4, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def _caption(color: str, shape: str, rng: random.Random) -> str:
    return rng.choice(["a {c} {s}", "{c} {s}", "a {c} {s} on white", "picture of a {c} {s}"]).format(c=color, s=shape)


def write_shape_shards(out: Path, *, shards: int = 4, per_shard: int = 64, seed: int = 0,
                       rewrites: bool = True) -> list[Path]:
    """``shards`` tar files of ``per_shard`` samples each in ``out``; returns their paths."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = out / f"{s:05d}.tar"
        with webdataset.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
                caption = _caption(color, shape, rng)
                uid = make_uid(f"http://shapes.test/{seed}/{s}/{i}.jpg", caption)
                meta = {"uid": uid}
                if rewrites:
                    meta["rewrites"] = [f"an image of a {shape} in {color}", f"{color} coloured {shape}"]
                sink.write({"__key__": f"{s:05d}{i:04d}", "jpg": render(color, shape, rng), "txt": caption,
                            "json": meta})
        paths.append(path)
    return paths


def write_shape_evalsets(out: Path, *, per_class: int = 4, retrieval_size: int = 24, seed: int = 1) -> Path:
    """zeroshot.parquet + zeroshot_classes.json + retrieval.parquet (two captions per image) in ``out``."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, name in enumerate(CLASSES):
        color, shape = name.split()
        for k in range(per_class):
            rows.append({"uid": make_uid(f"http://eval.test/{label}/{k}.png", name),
                         "image": render(color, shape, rng, "PNG"), "label": label, "class_name": name})
    pd.DataFrame(rows).to_parquet(out / "zeroshot.parquet", index=False)
    (out / "zeroshot_classes.json").write_text(json.dumps({"classes": CLASSES, "templates": TEMPLATES}))
    rows = []
    for i in range(retrieval_size):
        color, shape = CLASSES[i % len(CLASSES)].split()
        captions = [f"a {color} {shape}", f"{shape} in {color}"]
        rows.append({"uid": make_uid(f"http://eval.test/r/{i}.png", captions[0]),
                     "image": render(color, shape, rng, "PNG"), "captions": captions})
    pd.DataFrame(rows).to_parquet(out / "retrieval.parquet", index=False)
    return out


def run_stage(cli: ModuleType, params_file: Path, argv: list[str]) -> int:
    """``clipmill stage <name> --params params_file *argv``, through the stage's own CLI module only."""
    from clipmill.params import load_params

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return int(cli.run(parser.parse_args(argv), load_params(params_file)) or 0)


def test_shape_shards_hold_the_clipmill_sample_format(tmp_path):
    write_shape_shards(tmp_path, shards=1, per_shard=5)
    samples = list(webdataset.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False))
    assert len(samples) == 5
    meta = json.loads(samples[0]["json"])
    assert set(samples[0]) >= {"__key__", "jpg", "txt", "json"} and len(meta["uid"]) == 32 and meta["rewrites"]


def test_shape_evalsets_load_as_an_eval_suite(tmp_path):
    from clipmill.components.common.evalsets import load_eval_suite

    suite = load_eval_suite(write_shape_evalsets(tmp_path, per_class=1, retrieval_size=3))
    assert suite.zeroshot.classes == CLASSES and len(suite.zeroshot.images) == len(CLASSES)
    assert [len(c) for c in suite.retrieval.captions] == [2, 2, 2]
