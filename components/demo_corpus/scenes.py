"""Sampling scenes: which concepts, how many objects, where, how big, on what background."""
from __future__ import annotations

import colorsys

import numpy as np

from .render import Background, Scene, SceneObject
from .vocabulary import COLORS, CONCEPTS

_ANGLE_RANGE = {  # degrees of rotation that keep each shape recognisable (a square turned 45 degrees is a diamond)
    "circle": 0, "ring": 0, "square": 15, "triangle": 20, "star": 36, "hexagon": 30, "cross": 15, "diamond": 10,
    "heart": 20, "crescent": 180,
}
_OBJECT_COUNT_DECAY = 0.6  # P(k objects) ~ decay^(k-1): most scenes hold one or two objects
_REPEAT_CONCEPT = 0.25  # chance that a further object repeats the first concept ("two red circles")
_COLOR_JITTER = 12


def zipf_probabilities(num: int, exponent: float) -> np.ndarray:
    """P(rank k) ~ 1 / k^exponent for k = 1..num."""
    weights = 1.0 / np.arange(1, num + 1, dtype=np.float64) ** exponent
    return weights / weights.sum()


def concept_probabilities(ranking: np.ndarray, exponent: float) -> np.ndarray:
    """Probability of each concept (in ``CONCEPTS`` order); ``ranking[k]`` is the concept index of rank k+1."""
    probs = np.empty(len(CONCEPTS))
    probs[ranking] = zipf_probabilities(len(CONCEPTS), exponent)
    return probs


def _muted_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """Backgrounds are desaturated mid-tones, so every object color (black and white included) stands out."""
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.2), rng.uniform(0.45, 0.7))
    return round(r * 255), round(g * 255), round(b * 255)


def sample_background(rng: np.random.Generator) -> Background:
    kind = ("solid", "gradient", "texture")[rng.integers(3)]
    if kind == "gradient":
        return Background(kind, (_muted_color(rng), _muted_color(rng)), angle=float(rng.uniform(0, 360)))
    return Background(kind, (_muted_color(rng),), seed=int(rng.integers(2**31)))


def sample_size(rng: np.random.Generator, min_px: int, max_px: int) -> tuple[int, int]:
    long_side = int(rng.integers(min_px, max_px + 1))
    short_side = max(int(round(long_side * rng.uniform(0.7, 1.0))), min(min_px, long_side))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _object(rng: np.random.Generator, concept: int, cell: tuple[int, int], cx: float, cy: float,
            radius: float) -> SceneObject:
    color, shape = CONCEPTS[concept].split(" ")
    rgb = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, 3),
                                        0, 255))
    spread = _ANGLE_RANGE[shape]
    return SceneObject(shape, color, rgb, cell, cx, cy, radius, float(rng.uniform(-spread, spread)))


def sample_scene(rng: np.random.Generator, probs: np.ndarray, size: tuple[int, int], max_objects: int,
                 num_objects: int | None = None) -> Scene:
    """A scene of 1..max_objects objects whose concepts are drawn from ``probs`` (over ``CONCEPTS``)."""
    width, height = size
    if num_objects is None:
        counts = _OBJECT_COUNT_DECAY ** np.arange(max_objects)
        num_objects = int(rng.choice(max_objects, p=counts / counts.sum())) + 1
    concepts = [int(rng.choice(len(probs), p=probs))]
    for _ in range(num_objects - 1):
        concepts.append(concepts[0] if rng.random() < _REPEAT_CONCEPT else int(rng.choice(len(probs), p=probs)))
    short = min(width, height)
    objects = []
    if num_objects == 1:
        radius = float(rng.uniform(0.12, 0.38))
        mx, my = radius * short / width, radius * short / height  # margins keep the object inside the frame
        cx, cy = float(rng.uniform(mx, 1 - mx)), float(rng.uniform(my, 1 - my))
        objects.append(_object(rng, concepts[0], (min(int(cx * 3), 2), min(int(cy * 3), 2)), cx, cy, radius))
    else:
        cells = rng.choice(9, size=num_objects, replace=False)
        for concept, cell in zip(concepts, cells):
            col, row = int(cell % 3), int(cell // 3)
            radius = float(rng.uniform(0.08, 0.15))
            slack_x = max(1 / 6 - radius * short / width, 0.0) * 0.8
            slack_y = max(1 / 6 - radius * short / height, 0.0) * 0.8
            cx = (col + 0.5) / 3 + float(rng.uniform(-slack_x, slack_x))
            cy = (row + 0.5) / 3 + float(rng.uniform(-slack_y, slack_y))
            objects.append(_object(rng, concept, (col, row), cx, cy, radius))
    return Scene(width, height, sample_background(rng), tuple(objects))
