"""The offline rewriting backend: deterministic paraphrases made by rules, not by a language model.

Each rewrite strips a leading frame ("a photo of"), swaps words for configured synonyms, reorders
listed items ("A, B and C" -> "C, A and B") or fronts a trailing place phrase ("X in the center" -> "in the center, X"),
and wraps the content in a template ("a picture of X"). Words inside the caption's matched metadata entries are never
changed, so the entries survive; the faithfulness guard checks it anyway.

A caption keeps one frame at most: a leading frame that holds a matched entry ("photo") stays at the front and
never moves with the listed items, and content that still has a frame anywhere gets only templates without one,
so no rewrite reads "a photo of a photo of ..." or "... and a photo of X".
"""
from __future__ import annotations

import random
import re

from .generated import Generated
from .guard import FRAME, FRAME_NOUNS
from .params import RewriteParams
from .prompt import stable_seed

_STRIPPED = ",.;:?!`\"'()"
_PLACE_WORDS = {"in", "on", "at", "near", "under", "above", "behind", "beside", "inside"}
_FURNITURE = re.compile(r"[|()\[\]:]|(?:^| )[-\u2013\u2014](?: |$)")  # page furniture around an item
# Words after the last listed item that may describe the whole list ('... and C isolated on X', '... and C wallpaper').
_TRAILING_WORDS = {"on", "at", "near", "under", "above", "behind", "beside", "inside", "against", "isolated", "over",
                   "wallpaper", "pattern", "clipart", "icon", "illustration", "design", "background", "art", "logo"}
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


def _split_frame(words: list[str], protected: list[bool],
                 prefixes: list[list[str]]) -> tuple[list[str], list[str], list[bool]]:
    """(the leading frame when it holds words of a matched entry, else nothing; the words after the frame;
    their protection). A leading frame ('a photo of', or a frame word and a colon: 'drawing:') without an
    entry is simply stripped."""
    lowered = [_core(w).lower() for w in words]
    if len(words) > 1 and words[0].endswith(":") and lowered[0] in FRAME_NOUNS:
        prefixes = [[lowered[0]]] + prefixes
    for prefix in prefixes:
        size = len(prefix)
        if size < len(words) and lowered[:size] == prefix:
            head = words[:size] if any(protected[:size]) else []
            return head, words[size:], protected[size:]
    return [], words, protected


def _entry_words(words: list[str], protected: list[bool]) -> set[str]:
    return {_core(w) for w, keep in zip(words, protected) if keep}


def _frameless(templates: list[str]) -> list[str]:
    """The templates that add no frame of their own ('{d}' alone or with words that are not a frame)."""
    return [t for t in templates if not FRAME.search(t.replace("{d}", "x"))] or ["{d}"]


def _frame_and_content(head: list[str], needed: set[str], body: str, templates: list[str]) -> tuple[list[str], str]:
    """The templates to choose from and the content they wrap, so that a rewrite has one frame at most.

    A kept leading frame (``head``, holding the entry words ``needed``) is replaced by a template that has those
    words ('a photo of X' -> 'X, as seen in a photo'); when no template does, it stays in front and only
    frameless templates apply, as they do to content that has a frame anywhere else."""
    if head and not FRAME.search(body):
        same = [t for t in templates if needed <= set(re.findall(r"[\w-]+", t))]
        if same:
            return same, body
    content = " ".join(head + [body]).strip()
    return (_frameless(templates) if FRAME.search(content) else templates), content


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
    determiner ('a red circle', 'two stars') move, the rest ('vector illustration') stay where they are, and so
    do items that hold a frame ('a photo of X') or page furniture ('X | thumbnail', 'X - stock photo', 'X (4)'),
    and a last item with a trailing phrase that may describe the whole list ('... and C isolated on a background').
    A capitalised first word that moves away from the front is lower-cased ('A star and a ring' -> 'a ring and
    a star'), unless it belongs to a matched entry.
    """
    segments: list[list[str]] = [[]]
    flags: list[list[bool]] = [[]]
    separators: list[str] = []
    for word, keep in zip(words, protected):
        if word == "and" and not keep and segments[-1]:
            separators.append("and")
            segments.append([])
            flags.append([])
        elif word.endswith(",") and len(word) > 1:
            segments[-1].append(word[:-1])
            flags[-1].append(keep)
            separators.append(",")
            segments.append([])
            flags.append([])
        else:
            segments[-1].append(word)
            flags[-1].append(keep)
    movable = [i for i, seg in enumerate(segments) if seg and _core(seg[0]).lower() in _DETERMINERS
               and not FRAME.search(" ".join(seg)) and not _FURNITURE.search(" ".join(seg))
               and not (i == len(segments) - 1 and {w.lower() for w in seg[1:]} & _TRAILING_WORDS)]
    if "and" not in separators or len(movable) < 2 or not all(segments):
        return None
    shift = rng.randrange(1, len(movable))
    order = list(range(len(segments)))
    for position, source in zip(movable, movable[shift:] + movable[:shift]):
        order[position] = source
    first = segments[0][0]
    if order[0] != 0 and not flags[0][0] and first[:1].isupper() and first[1:] == first[1:].lower():
        segments[0][0] = first.lower()
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
    head, words, protected = _split_frame(words, protected, prefixes)
    needed = _entry_words(head, protected_words(head, entries))
    words = _swap_synonyms(words, protected, params.synonyms, rng)
    fronted: list[str] = []
    order = rng.random()
    if order < 0.4:
        words = _reorder_items(words, protected, rng) or words
    elif order < 0.7 and (split := _split_place_phrase(words, protected)):
        words, fronted = split
        words[-1] = words[-1].rstrip(",")
    templates, content = _frame_and_content(head, needed, " ".join(words).rstrip(" ."), params.templates)
    # Consecutive rewrites of one caption walk through the templates, so the k rewrites differ in frame;
    # a template that leaves the caption unchanged ('{d}' with nothing else changed) passes to the next one.
    first = stable_seed(seed, uid, "template") + index
    for step in range(len(templates)):
        text = _apply_template(templates[(first + step) % len(templates)], content)
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
