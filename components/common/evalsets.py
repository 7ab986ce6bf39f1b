"""The held-out evaluation sets (``data/eval/``) and the one function that scores a model on them.

Files: ``zeroshot.parquet`` (uid, image bytes, label, class_name) with ``zeroshot_classes.json``
({"classes": [...], "templates": ["a photo of a {}.", ...]}), and ``retrieval.parquet`` (uid, image bytes,
captions: list of str). In-loop validation during training and the evaluation stage both call
``evaluate_clip``, so they report the same numbers under the same names.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import metrics
from .errors import InputError
from .model import ClipModel, embed_images, embed_texts, preprocess_images

ZEROSHOT_FILE = "zeroshot.parquet"
ZEROSHOT_CLASSES_FILE = "zeroshot_classes.json"
RETRIEVAL_FILE = "retrieval.parquet"


@dataclass
class ZeroShotSet:
    uids: list[str]
    images: list[bytes]
    labels: np.ndarray          # index into ``classes``
    classes: list[str]
    templates: list[str]        # each with one "{}" for the class name


@dataclass
class RetrievalSet:
    uids: list[str]
    images: list[bytes]
    captions: list[list[str]]   # one or more per image


@dataclass
class EvalSuite:
    zeroshot: ZeroShotSet | None = None
    retrieval: RetrievalSet | None = None
    # preprocessed pixels per (set, transform): in-loop validation reuses them at every evaluation
    _pixels: dict = field(default_factory=dict, repr=False)

    def pixels(self, name: str, clip: ClipModel) -> torch.Tensor:
        key = (name, id(clip.val_transform))
        if key not in self._pixels:
            self._pixels[key] = preprocess_images(clip, getattr(self, name).images)
        return self._pixels[key]

    @property
    def empty(self) -> bool:
        return self.zeroshot is None and self.retrieval is None


def _read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    try:
        table = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InputError(path, f"not a readable parquet file: {e}") from None
    for col in columns:
        if col not in table.columns:
            raise InputError(path, "missing column", field=col)
    if table.empty:
        raise InputError(path, "no rows")
    for i, image in enumerate(table["image"]):
        if not isinstance(image, bytes) or not image:
            raise InputError(path, f"row {i}: image is not non-empty bytes", field="image")
    return table


def load_zeroshot(eval_dir: Path) -> ZeroShotSet:
    path, classes_path = eval_dir / ZEROSHOT_FILE, eval_dir / ZEROSHOT_CLASSES_FILE
    if not classes_path.is_file():
        raise InputError(classes_path, f"missing (needed with {ZEROSHOT_FILE})")
    try:
        spec = json.loads(classes_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(classes_path, f"not valid JSON: {e}") from None
    classes, templates = spec.get("classes"), spec.get("templates")
    if not classes or not all(isinstance(c, str) for c in classes):
        raise InputError(classes_path, "expected a non-empty list of class names", field="classes")
    if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise InputError(classes_path, "expected a non-empty list of templates containing '{}'", field="templates")
    table = _read_table(path, ["uid", "image", "label", "class_name"])
    labels = table["label"].to_numpy()
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= len(classes):
        raise InputError(path, f"labels must be integers in [0, {len(classes)})", field="label")
    named = np.asarray(classes, dtype=object)[labels]
    if (wrong := np.flatnonzero(named != table["class_name"].to_numpy())).size:
        i = int(wrong[0])
        raise InputError(path, f"row {i}: class_name {table['class_name'].iloc[i]!r} is not classes[{labels[i]}] "
                               f"= {classes[labels[i]]!r}", field="class_name")
    return ZeroShotSet(table["uid"].tolist(), table["image"].tolist(), labels.astype(np.int64), list(classes),
                       list(templates))


def load_retrieval(eval_dir: Path) -> RetrievalSet:
    path = eval_dir / RETRIEVAL_FILE
    table = _read_table(path, ["uid", "image", "captions"])
    captions = []
    for i, caps in enumerate(table["captions"]):
        caps = list(caps) if caps is not None else []
        if not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise InputError(path, f"row {i}: expected one or more non-empty captions", field="captions")
        captions.append(caps)
    return RetrievalSet(table["uid"].tolist(), table["image"].tolist(), captions)


def load_eval_suite(eval_dir: str | os.PathLike) -> EvalSuite:
    """The sets present in ``eval_dir``; an error when it has none or one is malformed."""
    eval_dir = Path(eval_dir)
    if not eval_dir.is_dir():
        raise InputError(eval_dir, "evaluation directory does not exist")
    suite = EvalSuite(
        zeroshot=load_zeroshot(eval_dir) if (eval_dir / ZEROSHOT_FILE).exists() else None,
        retrieval=load_retrieval(eval_dir) if (eval_dir / RETRIEVAL_FILE).exists() else None,
    )
    if suite.empty:
        raise InputError(eval_dir, f"no evaluation set ({ZEROSHOT_FILE} or {RETRIEVAL_FILE})")
    return suite


def evaluate_clip(clip: ClipModel, suite: EvalSuite, batch_size: int = 256) -> dict[str, float]:
    """Metrics of ``clip`` on every set of ``suite``, keyed ``zeroshot/acc1``, ``retrieval/..._recall_at_5``, ...

    ``modality_gap`` is measured on the retrieval set (images and their captions).
    """
    out: dict[str, float] = {}
    if (zs := suite.zeroshot) is not None:
        prompts = [t.format(c) for c in zs.classes for t in zs.templates]
        text = embed_texts(clip, prompts, batch_size).view(len(zs.classes), len(zs.templates), -1)
        images = embed_images(clip, suite.pixels("zeroshot", clip), batch_size)
        scores = metrics.zeroshot_metrics(images, metrics.zeroshot_classifier(text), torch.from_numpy(zs.labels))
        out.update({f"zeroshot/{k}": v for k, v in scores.items()})
    if (rt := suite.retrieval) is not None:
        flat = [c for caps in rt.captions for c in caps]
        text_image = torch.tensor([i for i, caps in enumerate(rt.captions) for _ in caps])
        text = embed_texts(clip, flat, batch_size)
        images = embed_images(clip, suite.pixels("retrieval", clip), batch_size)
        out.update({f"retrieval/{k}": v for k, v in metrics.retrieval_metrics(images, text, text_image).items()})
        out["retrieval/modality_gap"] = metrics.modality_gap(images, text)
    return out
