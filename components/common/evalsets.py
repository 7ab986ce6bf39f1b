"""The held-out evaluation sets (``data/eval/``) and the one function that scores a model on them.

Files: ``zeroshot.parquet`` (uid, image bytes, label, class_name) with ``zeroshot_classes.json``
({"classes": [...], "templates": ["a photo of a {}.", ...]}, optionally "attributes": {name: one value per
class}, e.g. the colour and the shape of "red circle"), and ``retrieval.parquet`` (uid, image bytes,
captions: list of str). In-loop validation during training and the evaluation stage both call
``evaluate_clip``, so they report the same numbers under the same names.
"""
from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from . import metrics
from .errors import InputError
from .images import ImageError, decode_image
from .io import read_text
from .model import ClipModel, embed_images, embed_texts, preprocess_images
from .text import spaced_text

ZEROSHOT_FILE = "zeroshot.parquet"
ZEROSHOT_CLASSES_FILE = "zeroshot_classes.json"
RETRIEVAL_FILE = "retrieval.parquet"
BUCKETS = ("head", "mid", "tail")  # thirds of the classes, by how often they occur in the training crawl
# A CLIP_benchmark-style dataset directory: one folder of images per class (sorted names = label order, as
# torchvision's ImageFolder), class names one per line, prompt templates one per line ("{c}" or "{}").
CLASSNAMES_FILE = "classnames.txt"
TEMPLATE_FILES = ("zeroshot_classification_templates.txt", "templates.txt")
DEFAULT_TEMPLATES = ("a photo of a {}.",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class ZeroShotSet:
    uids: list[str]
    images: list[bytes]
    labels: np.ndarray          # index into ``classes``
    classes: list[str]
    templates: list[str]        # each with one "{}" for the class name
    # attribute name -> one value per class: zeroshot/acc1_<name> is the share of images whose top-1 class has
    # the true class's value (which part of a composite class name the model gets right)
    attributes: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class RetrievalSet:
    uids: list[str]
    images: list[bytes]
    captions: list[list[str]]   # one or more per image


@dataclass
class EvalSuite:
    zeroshot: ZeroShotSet | None = None
    retrieval: RetrievalSet | None = None
    # per zero-shot class: how often it occurs in the training crawl (None: no frequency buckets)
    class_counts: np.ndarray | None = None
    # extra zero-shot tasks by name (CLIP_benchmark-style directories), scored as zeroshot_<name>/...
    extra_zeroshot: dict[str, ZeroShotSet] = field(default_factory=dict)
    # preprocessed pixels per (set, transform): in-loop validation reuses them at every evaluation
    _pixels: dict = field(default_factory=dict, repr=False)

    def pixels(self, name: str, clip: ClipModel) -> torch.Tensor:
        key = (name, repr(clip.val_transform))  # the same transform (another model of one config) reuses them
        if key not in self._pixels:
            images = self.extra_zeroshot[name].images if name in self.extra_zeroshot else getattr(self, name).images
            self._pixels[key] = preprocess_images(clip, images)
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
        spec = json.loads(read_text(classes_path))
    except json.JSONDecodeError as e:
        raise InputError(classes_path, f"not valid JSON: {e}") from None
    classes, templates = spec.get("classes"), spec.get("templates")
    if not classes or not all(isinstance(c, str) for c in classes):
        raise InputError(classes_path, "expected a non-empty list of class names", field="classes")
    if not templates or not all(isinstance(t, str) and _one_slot(t) for t in templates):
        raise InputError(classes_path, "expected a non-empty list of templates, each with exactly one '{}' (literal "
                                       "braces written '{{' and '}}')", field="templates")
    attributes = spec.get("attributes", {})
    if not isinstance(attributes, dict) or not all(
            isinstance(name, str) and name.isidentifier() and isinstance(values, list) and len(values) == len(classes)
            and all(isinstance(v, str) for v in values) for name, values in attributes.items()):
        raise InputError(classes_path, f"expected a mapping of attribute names (identifiers) to lists of "
                                       f"{len(classes)} strings, one per class", field="attributes")
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
                       list(templates), {name: list(values) for name, values in attributes.items()})


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


def load_image_folder(root: str | os.PathLike) -> ZeroShotSet:
    """A CLIP_benchmark-style zero-shot dataset directory: ``classnames.txt`` (one name per line, in label order),
    ``zeroshot_classification_templates.txt`` or ``templates.txt`` (one prompt per line with ``{c}`` or ``{}``;
    default "a photo of a {}.") and one folder of images per class, whose sorted names give the label order."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "zero-shot dataset directory does not exist")
    names_path = root / CLASSNAMES_FILE
    if not names_path.is_file():
        raise InputError(names_path, "missing: a zero-shot dataset names its classes, one per line")
    classes = [line.strip() for line in read_text(names_path).splitlines() if line.strip()]
    template_path = next((root / f for f in TEMPLATE_FILES if (root / f).is_file()), None)
    templates = list(DEFAULT_TEMPLATES)
    if template_path is not None:
        lines = read_text(template_path).splitlines()
        templates = [line.strip().replace("{c}", "{}") for line in lines if line.strip()]
        if not templates or not all(_one_slot(t) for t in templates):
            raise InputError(template_path, "expected one or more templates, each with exactly one '{c}' or '{}' "
                                            "(literal braces written '{{' and '}}')")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if len(folders) != len(classes):
        raise InputError(root, f"{len(folders)} class folders but {len(classes)} names in {CLASSNAMES_FILE}")
    uids, images, labels = [], [], []
    for label, folder in enumerate(folders):
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(folder, "no images in this class folder")
        for f in files:
            data = f.read_bytes()
            try:
                decode_image(data)
            except ImageError as e:
                raise InputError(f, f"not an image the evaluation can read ({e})") from None
            uids.append(f.relative_to(root).as_posix())
            images.append(data)
            labels.append(label)
    return ZeroShotSet(uids, images, np.asarray(labels, dtype=np.int64), classes, templates)


def _one_slot(template: str) -> bool:
    """Whether ``template`` has exactly one replacement field, ``{}`` (the class name), and no other."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError:  # an unmatched brace
        return False
    return fields == [""]


def _caption_counts(captions: pd.Series, classes: list[str]) -> np.ndarray:
    """Captions matched by each class name under the MetaCLIP rule (lower-cased, " name " in the spaced text)."""
    counts = np.zeros(len(classes), dtype=np.int64)
    keys = [f" {c.lower()} " for c in classes]
    for caption in captions.fillna("").astype(str):
        spaced = spaced_text(caption.lower())
        counts += [k in spaced for k in keys]
    return counts


def concept_counts(source: str | os.PathLike, classes: list[str]) -> np.ndarray:
    """How often each class occurs in the training crawl, from ``source``: a ground-truth table with a
    ``concepts`` column (the demo crawl: pairs whose image shows the class), a table with a ``caption`` column
    (a URL list or download manifest), or a curation directory (its ``units/``: the downloaded captions)."""
    from .curation import unit_path, units_of

    source = Path(source)
    if source.is_dir():
        units = units_of(source)
        if not units:
            raise InputError(source / "units", "no curated download shards to count classes in")
        return sum(_caption_counts(pd.read_parquet(unit_path(source, u), columns=["caption"])["caption"], classes)
                   for u in units)
    if not source.is_file():
        raise InputError(source, "no such file (evaluate.concept_counts: ground truth, URL list or curate dir)")
    try:
        columns = pq.read_schema(source).names
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InputError(source, f"not a readable parquet file ({e})") from None
    if "concepts" not in columns and "caption" not in columns:
        raise InputError(source, "expected a 'concepts' (ground truth) or 'caption' column", field="concepts")
    table = pd.read_parquet(source, columns=["concepts" if "concepts" in columns else "caption"])
    if "caption" in table.columns:
        return _caption_counts(table["caption"], classes)
    index = {c: i for i, c in enumerate(classes)}
    counts = np.zeros(len(classes), dtype=np.int64)
    for concepts in table["concepts"]:
        for concept in set(concepts if concepts is not None else ()):
            if concept in index:
                counts[index[concept]] += 1
    return counts


def frequency_buckets(counts: np.ndarray) -> np.ndarray:
    """Per class: head, mid or tail, thirds of the classes by count (most frequent first; ties by class order)."""
    order = np.argsort(-np.asarray(counts), kind="stable")
    buckets = np.empty(len(order), dtype=object)
    for name, part in zip(BUCKETS, np.array_split(order, len(BUCKETS))):
        buckets[part] = name
    return buckets


def load_eval_suite(eval_dir: str | os.PathLike, concept_source: str | os.PathLike | None = None,
                    extra_zeroshot: list[str] | tuple[str, ...] = ()) -> EvalSuite:
    """The sets present in ``eval_dir``; an error when it has none or one is malformed.

    ``concept_source``: where to count how often each zero-shot class occurs in the training crawl (see
    ``concept_counts``); ``extra_zeroshot``: CLIP_benchmark-style dataset directories, each one more task."""
    eval_dir = Path(eval_dir)
    if not eval_dir.is_dir():
        raise InputError(eval_dir, "evaluation directory does not exist")
    suite = EvalSuite(
        zeroshot=load_zeroshot(eval_dir) if (eval_dir / ZEROSHOT_FILE).exists() else None,
        retrieval=load_retrieval(eval_dir) if (eval_dir / RETRIEVAL_FILE).exists() else None,
    )
    if suite.empty:
        raise InputError(eval_dir, f"no evaluation set ({ZEROSHOT_FILE} or {RETRIEVAL_FILE})")
    if concept_source is not None and suite.zeroshot is not None:
        suite.class_counts = concept_counts(concept_source, suite.zeroshot.classes)
    for folder in extra_zeroshot:
        name = Path(folder).name
        if name in suite.extra_zeroshot:
            raise InputError(folder, f"a second extra zero-shot task named {name!r}")
        suite.extra_zeroshot[name] = load_image_folder(folder)
    return suite


@dataclass
class ZeroShotDetails:
    labels: np.ndarray       # true class per image
    predictions: np.ndarray  # top-1 class per image
    hits: np.ndarray         # top-1 correct, ties counted as misses (as in the metric)


@dataclass
class EvalResult:
    """``metrics`` (as ``evaluate_clip``) and ``per_class``: one row per zero-shot class with images (class_name,
    support, recall = top-1 recall, crawl_count and bucket when the suite has class counts); ``zeroshot``: the
    main zero-shot set's per-image predictions, and ``retrieval_images``: the retrieval images' embeddings (the
    plots draw on both)."""

    metrics: dict[str, float]
    per_class: pd.DataFrame | None = None
    zeroshot: ZeroShotDetails | None = None
    retrieval_images: torch.Tensor | None = None


def _zeroshot(clip: ClipModel, zs: ZeroShotSet, pixels: torch.Tensor, batch_size: int,
              counts: np.ndarray | None) -> tuple[dict[str, float], pd.DataFrame, ZeroShotDetails]:
    prompts = [t.format(c) for c in zs.classes for t in zs.templates]
    text = embed_texts(clip, prompts, batch_size).view(len(zs.classes), len(zs.templates), -1)
    images = embed_images(clip, pixels, batch_size)
    labels = torch.from_numpy(zs.labels)
    ranks, top1 = metrics.zeroshot_ranks(images, metrics.zeroshot_classifier(text), labels)
    scores = metrics.rank_metrics(ranks, labels)
    hits, top1 = (ranks == 0).numpy(), top1.numpy()
    for name, values in zs.attributes.items():
        values = np.asarray(values, dtype=object)
        scores[f"acc1_{name}"] = float((values[top1] == values[zs.labels]).mean())
    support = np.bincount(zs.labels, minlength=len(zs.classes))
    correct = np.bincount(zs.labels, weights=hits.astype(float), minlength=len(zs.classes))
    present = support > 0
    table = pd.DataFrame({"class_name": np.asarray(zs.classes, dtype=object)[present], "support": support[present],
                          "recall": correct[present] / support[present]})
    if counts is not None:
        table["crawl_count"] = np.asarray(counts)[present]
        table["bucket"] = frequency_buckets(counts)[present]
        for bucket in BUCKETS:
            chosen = table["recall"][table["bucket"] == bucket]
            if len(chosen):
                scores[f"recall_{bucket}"] = float(chosen.mean())
    return scores, table, ZeroShotDetails(zs.labels, top1, hits)


def evaluate_details(clip: ClipModel, suite: EvalSuite, batch_size: int = 256) -> EvalResult:
    """``evaluate_clip``'s metrics plus the per-class table of the main zero-shot set."""
    out: dict[str, float] = {}
    table = details = images = None
    if (zs := suite.zeroshot) is not None:
        scores, table, details = _zeroshot(clip, zs, suite.pixels("zeroshot", clip), batch_size, suite.class_counts)
        out.update({f"zeroshot/{k}": v for k, v in scores.items()})
    for name, extra in suite.extra_zeroshot.items():
        scores, *_ = _zeroshot(clip, extra, suite.pixels(name, clip), batch_size, None)
        out.update({f"zeroshot_{name}/{k}": v for k, v in scores.items()})
    if (rt := suite.retrieval) is not None:
        flat = [c for caps in rt.captions for c in caps]
        text_image = torch.tensor([i for i, caps in enumerate(rt.captions) for _ in caps])
        text = embed_texts(clip, flat, batch_size)
        images = embed_images(clip, suite.pixels("retrieval", clip), batch_size)
        out.update({f"retrieval/{k}": v for k, v in metrics.retrieval_metrics(images, text, text_image).items()})
        out["retrieval/modality_gap"] = metrics.modality_gap(images, text)
    return EvalResult(out, table, details, images)


def evaluate_clip(clip: ClipModel, suite: EvalSuite, batch_size: int = 256) -> dict[str, float]:
    """Metrics of ``clip`` on every set of ``suite``, keyed ``zeroshot/acc1``, ``retrieval/..._recall_at_5``, ...

    With class counts, ``zeroshot/recall_head``, ``_mid`` and ``_tail``: mean top-1 recall of the classes in each
    third; each extra zero-shot task as ``zeroshot_<name>/acc1``, ... ``modality_gap`` is measured on the
    retrieval set (images and their captions).
    """
    return evaluate_details(clip, suite, batch_size).metrics
