"""Planning the clean sets beside the crawl: zero-shot and retrieval evaluation, and the trusted seed pairs.

Each set has its own seed stream, so none shares a scene with the crawl or with another set; concepts are
uniform (not long-tailed) and captions are correct and free of web noise. The held-out captions use the canonical
names; the trusted captions use synonyms as often as the crawl's do, and as many of its images are grayscale, as a
real trusted set (CC12M, MSCOCO) speaks the web's vocabulary and holds the web's kinds of images.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from clipmill.components.common.hashing import make_uid

from .captions import clean_caption
from .params import DemoCorpusParams
from .render import Encoding, Scene
from .scenes import sample_scene, sample_size
from .vocabulary import CONCEPTS

STREAM_ZEROSHOT, STREAM_RETRIEVAL, STREAM_TRUSTED = 2, 3, 4
EVAL_BASE_URL = "http://eval.clipmill.test"
TRUSTED_BASE_URL = "http://trusted.clipmill.test"
EVAL_ENCODING = Encoding("png")
TRUSTED_ENCODING = Encoding("jpeg", quality=90)
TRUSTED_GRAY_ENCODING = Encoding("jpeg", mode="L", quality=90)
_UNIFORM = np.full(len(CONCEPTS), 1.0 / len(CONCEPTS))
_MAX_CAPTION_TRIES = 10  # per wanted caption, to find distinct wordings


@dataclass
class PlannedSample:
    row: dict  # the sample's table row, without the image bytes
    scene: Scene
    encoding: Encoding


def plan_zeroshot(params: DemoCorpusParams, seed: int) -> list[PlannedSample]:
    """``zeroshot_per_class`` single-object images per concept; label = index in ``CONCEPTS``."""
    rng = np.random.default_rng([seed, params.seed_offset, STREAM_ZEROSHOT])
    out = []
    for label, name in enumerate(CONCEPTS):
        onehot = np.zeros(len(CONCEPTS))
        onehot[label] = 1.0
        for k in range(params.zeroshot_per_class):
            scene = sample_scene(rng, onehot, sample_size(rng, params.min_px, params.max_px), 1, num_objects=1)
            uid = make_uid(f"{EVAL_BASE_URL}/zeroshot/{label:03d}-{k:04d}.png", name)
            out.append(PlannedSample({"uid": uid, "label": label, "class_name": name}, scene, EVAL_ENCODING))
    return out


def plan_retrieval(params: DemoCorpusParams, seed: int) -> list[PlannedSample]:
    """``retrieval_size`` scenes of several objects, each with ``retrieval_captions`` distinct clean captions."""
    rng = np.random.default_rng([seed, params.seed_offset, STREAM_RETRIEVAL])
    text_rng = random.Random(int(rng.integers(2**63)))
    out = []
    for i in range(params.retrieval_size):
        num_objects = int(rng.integers(min(2, params.max_objects), params.max_objects + 1))
        scene = sample_scene(rng, _UNIFORM, sample_size(rng, params.min_px, params.max_px), params.max_objects,
                             num_objects=num_objects)
        captions: list[str] = []
        for _ in range(params.retrieval_captions * _MAX_CAPTION_TRIES):
            caption = clean_caption(scene, text_rng)
            if caption not in captions:
                captions.append(caption)
            if len(captions) == params.retrieval_captions:
                break
        uid = make_uid(f"{EVAL_BASE_URL}/retrieval/{i:05d}.png", captions[0])
        out.append(PlannedSample({"uid": uid, "captions": captions}, scene, EVAL_ENCODING))
    return out


def plan_trusted(params: DemoCorpusParams, seed: int) -> list[PlannedSample]:
    """``trusted_size`` clean pairs: uniform concepts, correct captions with the web's synonyms, JPEG.

    A share of the images is grayscale with captions that name no colour, as in the crawl: a scorer that never
    saw such a pair ranks the crawl's honest grayscale pairs among the mismatched ones.
    """
    rng = np.random.default_rng([seed, params.seed_offset, STREAM_TRUSTED])
    text_rng = random.Random(int(rng.integers(2**63)))
    synonym = params.caption_noise.synonym if params.trusted_synonym is None else params.trusted_synonym
    grayscale = params.images.grayscale if params.trusted_grayscale is None else params.trusted_grayscale
    out = []
    for i in range(params.trusted_size):
        scene = sample_scene(rng, _UNIFORM, sample_size(rng, params.min_px, params.max_px), params.max_objects)
        gray = text_rng.random() < grayscale
        caption = clean_caption(scene, text_rng, synonym, colors=not gray)
        uid = make_uid(f"{TRUSTED_BASE_URL}/{i:06d}.jpg", caption)
        out.append(PlannedSample({"uid": uid, "caption": caption, "width": scene.width, "height": scene.height},
                                 scene, TRUSTED_GRAY_ENCODING if gray else TRUSTED_ENCODING))
    return out
