"""DataComp's basic rules and web boilerplate, as a batch function: manifest rows in, the first failed rule out.

A caption longer than ``max_caption_chars`` is dropped first and no other rule reads it. The boilerplate
patterns are searched in the caption with its whitespace normalised (runs of whitespace become one space, none at
the ends), so they need no ``\\s*`` of their own. ``regex_risk`` finds pattern shapes that backtrack
super-linearly (a quantifier inside a quantifier; two adjacent quantifiers over overlapping characters); the
params schema rejects user patterns that have one.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from .params import FilterParams

RULE_REASONS = ("max_caption_chars", "min_words", "min_chars", "boilerplate", "min_image_side", "max_aspect_ratio")


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def rule_reasons(batch: pd.DataFrame, params: FilterParams) -> np.ndarray:
    """Rows with caption, original_width and original_height in; per row the first failed rule, or None.

    Order of checks: caption length, caption words, caption characters, boilerplate, image side, aspect ratio.
    """
    caption = batch["caption"].fillna("").astype(str)
    width = batch["original_width"].astype("float64").to_numpy()
    height = batch["original_height"].astype("float64").to_numpy()
    checks: list[tuple[np.ndarray, str]] = []
    if params.max_caption_chars is not None:
        too_long = (caption.str.len() > params.max_caption_chars).to_numpy()
        checks.append((too_long, "max_caption_chars"))
        caption = caption.where(~too_long, "")  # dropped already: no other rule reads it
    if params.min_words is not None:
        checks.append(((caption.str.split().str.len() < params.min_words).to_numpy(), "min_words"))
    if params.min_chars is not None:
        checks.append(((caption.str.strip().str.len() < params.min_chars).to_numpy(), "min_chars"))
    if params.boilerplate_patterns:
        patterns = [re.compile(p) for p in params.boilerplate_patterns]
        boilerplate = np.array([any(p.search(normalize_whitespace(text)) for p in patterns) for text in caption],
                               dtype=bool)
        checks.append((boilerplate, "boilerplate"))
    if params.min_image_side is not None:
        checks.append((np.minimum(width, height) < params.min_image_side, "min_image_side"))
    if params.max_aspect_ratio is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.maximum(width, height) / np.minimum(width, height)
        checks.append((ratio > params.max_aspect_ratio, "max_aspect_ratio"))
    reason = np.full(len(batch), None, dtype=object)
    for failed, value in checks:
        reason[failed & pd.isna(reason)] = value
    return reason


# --- patterns that backtrack: a static check of the parsed regex -------------------------------------------------

def _parser():
    """The standard library's regex parser and its constants (Python 3.11's ``re._parser``)."""
    from re import _constants as constants
    from re import _parser as parser

    return constants, parser


def _category(name: str, char: str) -> bool:
    tests = {"DIGIT": str.isdigit, "SPACE": str.isspace, "WORD": lambda c: c.isalnum() or c == "_"}
    for key, test in tests.items():
        if name.endswith(key):
            return test(char) != ("NOT_" in name)
    return False


# Characters that stand for every class a pattern can name when two repeats are compared.
_PROBE = [chr(c) for c in range(32, 127)] + ["\t", "\n", "\u00a0", "\u00e9", "\u0663", "\u4e00"]


def _single_chars(items, c) -> set[str] | None:
    """The probe characters one repeated item matches, or None when it is not one character."""
    if len(items) != 1:
        return None
    op, av = items[0]
    if op == c.LITERAL:
        return {chr(av)}
    if op == c.NOT_LITERAL:
        return {ch for ch in _PROBE if ch != chr(av)}
    if op == c.ANY:
        return set(_PROBE)
    if op == c.IN:
        negate = any(o == c.NEGATE for o, _ in av)
        hit = set()
        for ch in _PROBE:
            found = any((o == c.LITERAL and chr(a) == ch) or (o == c.RANGE and a[0] <= ord(ch) <= a[1])
                        or (o == c.CATEGORY and _category(str(a), ch)) for o, a in av)
            if found != negate:
                hit.add(ch)
        return hit
    if op == c.CATEGORY:
        return {ch for ch in _PROBE if _category(str(av), ch)}
    return None


def _risk_in(items, c, inside_repeat: bool) -> str | None:
    repeats = (c.MAX_REPEAT, c.MIN_REPEAT)
    open_sets: list[set[str]] = []  # unbounded single-character repeats reachable through optional items
    for op, av in items:
        if op in repeats:
            low, high, sub = av
            unbounded = high == c.MAXREPEAT
            if unbounded and inside_repeat:
                return "a quantifier inside a quantifier"
            chars = _single_chars(list(sub), c) if unbounded else None
            if chars is not None:
                if any(chars & earlier for earlier in open_sets):
                    return "two adjacent quantifiers that match the same characters"
                open_sets = open_sets + [chars] if low == 0 else [chars]
            elif low > 0:
                open_sets = []
            if (found := _risk_in(sub, c, inside_repeat or unbounded)) is not None:
                return found
        elif op == c.SUBPATTERN:
            open_sets = []
            if (found := _risk_in(av[-1], c, inside_repeat)) is not None:
                return found
        elif op == c.BRANCH:
            open_sets = []
            for branch in av[1]:
                if (found := _risk_in(branch, c, inside_repeat)) is not None:
                    return found
        elif op != c.AT:  # anchors match no characters; anything else ends the run of adjacent repeats
            open_sets = []
    return None


def regex_risk(pattern: str) -> str | None:
    """Why ``pattern`` may backtrack super-linearly on a long caption, or None when no known risky shape is found.

    Atomic groups and possessive quantifiers never backtrack and are not looked into."""
    constants, parser = _parser()
    return _risk_in(parser.parse(pattern), constants, False)
