"""Planning the synthetic crawl: every pair's scene, image file, URL, server behaviour, caption and defects.

Everything is decided here, deterministically from the seed; rendering the planned files is separate
(``render.render_job``), so the plan is cheap and the pixels can be made by a pool of processes.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import random
from dataclasses import dataclass, field, replace

import numpy as np

from clipmill.components.common.hashing import make_uid

from .captions import boilerplate_only_caption, true_caption, web_caption
from .params import DemoCorpusParams
from .render import Encoding, Scene
from .scenes import concept_probabilities, sample_scene, sample_size
from .vocabulary import CONCEPTS

DEMO_BASE_URL = "http://crawl.clipmill.test"
BEHAVIOURS = ("ok", "not_found", "transient_5xx", "slow", "truncated", "html_as_image", "redirect", "robots_noai")
CAPTION_DEFECTS = ("mismatched", "boilerplate_only")
IMAGE_DEFECTS = ("exact_duplicate", "near_duplicate")
NEAR_DUPLICATE_KINDS = ("reencode", "shift", "rescale")
STREAM_CRAWL = 1  # seed stream of the crawl; held-out sets and the trusted set use others
_FORMATS = ("jpeg", "png", "webp")
_FORMATS_FOR_MODE = {"RGB": _FORMATS, "L": ("jpeg", "png"), "P": ("png",), "RGBA": ("png", "webp")}
_EXIF_ORIENTATIONS = (3, 6, 8)
_CRAWL_START = dt.date(2024, 1, 1)


@dataclass
class ImageFile:
    """One image file on the demo server (``name`` is relative to web/)."""

    name: str
    scene: Scene
    encoding: Encoding
    oversized: bool


@dataclass
class CrawlPlan:
    pairs: list[dict]  # urls.parquet row + ground-truth fields, in output order
    files: dict[str, ImageFile]  # by name, in planning order
    routes: dict[str, dict]  # URL path -> behaviour, file, content type, redirect target
    concept_ranking: list[str]  # most popular first
    concept_probs: np.ndarray = field(repr=False)


def allocate(rng: np.random.Generator, n: int, rates: dict[str, float], rest: str) -> np.ndarray:
    """Exactly round(rate * n) of n items per category (largest remainder), shuffled; the rest get ``rest``."""
    names = list(rates)
    exact = np.array([rates[k] * n for k in names])
    counts = np.floor(exact).astype(int)
    remainders = exact - counts
    for k in np.argsort(-remainders, kind="stable")[: max(min(round(exact.sum()), n) - counts.sum(), 0)]:
        counts[k] += 1
    labels = np.full(n, rest, dtype=object)
    labels[: counts.sum()] = np.repeat(names, counts)
    return labels[rng.permutation(n)]


def _sample_encoding(rng: np.random.Generator, params: DemoCorpusParams) -> Encoding:
    kinds = params.images
    u = rng.random()
    mode = ("L" if u < kinds.grayscale else "P" if u < kinds.grayscale + kinds.palette
            else "RGBA" if u < kinds.grayscale + kinds.palette + kinds.alpha else "RGB")
    weights = np.array([getattr(kinds, f) if f in _FORMATS_FOR_MODE[mode] else 0.0 for f in _FORMATS])
    if weights.sum() <= 0:
        weights = np.array([1.0 if f in _FORMATS_FOR_MODE[mode] else 0.0 for f in _FORMATS])
    fmt = _FORMATS[rng.choice(3, p=weights / weights.sum())]
    orientation = 1
    if fmt == "jpeg" and rng.random() < kinds.exif_rotated:
        orientation = int(rng.choice(_EXIF_ORIENTATIONS))
    quality = int(rng.integers(70, 96)) if fmt == "jpeg" else int(rng.integers(60, 91))
    return Encoding(fmt, mode, quality, orientation)


def _near_duplicate_encoding(rng: np.random.Generator, source: Encoding, kind: str) -> Encoding:
    """A re-encoded, shifted or rescaled copy of ``source`` (EXIF dropped, as re-uploads usually do)."""
    enc = replace(source, exif_orientation=1)
    if kind == "reencode":
        mode = "RGB" if enc.mode == "P" else enc.mode
        others = [f for f in _FORMATS_FOR_MODE[mode] if f != enc.format] or [enc.format]
        return replace(enc, mode=mode, format=str(rng.choice(others)), quality=int(rng.integers(60, 90)))
    if kind == "shift":
        dx, dy = (int(rng.integers(2, 6)) * int(rng.choice([-1, 1])) for _ in range(2))
        return replace(enc, shift=(dx, dy))
    return replace(enc, scale=float(rng.choice([rng.uniform(0.85, 0.95), rng.uniform(1.05, 1.15)])))


def _token(seed: int, offset: int, i: int) -> str:
    return hashlib.sha1(f"crawl:{seed}:{offset}:{i}".encode()).hexdigest()[:12]


def _image_path(rng: np.random.Generator, site: int, token: str, ext: str) -> str:
    style = site % 3  # each site has its own URL layout
    if style == 0:
        return f"/s{site:03d}/images/{token}.{ext}"
    if style == 1:
        return f"/s{site:03d}/wp-content/uploads/{rng.integers(2019, 2025)}/{rng.integers(1, 13):02d}/{token}.{ext}"
    return f"/cdn/s{site:03d}/{token}.{ext}"


def _mismatch_donor(i: int, concept_sets: list[set[str]], captions: list[str], rng: np.random.Generator) -> int | None:
    """Another pair whose honest caption is not empty and names none of pair i's concepts."""
    n = len(captions)
    for j in rng.integers(0, n, size=min(200, 4 * n)):
        if j != i and captions[j] and not concept_sets[i] & concept_sets[j]:
            return int(j)
    return None


@dataclass
class _Images:
    """Which image file each pair links to, and what each duplicate copies (pair indices)."""

    files: dict[str, ImageFile]
    file_of: list[ImageFile | None]
    source_of: list[int | None]
    near_kind: list[str | None]


@dataclass
class _Captions:
    """Each pair's caption, the noise applied to it and whose image it describes (a pair index, or None)."""

    text: list[str]
    noise: list[list[str]]
    caption_of: list[int | None]


def _allocate_labels(rng: np.random.Generator, params: DemoCorpusParams, n: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each pair's image kind, server behaviour and caption defect, in exact proportions."""
    image_kind = allocate(rng, n, params.image_defects.model_dump(), "original")
    if not (image_kind == "original").any():
        image_kind[0] = "original"  # duplicates need something to duplicate
    behaviour = allocate(rng, n, params.behaviours.model_dump(), "ok")
    caption_defect = allocate(rng, n, params.caption_defects.model_dump(), "none")
    return image_kind, behaviour, caption_defect


def _plan_originals(rng: np.random.Generator, params: DemoCorpusParams, probs: np.ndarray, tokens: list[str],
                    originals: np.ndarray, images: _Images) -> None:
    """A fresh scene, size and encoding for each original pair."""
    for i in originals:
        oversized = rng.random() < params.images.oversized
        size = (sample_size(rng, params.oversized_px, params.oversized_px) if oversized
                else sample_size(rng, params.min_px, params.max_px))
        enc = _sample_encoding(rng, params)
        img = ImageFile(f"images/{tokens[i]}.{enc.extension}", sample_scene(rng, probs, size, params.max_objects),
                        enc, oversized)
        images.files[img.name] = images.file_of[i] = img


def _plan_copies(rng: np.random.Generator, tokens: list[str], image_kind: np.ndarray, originals: np.ndarray,
                 images: _Images) -> None:
    """Exact duplicates share an original's file; near duplicates get a re-encoded, shifted or rescaled one."""
    for i in np.flatnonzero(image_kind != "original"):
        src = int(originals[rng.integers(len(originals))])
        images.source_of[i] = src
        if image_kind[i] == "exact_duplicate":
            images.file_of[i] = images.file_of[src]
            continue
        kind = images.near_kind[i] = NEAR_DUPLICATE_KINDS[rng.integers(len(NEAR_DUPLICATE_KINDS))]
        source = images.file_of[src]
        enc = _near_duplicate_encoding(rng, source.encoding, kind)
        img = ImageFile(f"images/{tokens[i]}.{enc.extension}", source.scene, enc, source.oversized)
        images.files[img.name] = images.file_of[i] = img


def _plan_images(rng: np.random.Generator, params: DemoCorpusParams, probs: np.ndarray, tokens: list[str],
                 image_kind: np.ndarray) -> _Images:
    """Every pair's image file: originals first, then their duplicates."""
    n = len(tokens)
    images = _Images({}, [None] * n, [None] * n, [None] * n)
    originals = np.flatnonzero(image_kind == "original")
    _plan_originals(rng, params, probs, tokens, originals, images)
    _plan_copies(rng, tokens, image_kind, originals, images)
    return images


def _plan_captions(rng: np.random.Generator, text_rng: random.Random, params: DemoCorpusParams,
                   file_of: list[ImageFile], caption_defect: np.ndarray) -> _Captions:
    """Honest web captions, then the caption defects; a mismatch that cannot be made becomes ``none`` in
    ``caption_defect``."""
    honest, noise = [], []
    for img in file_of:
        text, applied = web_caption(img.scene, text_rng, params.caption_noise, colors=img.encoding.mode != "L",
                                    background="transparent" if img.encoding.mode == "RGBA" else None)
        honest.append(text)
        noise.append(applied)
    concept_sets = [set(img.scene.concepts) for img in file_of]
    out = _Captions(list(honest), [list(a) for a in noise], [i if honest[i] else None for i in range(len(honest))])
    for i in np.flatnonzero(caption_defect == "mismatched"):
        donor = _mismatch_donor(int(i), concept_sets, honest, rng)
        if donor is None:  # every other caption shares a concept: the defect cannot be made here
            caption_defect[i] = "none"
            continue
        out.text[i], out.noise[i], out.caption_of[i] = honest[donor], list(noise[donor]), donor
    for i in np.flatnonzero(caption_defect == "boilerplate_only"):
        out.text[i], out.noise[i], out.caption_of[i] = boilerplate_only_caption(text_rng), [], None
    return out


def _add_route(routes: dict[str, dict], rng: np.random.Generator, site: int, token: str, img: ImageFile,
               behaviour: str) -> str:
    """Route the pair's URL path on the demo server; returns the path its URL names."""
    path = _image_path(rng, site, token, img.encoding.extension)
    served = {"file": img.name, "content_type": img.encoding.content_type}
    if behaviour == "redirect":
        target = f"/s{site:03d}/images/{token}.{img.encoding.extension}"
        path = f"/s{site:03d}/media/{token}"
        routes[target] = {"behaviour": "ok", **served}
        routes[path] = {"behaviour": "redirect", "target": target}
    elif behaviour in ("not_found", "html_as_image"):
        routes[path] = {"behaviour": behaviour, "content_type": "image/jpeg"}
    else:
        routes[path] = {"behaviour": behaviour, **served}
    return path


def _image_fields(img: ImageFile) -> dict:
    """The ground-truth fields that describe a pair's image file."""
    enc, scene = img.encoding, img.scene
    width, height = enc.stored_size(scene.width, scene.height)
    return {
        "concepts": scene.concepts,
        "true_caption": true_caption(scene, colors=enc.mode != "L"),
        "image_file": img.name,
        "image_format": enc.format,
        "image_mode": enc.mode,
        "grayscale": enc.mode == "L",
        "palette": enc.mode == "P",
        "has_alpha": enc.mode == "RGBA",
        "exif_orientation": enc.exif_orientation,
        "oversized": img.oversized,
        "width": width,
        "height": height,
        "background": "transparent" if enc.mode == "RGBA" else scene.background.kind,
    }


def _pair(i: int, url: str, site: int, rng: np.random.Generator, labels: tuple[np.ndarray, ...], images: _Images,
          captions: _Captions) -> dict:
    """Pair i's urls.parquet row and ground truth; duplicate_of and caption_of are pair indices here."""
    image_kind, behaviour, caption_defect = labels
    return {
        "uid": make_uid(url, captions.text[i]),
        "url": url,
        "caption": captions.text[i],
        "page_url": f"{DEMO_BASE_URL}/s{site:03d}/posts/{rng.integers(1, 5000)}.html",
        "crawl_date": (_CRAWL_START + dt.timedelta(days=int(rng.integers(366)))).isoformat(),
        "behaviour": str(behaviour[i]),
        "mismatched": caption_defect[i] == "mismatched",
        "boilerplate_only": caption_defect[i] == "boilerplate_only",
        "exact_duplicate": image_kind[i] == "exact_duplicate",
        "near_duplicate": image_kind[i] == "near_duplicate",
        "near_duplicate_kind": images.near_kind[i],
        "duplicate_of": images.source_of[i],
        "caption_of": captions.caption_of[i],
        "caption_noise": captions.noise[i],
        **_image_fields(images.file_of[i]),
    }


def _link_uids(pairs: list[dict]) -> None:
    """Pair indices in duplicate_of and caption_of become uids, once every uid exists."""
    uids = [p["uid"] for p in pairs]
    for p in pairs:
        for key in ("duplicate_of", "caption_of"):
            p[key] = None if p[key] is None else uids[p[key]]
        p["caption_matches_image"] = p["caption_of"] == p["uid"]


def plan_crawl(params: DemoCorpusParams, seed: int) -> CrawlPlan:
    """The whole crawl, decided from (seed, params.seed_offset): no pixels rendered yet.

    The random draws happen in a fixed order (labels, images, captions, then per pair its site, URL path, page
    and date, then the output order), so a seed always gives the same crawl."""
    rng = np.random.default_rng([seed, params.seed_offset, STREAM_CRAWL])
    text_rng = random.Random(int(rng.integers(2**63)))
    ranking = rng.permutation(len(CONCEPTS))
    probs = concept_probabilities(ranking, params.zipf_exponent)
    n = params.num_pairs
    labels = _allocate_labels(rng, params, n)
    tokens = [_token(seed, params.seed_offset, i) for i in range(n)]
    images = _plan_images(rng, params, probs, tokens, labels[0])
    captions = _plan_captions(rng, text_rng, params, images.file_of, labels[2])
    routes: dict[str, dict] = {}
    pairs: list[dict] = []
    for i in range(n):
        site = int(rng.integers(params.num_sites))
        path = _add_route(routes, rng, site, tokens[i], images.file_of[i], labels[1][i])
        pairs.append(_pair(i, DEMO_BASE_URL + path, site, rng, labels, images, captions))
    _link_uids(pairs)
    order = rng.permutation(n)
    return CrawlPlan([pairs[i] for i in order], images.files, routes, [CONCEPTS[k] for k in ranking], probs)
