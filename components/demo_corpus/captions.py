"""Captions for scenes: clean descriptions, and alt-text written like the web writes it.

``describe`` says what is in a scene (counts, positions, relations, synonyms, word order);
``web_caption`` frames that description and adds web noise, returning the noise kinds it used.
"""
from __future__ import annotations

import random

from .params import CaptionNoiseRates
from .render import Scene, SceneObject
from .vocabulary import (
    BACKGROUND_WORDS,
    BOILERPLATE,
    BOILERPLATE_ONLY,
    CLEAN_FRAMES,
    COLOR_SYNONYMS,
    FILENAME_PATTERNS,
    FOREIGN_FRAGMENTS,
    FRAMES,
    LONG_FILLER,
    NUMBER_WORDS,
    POSITIONS,
    SEO_WORDS,
    SHAPE_WORDS,
)

_LARGE, _SMALL = 0.28, 0.1  # object radius (fraction of the short side) that captions call large / small


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _group(objects: tuple[SceneObject, ...]) -> list[list[SceneObject]]:
    """Objects grouped by concept, in order of first appearance."""
    groups: dict[str, list[SceneObject]] = {}
    for obj in objects:
        groups.setdefault(obj.concept, []).append(obj)
    return list(groups.values())


def _phrase(group: list[SceneObject], rng: random.Random, synonym: float, colors: bool) -> str:
    obj, n = group[0], len(group)
    names = SHAPE_WORDS[obj.shape]
    singular, plural = names[0] if rng.random() >= synonym else rng.choice(names[1:])
    shape = singular if n == 1 else plural
    color = ""
    if colors:
        color = obj.color if rng.random() >= synonym else rng.choice(COLOR_SYNONYMS[obj.color])
    size = ""
    if n == 1 and rng.random() < 0.15:
        size = "large" if obj.radius >= _LARGE else "small" if obj.radius <= _SMALL else ""
    style = rng.random()
    if color and style < 0.08:
        core = f"{shape} in {color}"
    elif color and style < 0.15:
        core = f"{color}-colored {shape}"
    else:
        core = f"{color} {shape}".strip()
    core = f"{size} {core}".strip()
    if n == 1:
        return f"{_article(core)} {core}" if rng.random() < 0.9 else f"one {core}"
    return f"{NUMBER_WORDS[n] if rng.random() < 0.8 else n} {core}"


def _join(parts: list[str], rng: random.Random) -> str:
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2 and rng.random() < 0.2:
        return f"{parts[0]} with {parts[1]}"
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(scene: Scene, rng: random.Random, synonym: float = 0.0, colors: bool = True,
             detail: bool = True) -> str:
    """What is in the scene, in words; ``detail`` allows positions, relations and shuffled word order."""
    groups = _group(scene.objects)
    if not detail:
        return _join([_phrase(g, rng, synonym, colors) for g in groups], rng)
    if len(groups) == 1 and len(groups[0]) == 1 and rng.random() < 0.35:
        return f"{_phrase(groups[0], rng, synonym, colors)} {rng.choice(POSITIONS[groups[0][0].cell])}"
    if len(scene.objects) == 2 and len(groups) == 2 and rng.random() < 0.4:
        a, b = scene.objects
        pa, pb = _phrase([a], rng, synonym, colors), _phrase([b], rng, synonym, colors)
        if a.cell[0] != b.cell[0]:
            pl, pr = (pa, pb) if a.cell[0] < b.cell[0] else (pb, pa)
            return rng.choice([f"{pl} left of {pr}", f"{pl} to the left of {pr}", f"{pr} to the right of {pl}",
                               f"{pr} right of {pl}"])
        pt, pbm = (pa, pb) if a.cell[1] < b.cell[1] else (pb, pa)  # distinct cells: same column, other row
        return rng.choice([f"{pt} above {pbm}", f"{pbm} below {pt}", f"{pt} over {pbm}"])
    parts = [_phrase(g, rng, synonym, colors) for g in groups]
    if rng.random() < 0.5:
        rng.shuffle(parts)
    return _join(parts, rng)


def true_caption(scene: Scene, colors: bool = True) -> str:
    """The canonical description of a scene (ground truth): concept names, objects in order, no noise."""
    parts = []
    for group in _group(scene.objects):
        obj, n = group[0], len(group)
        shape = SHAPE_WORDS[obj.shape][0][0 if n == 1 else 1]
        core = f"{obj.color} {shape}" if colors else shape
        parts.append(f"{_article(core)} {core}" if n == 1 else f"{NUMBER_WORDS[n]} {core}")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def clean_caption(scene: Scene, rng: random.Random, synonym: float = 0.0, colors: bool = True) -> str:
    """A correct caption in a plain frame, free of web noise (held-out sets, trusted pairs).

    ``synonym`` is the per-word rate of synonyms ('crimson disc'): 0 (canonical names) for the held-out sets,
    whose prompts name the concepts; the trusted pairs use the crawl's rate, so a scorer trained on them knows
    the words the web uses. ``colors``: False for a grayscale image.
    """
    frame = rng.choice(CLEAN_FRAMES)
    return frame.format(d=describe(scene, rng, synonym, colors), bg=rng.choice(BACKGROUND_WORDS[scene.background.kind]))


def _filename(rng: random.Random) -> str:
    return rng.choice(FILENAME_PATTERNS).format(n=rng.randrange(1, 10**6), k=rng.randrange(1, 20))


def boilerplate_only_caption(rng: random.Random) -> str:
    """A caption that says nothing about the image."""
    return _filename(rng) if rng.random() < 0.25 else rng.choice(BOILERPLATE_ONLY)


def web_caption(scene: Scene, rng: random.Random, noise: CaptionNoiseRates, colors: bool = True,
                background: str | None = None) -> tuple[str, list[str]]:
    """An honest but noisy alt-text for ``scene`` and the noise kinds applied (``background`` overrides its kind)."""
    if rng.random() < noise.empty:
        return "", ["empty"]
    applied = []
    bg_word = rng.choice(BACKGROUND_WORDS[background or scene.background.kind])
    text = rng.choice(FRAMES).format(d=describe(scene, rng, noise.synonym, colors), bg=bg_word)
    case = rng.random()
    if case < 0.2:
        text = text[0].upper() + text[1:]
    elif case < 0.25:
        text = text.title()
    elif case < 0.27:
        text = text.upper()
    if rng.random() < noise.filename:
        applied.append("filename")
        text = f"{_filename(rng)} {text}" if rng.random() < 0.5 else f"{text} {_filename(rng)}"
    if rng.random() < noise.boilerplate:
        applied.append("boilerplate")
        text = f"{text}{rng.choice([' - ', ' | ', '. ', ' '])}{rng.choice(BOILERPLATE)}"
    if rng.random() < noise.seo_spam:
        applied.append("seo_spam")
        text = f"{text} {' '.join(rng.choices(SEO_WORDS, k=rng.randrange(8, 20)))}"
    if rng.random() < noise.foreign:
        applied.append("foreign")
        fragment = rng.choice(FOREIGN_FRAGMENTS)
        text = f"{fragment}: {text}" if rng.random() < 0.5 else f"{text} ({fragment})"
    if rng.random() < noise.html_entities:
        applied.append("html_entities")
        text = text.replace(" and ", " &amp; ") if " and " in text else f"&quot;{text}&quot;"
        text = text.replace("'", "&#39;")
    if rng.random() < noise.very_long:
        applied.append("very_long")
        filler = list(LONG_FILLER)
        rng.shuffle(filler)
        text = f"{text}. {' '.join(filler)} Tags: {', '.join(rng.choices(SEO_WORDS, k=30))}"
    return text, applied
