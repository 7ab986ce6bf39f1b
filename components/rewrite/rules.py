"""The offline rewriting backend: deterministic paraphrases made by rules, not by a language model.

Each rewrite strips a leading frame ("a photo of"), swaps words for configured synonyms, reorders
listed items ("A, B and C" -> "C, A and B") or fronts a trailing place phrase ("X in the center" -> "in the center, X"),
and wraps the content in a template ("a picture of X"). Words inside the caption's matched metadata entries are never changed,
so the entries survive; the faithfulness guard checks it anyway.
"""
from __future__ import annotations

import random
import re

from .backends import Generated
from .params import RewriteParams
from .prompt import stable_seed

_STRIPPED = ",.;:?!`\"'()"
_PLACE_WORDS = {"in", "on", "at", "near", "under", "above", "behind", "beside", "inside"}
_DETERMINERS = {"a", "an", "the", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "some",
                "several", "many"}


def _core(word: str) -> str:
    return word.strip(_STRIPPED)


def protected_words(words: list[str], entries: list[str]) -> list[bool]:
    """For each word, whether it belongs to an occurrence of one of the matched ``entries``."""
    cores = [_core(w) for w in words]
    protected = [False] * len(words)
    for entry in entries:
        entry_words = entry.split()
        size = len(entry_words)
        for start in range(len(words) - size + 1):
            if cores[start:start + size] == entry_words:
                protected[start:start + size] = [True] * size
    return protected


def _strip_frame(words: list[str], protected: list[bool], prefixes: list[list[str]]) -> tuple[list[str], list[bool]]:
    lowered = [_core(w).lower() for w in words]
    for prefix in prefixes:
        size = len(prefix)
        if size < len(words) and lowered[:size] == prefix and not any(protected[:size]):
            return words[size:], protected[size:]
    return words, protected


def _swap_synonyms(words: list[str], protected: list[bool], synonyms: dict[str, list[str]],
                   rng: random.Random) -> list[str]:
    out = []
    for word, keep in zip(words, protected):
        core = _core(word)
        choices = synonyms.get(core.lower())
        if keep or not choices or rng.random() < 0.5:
            out.append(word)
            continue
        replacement = rng.choice(choices)
        if core[:1].isupper():
            replacement = replacement[:1].upper() + replacement[1:]
        out.append(word.replace(core, replacement, 1))
    return out


def _reorder_items(words: list[str], protected: list[bool], rng: random.Random) -> list[str] | None:
    """'A, B and C' -> the same items in another order; None when fewer than two items can move.

    Items are the runs of words between commas and unprotected 'and's; only items that open with a
    determiner ('a red circle', 'two stars') move, the rest ('vector illustration') stay where they are.
    """
    segments: list[list[str]] = [[]]
    separators: list[str] = []
    for word, keep in zip(words, protected):
        if word == "and" and not keep and segments[-1]:
            separators.append("and")
            segments.append([])
        elif word.endswith(",") and len(word) > 1:
            segments[-1].append(word[:-1])
            separators.append(",")
            segments.append([])
        else:
            segments[-1].append(word)
    movable = [i for i, seg in enumerate(segments) if seg and _core(seg[0]).lower() in _DETERMINERS]
    if "and" not in separators or len(movable) < 2 or not all(segments):
        return None
    shift = rng.randrange(1, len(movable))
    order = list(range(len(segments)))
    for position, source in zip(movable, movable[shift:] + movable[:shift]):
        order[position] = source
    out: list[str] = []
    for i, source in enumerate(order):
        out += segments[source]
        if i < len(separators):
            if separators[i] == ",":
                out[-1] += ","
            else:
                out.append("and")
    return out


def _split_place_phrase(words: list[str], protected: list[bool]) -> tuple[list[str], list[str]] | None:
    """(the words before, a trailing unprotected place phrase such as 'in the center'); None when there is none."""
    for start in range(len(words) - 1, 0, -1):
        if words[start].lower() in _PLACE_WORDS and not any(protected[start:]):
            phrase = words[start:]
            if len(phrase) <= 5 and not any(w[-1:] in ",;:" for w in phrase[:-1]):
                return words[:start], phrase
            return None
    return None


def _apply_template(template: str, content: str) -> str:
    text = template.replace("{d}", content)
    return re.sub(r"\s+", " ", text).strip()


def paraphrase(uid: str, caption: str, entries: list[str], index: int, params: RewriteParams, seed: int) -> str:
    """Rewrite number ``index`` of ``caption``: the same inputs always give the same text."""
    rng = random.Random(stable_seed(seed, uid, index))
    words = caption.split()
    protected = protected_words(words, entries)
    prefixes = sorted((p.lower().split() for p in params.frame_prefixes), key=len, reverse=True)
    words, protected = _strip_frame(words, protected, prefixes)
    words = _swap_synonyms(words, protected, params.synonyms, rng)
    fronted: list[str] = []
    order = rng.random()
    if order < 0.4:
        words = _reorder_items(words, protected, rng) or words
    elif order < 0.7 and (split := _split_place_phrase(words, protected)):
        words, fronted = split
        words[-1] = words[-1].rstrip(",")
    content = " ".join(words).rstrip(" .")
    # Consecutive rewrites of one caption walk through the templates, so the k rewrites differ in frame;
    # a template that leaves the caption unchanged ('{d}' with nothing else changed) passes to the next one.
    first = stable_seed(seed, uid, "template") + index
    for step in range(len(params.templates)):
        text = _apply_template(params.templates[(first + step) % len(params.templates)], content)
        text = f"{' '.join(fronted).rstrip(' .')}, {text}" if fronted else text
        if text != " ".join(caption.split()):
            break
    return text


class RulesBackend:
    """Batch of (uid, caption, matched_entries) in; ``rewrites_per_caption`` paraphrases per caption out."""

    def __init__(self, params: RewriteParams, seed: int):
        self.params, self.seed = params, seed

    def generate(self, uids: list[str], captions: list[str], entries: list[list[str]]) -> list[Generated]:
        k = self.params.rewrites_per_caption
        return [Generated([paraphrase(uid, caption, matched, i, self.params, self.seed) for i in range(k)])
                for uid, caption, matched in zip(uids, captions, entries)]
